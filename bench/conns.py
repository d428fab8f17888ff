"""Many keep-alive HTTP/1.1 connections held open at once (asyncio, loopback only).

`hold()` opens `count` connections (at most `open_concurrency` connecting at
a time: Mongrel2 listens with a backlog of 128), sends `GET path` on each and
reads the whole reply, keeps them all open, calls `while_open()`, then sends
a second request on every connection, calls `while_open()` again, and
closes them all. Every step has a timeout; nothing waits forever.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

REQUEST_TIMEOUT_S = 60.0


@dataclass(slots=True)
class HoldResult:
    wanted: int
    opened: int = 0
    first_ok: int = 0
    second_ok: int = 0
    failures: Counter[str] = field(default_factory=Counter)
    open_s: float = 0.0  # time to open all and get the first replies
    second_s: float = 0.0  # time for the second round


Streams = tuple[asyncio.StreamReader, asyncio.StreamWriter]


async def _request(streams: Streams, path: str, expected: bytes) -> str:
    """'' if the reply is 200 with `expected` as its body, else what went wrong."""
    reader, writer = streams
    writer.write(f"GET {path} HTTP/1.1\r\nHost: localhost\r\n\r\n".encode())
    await writer.drain()
    head = await reader.readuntil(b"\r\n\r\n")
    status_line, _, rest = head.partition(b"\r\n")
    length = -1
    for line in rest.split(b"\r\n"):
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value.strip())
    if length < 0:
        return "no Content-Length"
    body = await reader.readexactly(length)
    if status_line.split(b" ")[1:2] != [b"200"]:
        return f"status {status_line.decode(errors='replace')}"
    return "" if body == expected else "wrong body"


def _kind(exc: BaseException) -> str:
    return type(exc).__name__


async def _hold(host: str, port: int, count: int, path: str, expected: bytes,
                while_open: Callable[[str], None], open_concurrency: int,
                request_concurrency: int) -> HoldResult:
    result = HoldResult(count)
    loop = asyncio.get_running_loop()
    connecting = asyncio.Semaphore(open_concurrency)
    requesting = asyncio.Semaphore(request_concurrency)
    held: list[Streams] = []

    async def open_one() -> None:
        async with connecting:
            try:
                streams = await asyncio.wait_for(asyncio.open_connection(host, port),
                                                 REQUEST_TIMEOUT_S)
            except (OSError, TimeoutError) as exc:
                result.failures[f"connect: {_kind(exc)}"] += 1
                return
            result.opened += 1
            held.append(streams)
            try:
                problem = await asyncio.wait_for(_request(streams, path, expected),
                                                 REQUEST_TIMEOUT_S)
            except (OSError, TimeoutError, asyncio.IncompleteReadError, ValueError) as exc:
                problem = f"first request: {_kind(exc)}"
            if problem:
                result.failures[problem] += 1
            else:
                result.first_ok += 1

    async def again(streams: Streams) -> None:
        async with requesting:
            try:
                problem = await asyncio.wait_for(_request(streams, path, expected),
                                                 REQUEST_TIMEOUT_S)
            except (OSError, TimeoutError, asyncio.IncompleteReadError, ValueError) as exc:
                problem = f"second request: {_kind(exc)}"
            if problem:
                result.failures[problem] += 1
            else:
                result.second_ok += 1

    started = loop.time()
    try:
        await asyncio.gather(*(open_one() for _ in range(count)))
        result.open_s = loop.time() - started
        while_open("after opening, first request answered")
        started = loop.time()
        await asyncio.gather(*(again(s) for s in held))
        result.second_s = loop.time() - started
        while_open("after the second request on each")
    finally:
        for _, writer in held:
            writer.close()
        await asyncio.gather(*(w.wait_closed() for _, w in held), return_exceptions=True)
    return result


def hold(host: str, port: int, count: int, path: str, expected: bytes,
         while_open: Callable[[str], None], open_concurrency: int = 100,
         request_concurrency: int = 1000) -> HoldResult:
    return asyncio.run(_hold(host, port, count, path, expected, while_open,
                             open_concurrency, request_concurrency))
