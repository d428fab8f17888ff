"""The floor under every hop: CPU of one unbatched ZeroMQ round trip.

A ROUTER in this process sends a message to a DEALER in a forked child,
which sends it straight back; one message in flight at a time, so every
message costs each side a wake-up (libzmq's I/O thread, the poll, the
loopback socket). Prints the CPU per round trip of each side, user and
system apart, for a one-frame message and for the seven frames of an S0W1
REQUEST, over tcp:// and ipc://. docs/operating.md (capacity planning)
quotes it: it is what a hop costs when a process takes one message per
wake-up, before any Python work of ours.

    python -m bench.zmq_floor [-n ROUND_TRIPS]
"""

from __future__ import annotations

import argparse
import os
import tempfile

import zmq

REQUEST_FRAMES = [b"S0W1", b"\x02", b"\x00" * 8, b"hello", b"", b"x" * 300]


def _echo(endpoint: str, n: int) -> None:
    """The child: a DEALER that sends every message back, `n` times."""
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.connect(endpoint)
    sock.send(b"ready")
    for _ in range(n):
        sock.send_multipart(sock.recv_multipart())
    sock.close()
    ctx.term()


def round_trip_cpu(endpoint: str, frames: list[bytes], n: int) -> tuple[float, float, float]:
    """(user, system, child's user+system) µs of CPU per round trip.
    `endpoint` may be a tcp:// one with port 0 (any free port)."""
    ctx = zmq.Context()
    router = ctx.socket(zmq.ROUTER)
    router.setsockopt(zmq.LINGER, 0)
    router.bind(endpoint)
    endpoint = router.getsockopt_string(zmq.LAST_ENDPOINT)
    pid = os.fork()
    if pid == 0:  # a new context of its own: pyzmq's contexts do not cross a fork
        try:
            _echo(endpoint, n)
        finally:
            os._exit(0)
    try:
        ident, _ = router.recv_multipart()
        message = [ident, *frames]
        before = os.times()
        for _ in range(n):
            router.send_multipart(message)
            router.recv_multipart()
        after = os.times()
    finally:
        os.waitpid(pid, 0)
        router.close()
        ctx.term()
    child = os.times()
    scale = 1e6 / n
    return ((after.user - before.user) * scale, (after.system - before.system) * scale,
            (child.children_user + child.children_system
             - before.children_user - before.children_system) * scale)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="zmq_floor", description=__doc__.split("\n")[0])
    parser.add_argument("-n", type=int, default=30_000, help="round trips per case")
    args = parser.parse_args(argv)
    print("| transport | message | this side user µs | system µs | echo side µs |")
    print("|---|---|---:|---:|---:|")
    with tempfile.TemporaryDirectory() as tmp:
        for transport, endpoint in (("tcp", "tcp://127.0.0.1:0"),
                                    ("ipc", f"ipc://{tmp}/floor")):
            for label, frames in (("1 frame", [b"x" * 300]), ("S0W1 REQUEST", REQUEST_FRAMES)):
                user, system, echo = round_trip_cpu(endpoint, frames, args.n)
                print(f"| {transport} | {label} | {user:.1f} | {system:.1f} | {echo:.1f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
