"""The benchmark baseline: one Python process that is itself a Mongrel2 handler.

It PULLs requests from Mongrel2's send_spec and PUBlishes replies (through an
XPUB) to its recv_spec, answering each request itself with the bytes
`examples.hello:app` gives behind Scale0: "Hello from Scale0!\\n" for any path,
N bytes of b"x" for /bytes/N (N <= 16 MiB, else 400). No broker, no worker:
this is the ceiling for anything behind Mongrel2.

Without download flow control replies go out as one message each, whatever
their size: the bench runs this handler's Mongrel2 with
download.flow_control=0, the cheapest way through Mongrel2. With it on, the
handler keeps Mongrel2's rule (docs/protocol.md 3.9): per connection, reply
bytes not yet credited back stay within the window (102400 bytes, announced
by DOWNLOAD_CREDITS on a connection's first request only), so a bigger reply
goes in pieces, each sent when credits come back.

    python -m bench.direct_handler --send-spec tcp://... --recv-spec tcp://...
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time
from collections import deque

import zmq

from scale0.deploy import malloc
from scale0.wire.mongrel2 import (
    Credits,
    Disconnect,
    HttpRequest,
    Mongrel2ProtocolError,
    parse_message,
)
from scale0.wire.mongrel2_reply import reply

HELLO = b"Hello from Scale0!\n"
MAX_BYTES = 16 * 1024 * 1024
SUBSCRIBE_TIMEOUT_S = 30.0


def response(request: HttpRequest) -> tuple[bytes, bool]:
    """The whole HTTP response for `request`, and whether to close afterwards."""
    path = request.path
    if path.startswith(b"/bytes/"):
        size = path[len(b"/bytes/"):]
        n = int(size) if size.isdigit() and len(size) <= 9 else -1
        if 0 <= n <= MAX_BYTES:
            status, ctype, body = b"200 OK", b"application/octet-stream", b"x" * n
        else:
            status, ctype = b"400 Bad Request", b"text/plain"
            body = b"N must be a decimal number of bytes <= %d\n" % MAX_BYTES
    else:
        status, ctype, body = b"200 OK", b"text/plain", HELLO
    version = request.header(b"VERSION") or b"HTTP/1.1"
    connection = (request.header(b"connection") or b"").lower()
    if version == b"HTTP/1.1":
        close, extra = b"close" in connection, b""
    else:  # HTTP/1.0 keeps alive only when asked
        close = b"keep-alive" not in connection
        extra = b"" if close else b"Connection: keep-alive\r\n"
    if close:
        extra = b"Connection: close\r\n"
    head = b"%s %s\r\nContent-Type: %s\r\nContent-Length: %d\r\n%s\r\n" % (
        version, status, ctype, len(body), extra)
    return head + body, close


def wait_subscribed(pub: zmq.Socket[bytes], timeout_s: float) -> None:
    """Block until Mongrel2's SUB has subscribed (b"\\x01" + prefix) on our XPUB."""
    deadline = time.monotonic() + timeout_s
    while (left := deadline - time.monotonic()) > 0:
        if pub.poll(int(left * 1000) + 1, zmq.POLLIN) and pub.recv()[:1] == b"\x01":
            return
    raise TimeoutError(f"Mongrel2 did not subscribe within {timeout_s:.0f}s")


class Windows:
    """download.flow_control: each connection's credit window and what waits for it.

    Invariant: for every connection, the bytes sent and not yet credited are
    at most `size`. A connection is only kept while bytes are uncredited or
    waiting; one that is not kept has its whole window.
    """

    def __init__(self, pub: zmq.Socket[bytes]) -> None:
        self.pub = pub
        self.size: int | None = None  # None until a request shows flow control is on
        self.left: dict[int, int] = {}  # conn id -> credits left
        self.waiting: dict[int, deque[bytes]] = {}  # conn id -> bodies to send (b"": close)

    def send(self, sender: bytes, conn_id: int, body: bytes, close: bool) -> None:
        assert self.size is not None
        queue = self.waiting.setdefault(conn_id, deque())
        queue.append(body)
        if close:
            queue.append(b"")
        self.left.setdefault(conn_id, self.size)
        self.pump(sender, conn_id)

    def credit(self, sender: bytes, conn_id: int, n: int) -> None:
        if conn_id in self.left:
            self.left[conn_id] += n
            self.pump(sender, conn_id)

    def forget(self, conn_id: int) -> None:
        self.left.pop(conn_id, None)
        self.waiting.pop(conn_id, None)

    def pump(self, sender: bytes, conn_id: int) -> None:
        queue, left = self.waiting.get(conn_id), self.left[conn_id]
        while queue and (left > 0 or not queue[0]):
            body = queue.popleft()
            if body and len(body) > left:  # the rest waits for credits
                queue.appendleft(body[left:])
                body = body[:left]
            left -= len(body)
            self.pub.send(reply(sender, conn_id, body))
        self.left[conn_id] = left
        if not queue:
            self.waiting.pop(conn_id, None)
            if left >= (self.size or 0):  # all credited: nothing to remember
                del self.left[conn_id]


def serve(pull: zmq.Socket[bytes], pub: zmq.Socket[bytes]) -> None:
    """Answer requests until SIGTERM/SIGINT; drain the PULL until EAGAIN per wake-up."""
    windows = Windows(pub)
    while True:
        pull.poll()  # blocks; a signal raises out of it (see main)
        while True:
            try:
                data = pull.recv(zmq.NOBLOCK)
            except zmq.Again:
                break
            try:
                event = parse_message(data)
            except Mongrel2ProtocolError as exc:
                print(f"direct_handler: bad message: {exc}", file=sys.stderr)
                continue
            if isinstance(event, Credits):
                windows.credit(event.sender, event.conn_id, event.credits)
                continue
            if isinstance(event, Disconnect):
                windows.forget(event.conn_id)
                continue
            if not isinstance(event, HttpRequest):
                continue
            body, close = response(event)
            if windows.size is None:
                window = event.header(b"DOWNLOAD_CREDITS")
                if window is not None and window.isdigit():
                    windows.size = int(window)
            if windows.size is not None:
                windows.send(event.sender, event.conn_id, body, close)
                continue
            pub.send(reply(event.sender, event.conn_id, body))
            if close:
                pub.send(reply(event.sender, event.conn_id, b""))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="direct_handler", description=__doc__.split("\n")[0])
    parser.add_argument("--send-spec", required=True, help="Mongrel2's send_spec (we PULL)")
    parser.add_argument("--recv-spec", required=True, help="Mongrel2's recv_spec (we PUB)")
    args = parser.parse_args(argv)
    malloc.tune_this_process(os.environ)  # as Scale0's processes do: the ceiling stays one

    def stop(*_: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stop)
    ctx = zmq.Context()
    pull = ctx.socket(zmq.PULL)
    pub = ctx.socket(zmq.XPUB)
    pub.setsockopt(zmq.XPUB_NODROP, 1)  # at the HWM, block rather than drop a reply
    try:
        pub.connect(args.recv_spec)
        wait_subscribed(pub, SUBSCRIBE_TIMEOUT_S)
        pull.connect(args.send_spec)
        print("READY direct_handler", flush=True)
        serve(pull, pub)
    except KeyboardInterrupt:
        return 0
    except TimeoutError as exc:
        print(f"direct_handler: {exc}", file=sys.stderr)
        return 1
    finally:
        pull.close(linger=0)
        pub.close(linger=0)
        ctx.term()
    return 0


if __name__ == "__main__":
    sys.exit(main())
