"""WebSocket echo round trips: K connections, each sending a small text message
and awaiting its echo, again and again, for D seconds.

`python -m bench.ws_echo URL --connections K --duration D` prints one JSON
line (messages, messages/s, p50/p99 round trip in ms, errors); bench.run starts
it as a child process, like wrk, so its CPU counts as the client's. An echo
that differs from what was sent counts as an error, as does a connection that
fails or closes early (its loop then stops).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import sys
import time
from dataclasses import asdict, dataclass

from .procs import BenchError

MESSAGE = "ping from bench.ws_echo"  # 23 bytes of text


@dataclass(frozen=True, slots=True)
class EchoResult:
    messages: int  # echoes received equal to what was sent
    messages_per_s: float
    p50_ms: float
    p99_ms: float
    errors: int


def percentile(sorted_ms: list[float], fraction: float) -> float:
    """Nearest-rank percentile of an ascending list; NaN when empty."""
    if not sorted_ms:
        return math.nan
    rank = max(1, math.ceil(fraction * len(sorted_ms)))
    return sorted_ms[rank - 1]


def summarize(round_trips_ms: list[float], elapsed_s: float, errors: int) -> EchoResult:
    ordered = sorted(round_trips_ms)
    rate = len(ordered) / elapsed_s if elapsed_s > 0 else 0.0
    return EchoResult(messages=len(ordered), messages_per_s=rate,
                      p50_ms=percentile(ordered, 0.50), p99_ms=percentile(ordered, 0.99),
                      errors=errors)


def to_line(result: EchoResult) -> str:
    return json.dumps(asdict(result))


def parse(output: str) -> EchoResult:
    """The last JSON line bench.ws_echo printed."""
    lines = [line for line in output.splitlines() if line.startswith("{")]
    if not lines:
        raise BenchError(f"no result from bench.ws_echo:\n{output}")
    try:
        data = json.loads(lines[-1])
        return EchoResult(messages=int(data["messages"]),
                          messages_per_s=float(data["messages_per_s"]),
                          p50_ms=float(data["p50_ms"]), p99_ms=float(data["p99_ms"]),
                          errors=int(data["errors"]))
    except (ValueError, KeyError, TypeError) as exc:
        raise BenchError(f"cannot read bench.ws_echo's result {lines[-1]!r}: {exc}") from None


async def _one(url: str, deadline: float, trips: list[float], errors: list[int]) -> None:
    import websockets  # only the client needs it (a dev dependency)

    try:
        async with websockets.connect(url, max_size=2**20, compression=None) as ws:
            while time.monotonic() < deadline:
                sent = time.perf_counter()
                await ws.send(MESSAGE)
                echo = await ws.recv()
                if echo != MESSAGE:
                    errors[0] += 1
                    continue
                trips.append((time.perf_counter() - sent) * 1000.0)
    except (TimeoutError, OSError, websockets.WebSocketException):
        errors[0] += 1


async def run(url: str, connections: int, duration_s: float) -> EchoResult:
    trips: list[float] = []
    errors = [0]
    started = time.monotonic()
    deadline = started + duration_s
    await asyncio.gather(*(_one(url, deadline, trips, errors) for _ in range(connections)))
    return summarize(trips, time.monotonic() - started, errors[0])


def check(url: str) -> None:
    """One connection, one message: BenchError unless it comes back unchanged."""
    result = asyncio.run(run(url, 1, 0.2))
    if result.errors or not result.messages:
        raise BenchError(f"{url}: no WebSocket echo ({result.errors} errors)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("url")
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument("--duration", type=float, default=5.0)
    args = parser.parse_args(argv)
    print(to_line(asyncio.run(run(args.url, args.connections, args.duration))), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
