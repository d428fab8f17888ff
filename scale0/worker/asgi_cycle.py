"""One request at the ASGI worker: its send window and its reply path.

Theory of operation: every REQUEST the worker takes becomes a `Cycle`
(asgi_http.HttpCycle or asgi_websocket.WebSocketCycle), a task of the
worker's event loop, until exactly one LAST (docs/protocol.md 3.4). The
cycle writes the app's bytes as REPLY messages through its host (the
worker, `CycleHost`), on the link the REQUEST came from; a CANCEL, or the
loss of that broker, cancels it: the app sees a disconnect and its next
send raises `ClientDisconnected` (ASGI spec 2.4).

Flow control (`Flow`, as `reply.FlowWindow` in the WSGI worker): with a
window (the REQUEST's window frame, else DOWNLOAD_CREDITS: the window is the
connection's, docs/protocol.md 3.9) a reply message's body is at most the
credits left, and at most MAX_OUTSTANDING_MESSAGES are unacknowledged; a
writer awaits credits, so a slow client slows the app (Mongrel2 closes a
connection sent more than its credits, seen with a 200 KB WebSocket frame).
WebSocket frames count like HTTP bytes. Time spent waiting for credits does
not count as the app being stuck (`progress_s`, for the pool's --timeout).
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Awaitable, Callable, Coroutine, MutableMapping
from typing import TYPE_CHECKING, Any, Protocol

from scale0.errors import Scale0Error
from scale0.wire import mongrel2 as m2
from scale0.wire import mongrel2_reply as m2r
from scale0.wire import s0w1 as p

if TYPE_CHECKING:
    from scale0.worker.asgi_link import AsgiLink
    from scale0.worker.asgi_loop import AsgiSettings

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
App = Callable[[Scope, Receive, Send], Awaitable[None]]

MAX_OUTSTANDING_MESSAGES = 8  # well under Mongrel2's 16 queued messages per connection
MAX_MESSAGE_BYTES = 1 << 20  # docs/protocol.md 3.9: a BODY is at most 1 MiB


class ClientDisconnected(Scale0Error, OSError):
    """send() on a request or WebSocket whose client is gone (ASGI spec 2.4)."""


class CycleHost(Protocol):
    """What a cycle needs of its worker (asgi_loop.AsgiWorker)."""

    settings: AsgiSettings
    app_state: dict[str, Any] | None  # the lifespan's "state", copied into each scope

    def send(self, link: AsgiLink, frames: list[bytes]) -> None:
        """Send [COMMAND, *args] (VERSION goes in front) to the broker of `link`."""

    def spawn(self, coro: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        """Run `coro` as a task the worker keeps until it is done."""


class Flow:
    """One request's send window (docs/protocol.md 3.9)."""

    def __init__(self, credits: int | None, now: float) -> None:
        self.credits = credits
        self.outstanding: deque[int] = deque()
        self.cancelled = False
        self.progress_s = now  # the app's last progress, for --timeout
        self.blocked = False
        self._waiter: asyncio.Future[None] | None = None

    async def acquire(self, wanted: int) -> int:
        self.progress_s = time.monotonic()
        while True:
            if self.cancelled:
                raise ClientDisconnected("the client is gone")
            if self.credits is None:
                return min(wanted, MAX_MESSAGE_BYTES)
            if self.credits > 0 and len(self.outstanding) < MAX_OUTSTANDING_MESSAGES:
                n = min(wanted, self.credits, MAX_MESSAGE_BYTES)
                self.credits -= n
                self.outstanding.append(n)
                return n
            self._waiter = asyncio.get_running_loop().create_future()
            blocked_at = time.monotonic()
            self.blocked = True
            try:
                await self._waiter
            finally:
                self.blocked = False
                self.progress_s += time.monotonic() - blocked_at

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    def grant(self, n: int) -> None:
        if self.credits is not None:
            self.credits += n
            while self.outstanding and n >= self.outstanding[0]:
                n -= self.outstanding.popleft()
            if self.outstanding and n:
                self.outstanding[0] -= n
        self._wake()

    def cancel(self) -> None:
        self.cancelled = True
        self._wake()


class Cycle:
    """One REQUEST at this worker, until its LAST: what HTTP and WebSocket share."""

    websocket = False

    def __init__(self, worker: CycleHost, link: AsgiLink, rid: bytes, event: m2.Message,
                 script_name: str, now: float, window: bytes | None = None) -> None:
        self.worker = worker
        self.link = link
        self.rid = rid
        self.event = event
        self.script_name = script_name
        # The broker's window frame wins: Mongrel2 announces DOWNLOAD_CREDITS on a
        # connection's first request only, and the window is the connection's.
        credits = window if window is not None else event.header(b"DOWNLOAD_CREDITS")
        self.flow = Flow(p.count_of(credits), now)
        self.ended = False
        self._lock = asyncio.Lock()  # one writer at a time: pieces keep their order

    @property
    def cancelled(self) -> bool:
        return self.flow.cancelled

    def _reply(self, flag: bytes, messages: list[bytes]) -> None:
        self.worker.send(self.link, [p.CMD[p.Command.REPLY], self.rid, flag, *messages])

    async def write(self, data: m2r.Body, *, last: bool = False, close: bool = False) -> None:
        """Send `data` within the window; with `last`, end the request (closing
        the client connection when `close`)."""
        sender, conn_id = self.event.sender, self.event.conn_id
        async with self._lock:
            if self.ended:
                raise ClientDisconnected("the request has ended")
            final: m2r.Body = b""
            while data:
                n = await self.flow.acquire(len(data))
                piece, data = m2r.split_body(data, n)
                if data or not last:
                    self._reply(p.FLAG_MORE, [m2r.reply(sender, conn_id, piece)])
                else:
                    final = piece
            if last:
                self.ended = True
                messages = [m2r.reply(sender, conn_id, final)] if final else []
                if close and not self.flow.cancelled:
                    messages.append(m2r.close_reply(sender, conn_id))
                self._reply(p.FLAG_LAST, messages)

    def end(self, close: bool) -> None:
        """The LAST, if the request has not had it (after errors and cancels too)."""
        if not self.ended:
            self.ended = True
            messages = []
            if close and not self.flow.cancelled:
                messages.append(m2r.close_reply(self.event.sender, self.event.conn_id))
            self._reply(p.FLAG_LAST, messages)

    def cancel(self) -> None:
        self.flow.cancel()

    def on_frame(self, event: m2.Message) -> None:
        """A later message of the connection (FRAME: only a WebSocket takes them)."""

    def on_body(self, data: bytes, end: bool) -> None:
        """A BODY piece (only an HTTP request with a streamed body takes them)."""

    def shutdown(self) -> None:
        """The worker is leaving: end what is left (graceful timeout passed)."""
        self.cancel()

    async def run(self, app: App) -> None:
        raise NotImplementedError
