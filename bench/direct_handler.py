"""The benchmark baseline: one Python process that is itself a Mongrel2 handler.

It PULLs requests from Mongrel2's send_spec and PUBlishes replies (through an
XPUB) to its recv_spec, answering each request itself with the bytes
`examples.hello:app` gives behind Scale0: "Hello from Scale0!\\n" for any path,
N bytes of b"x" for /bytes/N (N <= 16 MiB, else 400). No broker, no worker:
this is the ceiling for anything behind Mongrel2.

Replies go out as one message each, whatever their size, and download
credits are not read: the bench runs this handler's Mongrel2 with
download.flow_control=0 (with it on, Mongrel2 closes the connection on a
reply larger than its initial credits, 102400 bytes).

    python -m bench.direct_handler --send-spec tcp://... --recv-spec tcp://...
"""

from __future__ import annotations

import argparse
import signal
import sys
import time

import zmq

from scale0.mongrel2 import HttpRequest, Mongrel2ProtocolError, parse_message, reply

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


def serve(pull: zmq.Socket[bytes], pub: zmq.Socket[bytes]) -> None:
    """Answer requests until SIGTERM/SIGINT; drain the PULL until EAGAIN per wake-up."""
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
            if not isinstance(event, HttpRequest):
                continue  # disconnects, credits: nothing to do
            body, close = response(event)
            pub.send(reply(event.sender, event.conn_id, body))
            if close:
                pub.send(reply(event.sender, event.conn_id, b""))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="direct_handler", description=__doc__.split("\n")[0])
    parser.add_argument("--send-spec", required=True, help="Mongrel2's send_spec (we PULL)")
    parser.add_argument("--recv-spec", required=True, help="Mongrel2's recv_spec (we PUB)")
    args = parser.parse_args(argv)

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
