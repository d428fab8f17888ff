"""Streamed request bodies at the ASGI worker (asgi_http.HttpCycle + scale0/core/bodystream.py)
against a stand-in worker that records what would go to the broker: READ
credits out, BODY pieces in, `http.request` events with more_body to the app."""

from __future__ import annotations

import asyncio
import hashlib
import random
from typing import Any

from scale0.core.bodystream import WINDOW_BYTES
from scale0.wire import mongrel2 as m2
from scale0.wire import s0w1 as p
from scale0.worker.asgi_http import HttpCycle
from scale0.worker.asgi_link import AsgiLink
from tests.unit.test_asgi import LINK, FakeWorker, request

RID = b"\x00" * 7 + b"\x09"


def streamed(first: bytes, length: int | None) -> m2.Message:
    extra: dict[bytes, Any] = {b"METHOD": b"POST", b"UPLOAD_STREAM": b"0"}
    if length is None:
        extra[b"transfer-encoding"] = b"chunked"
    else:
        extra[b"content-length"] = b"%d" % length
    return request(b"/up", method=b"POST", extra=extra, body=first)


def reads(w: FakeWorker) -> int:
    """The credits of the READs sent since the last call; only READs were sent."""
    total = 0
    for frames in w.sent:
        assert frames[0] == p.CMD[p.Command.READ] and frames[1] == RID, frames
        total += int(frames[2])
    w.sent.clear()
    return total


class Recorder:
    """An ASGI app that hashes its body and records every event it got."""

    def __init__(self) -> None:
        self.events: list[dict[str, Any]] = []
        self.digest = hashlib.sha256()

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        while True:
            event = await receive()
            self.events.append(event)
            if event["type"] == "http.disconnect":
                return
            self.digest.update(event["body"])
            if not event["more_body"]:
                break
        text = self.digest.hexdigest().encode()
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": text})


async def pump(w: FakeWorker, http: HttpCycle, task: asyncio.Task[None], body: bytes,
               sent: int, piece: int) -> int:
    """Play Mongrel2 and the broker: send pieces only as credited; the most
    credits ever outstanding plus buffered at the worker."""
    credits = peak = 0
    while sent < len(body):
        await asyncio.sleep(0)
        assert not task.done(), task
        credits += reads(w)
        buffered = http._body.buffered if http._body is not None else 0
        peak = max(peak, credits + buffered)
        while credits and sent < len(body):
            n = min(piece, credits, len(body) - sent)
            http.on_body(body[sent:sent + n], sent + n == len(body))
            sent += n
            credits -= n
    return peak


def test_a_streamed_body_comes_as_credited_and_reaches_the_app_whole() -> None:
    async def main() -> None:
        w = FakeWorker()
        body = random.Random(5).randbytes(1_000_000)
        http = HttpCycle(w, AsgiLink(0, "e", b"", LINK), RID, streamed(body[:1000], len(body)),
                         "", 0.0)
        app = Recorder()
        task = asyncio.get_running_loop().create_task(http.run(app))
        peak = await pump(w, http, task, body, 1000, 20480)
        await task
        assert peak <= WINDOW_BYTES  # never more than a window on its way or buffered
        assert app.digest.digest() == hashlib.sha256(body).digest()
        assert all(e["more_body"] for e in app.events[:-1])
        assert app.events[-1]["more_body"] is False and len(app.events) > 4
        ((flag, (answer,)),) = w.replies()
        assert flag == p.FLAG_LAST and answer.endswith(hashlib.sha256(body).hexdigest().encode())
    asyncio.run(main())


def test_a_chunked_body_ends_with_its_last_piece() -> None:
    async def main() -> None:
        w = FakeWorker()
        body = random.Random(6).randbytes(300_000)
        http = HttpCycle(w, AsgiLink(0, "e", b"", LINK), RID, streamed(b"", None), "", 0.0)
        app = Recorder()
        task = asyncio.get_running_loop().create_task(http.run(app))
        await pump(w, http, task, body, 0, 65536)
        await task
        assert app.digest.digest() == hashlib.sha256(body).digest()
        assert w.replies()[0][0] == p.FLAG_LAST
    asyncio.run(main())


def test_a_cancel_while_the_app_waits_for_body_is_http_disconnect() -> None:
    async def main() -> None:
        w = FakeWorker()
        http = HttpCycle(w, AsgiLink(0, "e", b"", LINK), RID, streamed(b"", 100_000), "", 0.0)
        app = Recorder()
        task = asyncio.get_running_loop().create_task(http.run(app))
        while not w.sent:
            await asyncio.sleep(0)
        assert reads(w) == WINDOW_BYTES
        http.on_body(b"x" * 5000, False)
        await asyncio.sleep(0)
        http.cancel()  # the broker's CANCEL: the client left mid-upload
        await task
        assert [e["type"] for e in app.events] == ["http.request", "http.disconnect"]
        assert w.replies() == [(p.FLAG_LAST, [])]  # the slot is free; no READ after
    asyncio.run(main())


def test_a_body_longer_than_declared_is_400() -> None:
    async def main() -> None:
        w = FakeWorker()
        http = HttpCycle(w, AsgiLink(0, "e", b"", LINK), RID, streamed(b"ab", 10), "", 0.0)
        task = asyncio.get_running_loop().create_task(http.run(Recorder()))
        while not w.sent:
            await asyncio.sleep(0)
        reads(w)
        http.on_body(b"c" * 20, True)
        await task
        ((flag, (answer, close)),) = w.replies()
        assert flag == p.FLAG_LAST and answer.startswith(b"HTTP/1.1 400 ") and close == b""
    asyncio.run(main())


def test_an_inline_body_is_one_event_and_asks_for_nothing() -> None:
    async def main() -> None:
        w = FakeWorker()
        event = request(b"/up", method=b"POST", body=b"hello",
                        extra={b"content-length": b"5"})
        http = HttpCycle(w, AsgiLink(0, "e", b"", LINK), RID, event, "", 0.0)
        app = Recorder()
        await http.run(app)
        assert app.events == [{"type": "http.request", "body": b"hello", "more_body": False}]
        assert [flag for flag, _ in w.replies()] == [p.FLAG_LAST]  # no READ went out
    asyncio.run(main())
