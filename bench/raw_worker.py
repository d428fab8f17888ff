"""A raw S0W1 worker answering every request with a fixed hello response.

It isolates the broker (and relay) from the WSGI worker when measuring the
hop: no WSGI environ, no threads, no header parsing. Per REQUEST it reads the
reply prefix out of the Mongrel2 message (SENDER and CONN_ID, up to the second
space) and sends one LAST REPLY. It announces service `hello` on `/`,
heartbeats on a timer, says HELLO again when the broker answers BYE (a broker
restart), and ignores CANCEL and CREDIT (every answer is already complete).
Keep-alive only: a request asking for `Connection: close` is not closed.

    python -m bench.raw_worker --connect tcp://127.0.0.1:PORT [--capacity N]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time

import zmq

VERSION = b"S0W1"
HELLO, REQUEST, REPLY, HEARTBEAT, BYE = b"\x01", b"\x02", b"\x03", b"\x04", b"\x05"
LAST = b"\x01"
BODY = b"Hello from Scale0!\n"
RESPONSE = (b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: %d\r\n\r\n%s"
            % (len(BODY), BODY))
HEARTBEAT_S = 1.0


def hello(capacity: int) -> list[bytes]:
    payload = {"services": [{"name": "hello", "routes": ["/"]}], "capacity": capacity,
               "worker": f"raw:{os.getpid()}", "heartbeat_ms": int(HEARTBEAT_S * 1000)}
    return [VERSION, HELLO, json.dumps(payload).encode()]


def serve(sock: zmq.Socket[bytes], capacity: int) -> None:
    """Answer until SIGTERM/SIGINT; drain the DEALER until EAGAIN per wake-up."""
    sock.send_multipart(hello(capacity))
    next_beat = time.monotonic() + HEARTBEAT_S
    send, nb, more = sock.send, zmq.NOBLOCK, zmq.SNDMORE
    while True:
        timeout_ms = max(1, int((next_beat - time.monotonic()) * 1000) + 1)
        if sock.poll(timeout_ms):
            while True:
                try:
                    frames = sock.recv_multipart(nb)
                except zmq.Again:
                    break
                command = frames[1] if len(frames) > 1 else b""
                if command == REQUEST and len(frames) >= 6:  # [+ window] with flow control
                    raw = frames[5]
                    sp1 = raw.find(b" ")
                    sp2 = raw.find(b" ", sp1 + 1)
                    ids = raw[sp1 + 1:sp2]
                    message = b"%s %d:%s, %s" % (raw[:sp1], len(ids), ids, RESPONSE)
                    send(VERSION, more)
                    send(REPLY, more)
                    send(frames[2], more)
                    send(LAST, more)
                    send(message)
                elif command == BYE:  # the broker does not know us: announce again
                    sock.send_multipart(hello(capacity))
        now = time.monotonic()
        if now >= next_beat:
            next_beat = now + HEARTBEAT_S
            sock.send_multipart([VERSION, HEARTBEAT])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="raw_worker", description=__doc__.split("\n")[0])
    parser.add_argument("--connect", required=True, help="the broker's worker endpoint")
    parser.add_argument("--capacity", type=int, default=1000,
                        help="requests announced at once (default 1000: never queue)")
    args = parser.parse_args(argv)

    def stop(*_: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stop)
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.SNDHWM, 0)
    sock.setsockopt(zmq.RCVHWM, 0)
    try:
        sock.connect(args.connect)
        print("READY raw_worker", flush=True)
        serve(sock, args.capacity)
    except KeyboardInterrupt:
        return 0
    finally:
        sock.close(0)
        ctx.term()
    return 0


if __name__ == "__main__":
    sys.exit(main())
