"""ASGI worker runtime: one asyncio loop speaks S0W1 to the brokers and runs the app.

Theory of operation
-------------------
One event loop owns everything: a `zmq.asyncio` DEALER per broker (a reader
task each), a timer task (connect with backoff, HEARTBEAT, expiry, reports
to the arbiter), and one task per request or WebSocket. The S0W1 rules are
those of the threaded worker (docs/protocol.md sections 3 and 4.1): HELLO
on connect, WELCOME makes it ready, a silent broker is dropped and dialled
again (0.5 s doubling to 10 s), exactly one LAST per REQUEST, CANCEL ends a
request (the app sees `http.disconnect` / `websocket.disconnect`; its next
send raises `ClientDisconnected`), CREDIT feeds the send window.

Capacity: HELLO announces `concurrency` slots; the broker never sends more.
A WebSocket holds its slot from its handshake to its close. The worker
announces the `websocket` feature, so brokers send it handshakes and the
FRAMEs of its accepted connections (docs/protocol.md section 12).

Flow control (`_Flow`, as in the threaded worker): with a window (the
REQUEST's window frame, else DOWNLOAD_CREDITS) a reply message's body is at
most the credits left, and at most 8 messages are unacknowledged; a writer
awaits credits, so a slow client slows the app (Mongrel2 closes a connection
sent more than its credits, seen with a 200 KB WebSocket frame). WebSocket
frames count like HTTP bytes.

Request bodies: inline in the REQUEST, a file Mongrel2 spooled (with
`upload_dir`, read in pieces off the loop), or streamed (HELLO meta
``bodies=stream``, docs/protocol.md 4.5): BODY pieces go to the request's
`bodystream.BodyReader` and `receive()` hands them out as `http.request`
events with ``more_body``, sending READ credits as the app takes them, so
at most one window of a body waits here however slow the app.

Lifespan: `lifespan.startup` runs before the first HELLO; a failed startup
exits with supervise.BOOT_FAILED (the pool does not respawn it). An app
that raises at once on the lifespan scope does not support it and is run
without. `lifespan.shutdown` runs on a graceful stop, after the requests.

Stopping (SIGTERM, SIGINT or a broker's DRAIN without an arbiter): DRAIN to
every broker; leave when nothing is in flight and every welcomed broker
acked, or after the graceful timeout: WebSockets still open then are closed
with 1001 (going away), requests still running are cancelled. Then the
lifespan shutdown and BYE.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import signal
import socket
import time
from collections import deque
from collections.abc import Awaitable, Callable, Coroutine, MutableMapping
from dataclasses import dataclass
from typing import Any, BinaryIO

import zmq
import zmq.asyncio

from scale0.auth.keys import CurveKeys
from scale0.config import AsgiConfig, default
from scale0.core.bodystream import BodyError, BodyReader
from scale0.core.forwarded import LOOPBACK, Trust
from scale0.errors import Scale0Error
from scale0.pool.childstate import ChildState
from scale0.pool.supervise import BOOT_FAILED
from scale0.wire import mongrel2 as m2
from scale0.wire import s0w1 as p
from scale0.worker import asgi

log = logging.getLogger(__name__)

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
App = Callable[[Scope, Receive, Send], Awaitable[None]]

MAX_OUTSTANDING_MESSAGES = 8  # well under Mongrel2's 16 queued messages per connection
MAX_MESSAGE_BYTES = 1 << 20
BODY_CHUNK = 64 * 1024  # pieces of a spooled upload handed to receive()
REPORT_EVERY_S = 0.25
READY_WAIT_S = 5.0
TICK_S = 0.1


class ClientDisconnected(Scale0Error, OSError):
    """send() on a request or WebSocket whose client is gone (ASGI spec 2.4)."""


@dataclass(frozen=True, slots=True)
class AsgiSettings:
    connect: tuple[str, ...]
    services: tuple[p.ServiceSpec, ...]
    # Defaults as declared (config/declared.py); cli.py builds it with config.build.
    concurrency: int = default(AsgiConfig, "concurrency")
    heartbeat_s: float = default(AsgiConfig, "heartbeat")
    liveness: int = default(AsgiConfig, "liveness")
    graceful_timeout_s: float = default(AsgiConfig, "graceful_timeout")
    reconnect_max_s: float = 10.0
    label: str = ""
    upload_dir: str | None = None
    websocket_max_size: int = default(AsgiConfig, "websocket_max_size")
    lifespan: str = default(AsgiConfig, "lifespan")  # "auto": if the app has it; "on"; "off"
    forwarded: Trust = LOOPBACK  # whose X-Forwarded-Proto / client address to believe
    curve: CurveKeys | None = None  # our key pair and the brokers' public key (auth/keys.py)


class _Flow:
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


@dataclass(slots=True, eq=False)
class _Link:
    index: int
    endpoint: str
    socket: zmq.asyncio.Socket | None = None
    reader: asyncio.Task[None] | None = None
    welcomed: bool = False
    last_seen: float = 0.0
    next_heartbeat: float = 0.0
    retry_at: float = 0.0
    backoff_s: float = 0.5
    drain_acked: bool = False


class _Conn:
    """One REQUEST at this worker, until its LAST."""

    websocket = False

    def __init__(self, worker: AsgiWorker, link: _Link, rid: bytes, event: m2.Message,
                 script_name: str, now: float, window: bytes | None = None) -> None:
        self.worker = worker
        self.link = link
        self.rid = rid
        self.event = event
        self.script_name = script_name
        # The broker's window frame wins: Mongrel2 announces DOWNLOAD_CREDITS on a
        # connection's first request only, and the window is the connection's.
        credits = window if window is not None else event.header(b"DOWNLOAD_CREDITS")
        self.flow = _Flow(int(credits) if credits is not None and credits.isdigit() else None,
                          now)
        self.ended = False
        self._lock = asyncio.Lock()  # one writer at a time: pieces keep their order

    @property
    def cancelled(self) -> bool:
        return self.flow.cancelled

    def _reply(self, flag: bytes, messages: list[bytes]) -> None:
        self.worker.send(self.link, [p.CMD[p.Command.REPLY], self.rid, flag, *messages])

    async def write(self, data: bytes, *, last: bool = False, close: bool = False) -> None:
        """Send `data` within the window; with `last`, end the request (closing
        the client connection when `close`)."""
        sender, conn_id = self.event.sender, self.event.conn_id
        async with self._lock:
            if self.ended:
                raise ClientDisconnected("the request has ended")
            final = b""
            while data:
                n = await self.flow.acquire(len(data))
                piece, data = data[:n], data[n:]
                if data or not last:
                    self._reply(p.FLAG_MORE, [m2.reply(sender, conn_id, piece)])
                else:
                    final = piece
            if last:
                self.ended = True
                messages = [m2.reply(sender, conn_id, final)] if final else []
                if close and not self.flow.cancelled:
                    messages.append(m2.close_reply(sender, conn_id))
                self._reply(p.FLAG_LAST, messages)

    def end(self, close: bool) -> None:
        """The LAST, if the request has not had it (after errors and cancels too)."""
        if not self.ended:
            self.ended = True
            messages = []
            if close and not self.flow.cancelled:
                messages.append(m2.close_reply(self.event.sender, self.event.conn_id))
            self._reply(p.FLAG_LAST, messages)

    def cancel(self) -> None:
        self.flow.cancel()

    def on_frame(self, event: m2.Message) -> None:
        pass

    def on_body(self, data: bytes, end: bool) -> None:
        """A BODY piece (only an HTTP request with a streamed body takes them)."""

    def shutdown(self) -> None:
        """The worker is leaving: end what is left (graceful timeout passed)."""
        self.cancel()

    async def run(self, app: App) -> None:
        raise NotImplementedError


class _Http(_Conn):
    def __init__(self, *args: Any, **kw: Any) -> None:
        super().__init__(*args, **kw)
        self.response = asgi.HttpResponse(self.event)
        self._disconnected = asyncio.Event()
        self._body_done = False
        self._upload: BinaryIO | None = None
        self._upload_left = 0
        # A streamed body (upload.stream): BODY pieces paced by READ credits
        # (core/bodystream.py; docs/protocol.md 3.11, 3.12). None otherwise.
        self._body: BodyReader | None = None
        self._body_error: BodyError | None = None
        self._body_arrived = asyncio.Event()

    def cancel(self) -> None:
        super().cancel()
        self._disconnected.set()
        self._body_arrived.set()

    def on_body(self, data: bytes, end: bool) -> None:
        if self._body is None or self._body_error is not None:
            return
        try:
            self._body.feed(data, end)
        except BodyError as exc:
            self._body_error = exc
        self._body_arrived.set()

    def _credit(self, reader: BodyReader) -> None:
        n = reader.credit()
        if n and not self.cancelled and not self.ended:
            self.worker.send(self.link, [p.CMD[p.Command.READ], self.rid, b"%d" % n])

    async def _receive_streamed(self, reader: BodyReader) -> Message:
        """The next `http.request` of a streamed body: what is buffered, else
        the next piece. Invariant (core/bodystream.py): granted and not received +
        buffered <= the window, so at most a window waits here for the app;
        credits are granted only as the app takes, so a slow app paces the client."""
        while True:
            if self.cancelled:
                self._body_done = True
                return {"type": "http.disconnect"}
            data = reader.take()
            if not data and not reader.eof and self._body_error is not None:
                raise self._body_error
            self._credit(reader)  # the first call grants the window; then what was taken
            if data or reader.eof:
                self._body_done = reader.eof
                self.flow.progress_s = time.monotonic()  # reading the body is progress
                return {"type": "http.request", "body": data, "more_body": not reader.eof}
            self._body_arrived.clear()
            await self._body_arrived.wait()

    async def receive(self) -> Message:
        if not self._body_done:
            if self._body is not None:
                return await self._receive_streamed(self._body)
            if self._upload is None:
                self._body_done = True
                return {"type": "http.request", "body": self.event.body, "more_body": False}
            loop = asyncio.get_running_loop()
            chunk = await loop.run_in_executor(None, self._upload.read,
                                               min(BODY_CHUNK, self._upload_left))
            self._upload_left -= len(chunk)
            self._body_done = not chunk or self._upload_left <= 0
            return {"type": "http.request", "body": chunk, "more_body": not self._body_done}
        if not self.response.complete and not self.cancelled:
            await self._disconnected.wait()
        return {"type": "http.disconnect"}

    async def send(self, message: Message) -> None:
        if self.cancelled or self.ended:
            raise ClientDisconnected("the client is gone")
        kind = message.get("type")
        response = self.response
        if kind == "http.response.start":
            response.start(message)
        elif kind == "http.response.body":
            data = response.body(message.get("body", b""), bool(message.get("more_body")))
            if response.complete:
                await self.write(data, last=True, close=response.close)
                self._disconnected.set()  # receive() now answers http.disconnect
            elif data:
                await self.write(data)
        else:
            raise asgi.ProtocolError(f"unexpected message {kind!r} on an HTTP connection")

    async def run(self, app: App) -> None:
        from scale0.worker.wsgi import BadRequest, _open_upload

        event = self.event
        scope = asgi.http_scope(event, self.script_name, self.worker.app_state,
                                self.worker.settings.forwarded)
        try:
            if isinstance(event, m2.UploadDone):
                try:
                    self._upload = _open_upload(event.upload_path, self.worker.settings.upload_dir)
                except BadRequest as exc:
                    log.warning("bad upload on connection %d: %s", event.conn_id, exc.message)
                    await self.write(asgi.error_response(exc.status, exc.message, close=True),
                                     last=True, close=True)
                    return
                self._upload_left = os.fstat(self._upload.fileno()).st_size
            elif m2.streamed_body(event.headers):  # the body follows as BODY pieces
                length = event.header(b"content-length")
                self._body = BodyReader(event.body,
                                        int(length) if length and length.isdigit() else None)
            await app(scope, self.receive, self.send)
        except ClientDisconnected:
            pass
        except BodyError as exc:  # the pieces do not make the declared body
            log.warning("bad streamed body on connection %d: %s", event.conn_id, exc)
            if not self.response.headers_sent and not self.ended and not self.cancelled:
                with contextlib.suppress(ClientDisconnected):
                    await self.write(asgi.error_response(exc.status_hint, str(exc), close=True),
                                     last=True, close=True)
        except Exception:
            if not self.cancelled:
                log.exception("ASGI app failed on %s %s", scope["method"], scope["path"])
            if not self.response.headers_sent and not self.ended and not self.cancelled:
                with contextlib.suppress(ClientDisconnected):
                    await self.write(asgi.error_response(500, "Internal Server Error",
                                                         close=self.response.request_close),
                                     last=True, close=self.response.request_close)
        finally:
            if not self.ended and not self.cancelled and not self.response.started:
                log.error("ASGI app returned without a response on %s", scope["path"])
                with contextlib.suppress(ClientDisconnected):
                    await self.write(asgi.error_response(500, "Internal Server Error"),
                                     last=True)
            # A response cut short (an error after the headers, or no last body)
            # can only be ended by closing the connection.
            self.end(close=True)
            if self._upload is not None:
                self._upload.close()
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(self._upload.name)


class _WebSocket(_Conn):
    websocket = True

    def __init__(self, *args: Any, **kw: Any) -> None:
        super().__init__(*args, **kw)
        self.state = "connecting"  # -> "open" -> "closed"
        self.events: asyncio.Queue[Message] = asyncio.Queue()
        self.events.put_nowait({"type": "websocket.connect"})
        self._parts: list[bytes] = []
        self._parts_size = 0
        self._parts_text = False
        self._close_code = asgi.CLOSE_ABNORMAL
        self.offered: list[str] = []
        self._writes: list[asyncio.Task[None]] = []  # frames written on the app's behalf

    def _later(self, coro: Coroutine[Any, Any, None]) -> None:
        self._writes = [t for t in self._writes if not t.done()]
        self._writes.append(self.worker.spawn(coro))

    async def receive(self) -> Message:
        if self.state == "closed" and self.events.empty():
            return {"type": "websocket.disconnect", "code": self._close_code}
        return await self.events.get()

    def _gone(self, code: int, reason: str = "") -> None:
        """The connection is over for the app: it gets websocket.disconnect."""
        if self.state != "closed":
            self.state = "closed"
            self._close_code = code
            self.events.put_nowait({"type": "websocket.disconnect", "code": code,
                                    "reason": reason})

    async def _close(self, code: int, reason: str = "") -> None:
        """Send a close frame, end the request and close the TCP connection.
        The client's close answer is not awaited: Mongrel2 writes the frame,
        then closes (RFC 6455 7.1.1 lets the server close the TCP first)."""
        self._gone(code, reason)
        with contextlib.suppress(ClientDisconnected):
            await self.write(asgi.close_frame(code, reason), last=True, close=True)

    async def send(self, message: Message) -> None:
        kind = message.get("type")
        if self.cancelled or self.ended or (self.state == "closed"
                                            and kind != "websocket.close"):
            raise ClientDisconnected("the WebSocket is closed")
        if kind == "websocket.accept":
            if self.state != "connecting":
                raise asgi.ProtocolError("websocket.accept after the handshake")
            accept = asgi.accept_message(message, self.offered)
            self.state = "open"
            await self.write(asgi.handshake_response(self.event.body, accept))
        elif kind == "websocket.send":
            if self.state != "open":
                raise asgi.ProtocolError("websocket.send before websocket.accept")
            text, data = message.get("text"), message.get("bytes")
            if text is not None:
                if not isinstance(text, str):
                    raise asgi.ProtocolError("websocket.send text must be a str")
                await self.write(asgi.frame(asgi.OP_TEXT, text.encode("utf-8")))
            elif data is not None:
                if not isinstance(data, bytes):
                    raise asgi.ProtocolError("websocket.send bytes must be bytes")
                await self.write(asgi.frame(asgi.OP_BINARY, data))
            else:
                raise asgi.ProtocolError("websocket.send needs text or bytes")
        elif kind == "websocket.close":
            code = message.get("code", asgi.CLOSE_NORMAL)
            reason = message.get("reason") or ""
            if not asgi.valid_close_code(code) or not isinstance(reason, str):
                raise asgi.ProtocolError(f"invalid close code {code!r} or reason")
            if self.state == "connecting":  # refused before accept: HTTP 403 (ASGI spec)
                self._gone(code, reason)
                await self.write(asgi.error_response(403, "Forbidden", close=True),
                                 last=True, close=True)
            elif self.state == "open":
                await self._close(code, reason)
        else:
            raise asgi.ProtocolError(f"unexpected message {kind!r} on a WebSocket")

    def on_frame(self, event: m2.Message) -> None:
        """A client frame (Mongrel2 FLAGS: FIN bit and opcode, body unmasked)."""
        if self.state != "open" or not isinstance(event, m2.WebSocketFrame):
            return
        op, fin, body = event.flags & 0x0F, bool(event.flags & 0x80), event.body
        if op == asgi.OP_PING:
            self._later(self._quiet(self.write(asgi.frame(asgi.OP_PONG, body))))
        elif op == asgi.OP_PONG:
            pass
        elif op == asgi.OP_CLOSE:
            code, reason = asgi.parse_close(body)
            self._gone(code, reason)
            echo = code if asgi.valid_close_code(code) else asgi.CLOSE_NORMAL
            if code == asgi.CLOSE_NO_STATUS:
                echo = asgi.CLOSE_NO_STATUS  # an empty close is answered empty
            self._later(self._quiet(self.write(asgi.close_frame(echo), last=True,
                                                    close=True)))
        elif op in (asgi.OP_TEXT, asgi.OP_BINARY, asgi.OP_CONT):
            if (op == asgi.OP_CONT) != bool(self._parts):
                # Mongrel2 reassembles fragmented messages itself (seen with 1.12);
                # a stray continuation or an interleaved start is a protocol error.
                self._later(self._close(asgi.CLOSE_PROTOCOL, "bad fragmentation"))
                return
            if op != asgi.OP_CONT:
                self._parts_text = op == asgi.OP_TEXT
            self._parts.append(body)
            self._parts_size += len(body)
            if self._parts_size > self.worker.settings.websocket_max_size:
                self._parts.clear()
                self._later(self._close(asgi.CLOSE_TOO_BIG, "message too big"))
                return
            if fin:
                data = b"".join(self._parts)
                self._parts.clear()
                self._parts_size = 0
                if self._parts_text:
                    try:
                        text = data.decode("utf-8")
                    except UnicodeDecodeError:
                        self._later(self._close(asgi.CLOSE_INVALID_DATA, "invalid UTF-8"))
                        return
                    self.events.put_nowait({"type": "websocket.receive", "text": text})
                else:
                    self.events.put_nowait({"type": "websocket.receive", "bytes": data})
        else:
            self._later(self._close(asgi.CLOSE_PROTOCOL, "unknown opcode"))

    @staticmethod
    async def _quiet(write: Awaitable[None]) -> None:
        with contextlib.suppress(ClientDisconnected):
            await write

    def cancel(self) -> None:
        super().cancel()
        self._gone(asgi.CLOSE_ABNORMAL)

    def shutdown(self) -> None:
        if self.state == "open":
            self._later(self._close(asgi.CLOSE_GOING_AWAY, "server shutting down"))
        else:
            self.cancel()

    async def run(self, app: App) -> None:
        scope = asgi.websocket_scope(self.event, self.script_name, self.worker.app_state,
                                     self.worker.settings.forwarded)
        self.offered = scope["subprotocols"]
        try:
            await app(scope, self.receive, self.send)
        except ClientDisconnected:
            pass
        except Exception:
            if not self.cancelled:
                log.exception("ASGI app failed on WebSocket %s", scope["path"])
            if self.state == "connecting" and not self.ended:
                with contextlib.suppress(ClientDisconnected):
                    await self.write(asgi.error_response(500, "Internal Server Error",
                                                         close=True), last=True, close=True)
            elif self.state == "open":
                await self._close(asgi.CLOSE_INTERNAL)
        finally:
            if not self.ended and not self.cancelled:
                if self.state == "connecting":  # returned without accepting: refused
                    with contextlib.suppress(ClientDisconnected):
                        await self.write(asgi.error_response(403, "Forbidden", close=True),
                                         last=True, close=True)
                elif self.state == "open":
                    await self._close(asgi.CLOSE_NORMAL)
            if self._writes:  # a pong or close echo still being written goes first
                await asyncio.wait(self._writes)
            self.end(close=True)


class AsgiWorker:
    """Serves `app` for the brokers in `settings.connect` until stopped."""

    def __init__(self, app: App, settings: AsgiSettings, *,
                 state: ChildState | None = None) -> None:
        self.app = app
        self.settings = settings
        self.state = state
        self.label = settings.label or f"{socket.gethostname()}:{os.getpid()}"
        self.app_state: dict[str, Any] | None = None  # lifespan "state", copied per request
        self.requests_started = 0
        self.exit_code = 0
        self._links: list[_Link] = []
        self._conns: dict[tuple[int, bytes], _Conn] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._ctx: zmq.asyncio.Context | None = None
        self._stopping = False
        self._stop_event: asyncio.Event | None = None
        self._hello = b""
        self._max_requests = state.max_requests if state is not None else 0

    # ---- entry points ---------------------------------------------------

    def run(self) -> int:
        return asyncio.run(self._main())

    def stop(self) -> None:
        """Graceful stop (signal handlers run it in the loop)."""
        self._stopping = True
        if self._stop_event is not None:
            self._stop_event.set()

    # ---- lifespan -------------------------------------------------------

    async def _lifespan(self) -> Callable[[], Awaitable[None]] | None:
        """Run lifespan.startup; return the shutdown step, or None if the app
        has no lifespan. Raises RuntimeError if the startup failed."""
        if self.settings.lifespan == "off":
            return None
        inbox: asyncio.Queue[Message] = asyncio.Queue()
        loop = asyncio.get_running_loop()
        started: asyncio.Future[str | None] = loop.create_future()
        stopped: asyncio.Future[str | None] = loop.create_future()
        sent_any = False
        self.app_state = {}

        async def receive() -> Message:
            return await inbox.get()

        async def send(message: Message) -> None:
            nonlocal sent_any
            sent_any = True
            kind = message.get("type")
            for name, fut in (("startup", started), ("shutdown", stopped)):
                if kind == f"lifespan.{name}.complete" and not fut.done():
                    fut.set_result(None)
                elif kind == f"lifespan.{name}.failed" and not fut.done():
                    fut.set_result(str(message.get("message", "")) or "failed")

        scope = {"type": "lifespan", "asgi": dict(asgi.ASGI_VERSION), "state": self.app_state}
        task = asyncio.ensure_future(self.app(scope, receive, send))
        inbox.put_nowait({"type": "lifespan.startup"})
        first: list[asyncio.Future[Any]] = [task, started]
        await asyncio.wait(first, return_when=asyncio.FIRST_COMPLETED)
        if not started.done():
            exc = task.exception() if not task.cancelled() else None
            if sent_any or self.settings.lifespan == "on":
                raise RuntimeError(f"lifespan startup failed: {exc!r}")
            log.info("the app does not support the lifespan protocol (%r): running without",
                     exc)
            self.app_state = None
            return None
        failure = started.result()
        if failure is not None:
            raise RuntimeError(f"lifespan startup failed: {failure}")

        async def shutdown() -> None:
            inbox.put_nowait({"type": "lifespan.shutdown"})
            last: list[asyncio.Future[Any]] = [task, stopped]
            done, _ = await asyncio.wait(last, timeout=self.settings.graceful_timeout_s,
                                         return_when=asyncio.FIRST_COMPLETED)
            if stopped.done() and stopped.result() is not None:
                log.error("lifespan shutdown failed: %s", stopped.result())
            elif not done:
                log.error("lifespan shutdown did not finish in time")
            if not task.done():
                task.cancel()
                with contextlib.suppress(BaseException):
                    await task

        return shutdown

    # ---- the loop ---------------------------------------------------------

    async def _main(self) -> int:
        s = self.settings
        loop = asyncio.get_running_loop()
        self._stop_event = asyncio.Event()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, self.stop)
        try:
            shutdown = await self._lifespan()
        except Exception as exc:
            log.error("%s: not serving", exc)
            return BOOT_FAILED
        self._hello = p.Hello(s.services, s.concurrency, self.label, int(s.heartbeat_s * 1000),
                              {"pid": str(os.getpid()), "interface": "asgi",
                               # It takes streamed bodies: BODY in, READ out (protocol.md 4.5).
                               "bodies": "stream",
                               # It opens Mongrel2's spooled files itself (protocol.md 4.5).
                               **({"uploads": "file"} if s.upload_dir else {})},
                              (p.FEATURE_WEBSOCKET,)).encode()
        self._ctx = zmq.asyncio.Context()
        self._links = [_Link(i, ep) for i, ep in enumerate(s.connect)]
        timer = loop.create_task(self._timer())
        try:
            if self._stopping:
                self._stop_event.set()
            await self._stop_event.wait()
            if not self.exit_code:
                await self._drain()
        finally:
            timer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await timer
            await self._leave()
            if shutdown is not None:
                await shutdown()
            for link in self._links:
                if link.socket is not None and link.welcomed:
                    self.send(link, [p.CMD[p.Command.BYE]])
                self._close_link(link)
            self._ctx.destroy(linger=500)
        return self.exit_code

    async def _drain(self) -> None:
        log.info("draining: %d requests in flight", len(self._conns))
        for link in self._links:
            self.send(link, [p.CMD[p.Command.DRAIN]])
        deadline = time.monotonic() + self.settings.graceful_timeout_s
        while time.monotonic() < deadline:
            if not self._conns and all(b.drain_acked or not b.welcomed for b in self._links):
                return
            await asyncio.sleep(TICK_S)

    async def _leave(self) -> None:
        """End what is still in flight: WebSockets get 1001, requests a cancel."""
        conns = list(self._conns.values())
        if not conns:
            return
        log.info("leaving with %d requests and WebSockets in flight", len(conns))
        for conn in conns:
            conn.shutdown()
        tasks = [t for t in self._tasks if not t.done()]
        if tasks:
            _, pending = await asyncio.wait(tasks, timeout=1.0)
            for task in pending:
                task.cancel()
            if pending:
                await asyncio.wait(pending, timeout=1.0)
        for conn in list(self._conns.values()):
            conn.end(close=True)
        self._conns.clear()

    async def _timer(self) -> None:
        started = next_report = time.monotonic()
        while True:
            now = time.monotonic()
            if self.state is not None and now >= next_report:
                next_report = now + REPORT_EVERY_S
                self._report(self.state, now, now - started >= READY_WAIT_S)
            for link in self._links:
                self._keep_alive(link, now)
            if self.exit_code and self._stop_event is not None:
                self._stop_event.set()
            await asyncio.sleep(TICK_S)

    def _report(self, state: ChildState, now: float, waited: bool) -> None:
        oldest = 0.0
        for conn in self._conns.values():
            flow = conn.flow
            # A WebSocket lives as long as its client: only HTTP requests can be stuck.
            if not conn.websocket and not flow.blocked and (not oldest
                                                            or flow.progress_s < oldest):
                oldest = flow.progress_s
        state.beat(now, oldest)
        links = self._links
        if not state.ready and not self._stopping and (
                all(b.welcomed for b in links) or (waited and any(b.welcomed for b in links))):
            state.set_ready()

    def _keep_alive(self, link: _Link, now: float) -> None:
        s = self.settings
        if link.socket is None:
            if now < link.retry_at:
                return
            assert self._ctx is not None
            sock = self._ctx.socket(zmq.DEALER)
            sock.setsockopt(zmq.LINGER, 500)
            sock.setsockopt(zmq.SNDHWM, 0)  # a LAST is never dropped (see worker/process.py)
            if self.settings.curve is not None:  # CURVE client of the broker
                self.settings.curve.client_socket(sock)
            sock.connect(link.endpoint)
            link.socket = sock
            link.welcomed = link.drain_acked = False
            link.last_seen = now
            link.reader = asyncio.get_running_loop().create_task(self._read(link, sock))
            self.send(link, [p.CMD[p.Command.HELLO], self._hello])
            link.next_heartbeat = now + s.heartbeat_s
            return
        if now - link.last_seen > s.heartbeat_s * s.liveness:
            log.warning("broker %s silent for %.1fs: reconnecting", link.endpoint,
                        now - link.last_seen)
            self._disconnect(link, retry_at=now + link.backoff_s)
            link.backoff_s = min(link.backoff_s * 2, s.reconnect_max_s)
            return
        if now >= link.next_heartbeat:
            link.next_heartbeat = now + s.heartbeat_s
            self.send(link, [p.CMD[p.Command.HEARTBEAT]])

    def _close_link(self, link: _Link) -> None:
        if link.reader is not None:
            link.reader.cancel()
            link.reader = None
        if link.socket is not None:
            link.socket.close(0)
            link.socket = None

    def _disconnect(self, link: _Link, *, retry_at: float) -> None:
        """Drop the link; its broker gave up its requests, so they are cancelled."""
        self._close_link(link)
        link.welcomed = link.drain_acked = False
        link.retry_at = retry_at
        for (index, _), conn in list(self._conns.items()):
            if index == link.index:
                conn.cancel()

    def send(self, link: _Link, frames: list[bytes]) -> None:
        sock = link.socket
        if sock is not None:
            try:
                # No HWM: it never blocks, so the future is done at once; a failure
                # would be set on it rather than raised.
                sent = sock.send_multipart([p.VERSION, *frames], flags=zmq.NOBLOCK)
            except zmq.ZMQError as exc:
                log.warning("broker %s not accepting messages: %s", link.endpoint, exc)
                return
            asyncio.ensure_future(sent).add_done_callback(
                functools.partial(_log_send_failure, link.endpoint))

    async def _read(self, link: _Link, sock: zmq.asyncio.Socket) -> None:
        while True:
            try:
                frames = await sock.recv_multipart()
            except zmq.ZMQError:
                return  # closed under us (reconnect or exit)
            if link.socket is not sock:
                return
            try:
                self._on_broker(link, frames)
            except Exception:
                log.exception("failed to handle a message from broker %s", link.endpoint)

    def _on_broker(self, link: _Link, frames: list[bytes]) -> None:
        link.last_seen = now = time.monotonic()
        if len(frames) < 2 or frames[0] != p.VERSION or len(frames[1]) != 1:
            log.warning("malformed message from broker %s", link.endpoint)
            return
        command = frames[1][0]
        if command == p.Command.FRAME and len(frames) == 4:
            conn = self._conns.get((link.index, frames[2]))
            if conn is not None:
                try:
                    conn.on_frame(m2.parse_message(frames[3]))
                except m2.Mongrel2ProtocolError as exc:
                    log.warning("unparseable frame from broker: %s", exc)
        elif command == p.Command.REQUEST and len(frames) in (6, 7):
            window = frames[6] if len(frames) == 7 else None
            self._start(link, frames[2], frames[4], frames[5], window, now)
        elif command == p.Command.CREDIT and len(frames) == 4:
            conn = self._conns.get((link.index, frames[2]))
            if conn is not None and frames[3].isdigit():
                conn.flow.grant(int(frames[3]))
        elif command == p.Command.CANCEL and len(frames) == 3:
            conn = self._conns.get((link.index, frames[2]))
            if conn is not None:
                conn.cancel()
        elif command == p.Command.BODY and len(frames) == 5:
            conn = self._conns.get((link.index, frames[2]))
            if conn is not None:
                conn.on_body(frames[4], frames[3] == p.BODY_END)
        elif command == p.Command.HEARTBEAT:
            pass
        elif command == p.Command.WELCOME:
            link.welcomed = True
            link.backoff_s = 0.5
            log.info("connected to broker %s", link.endpoint)
            if self.state is not None and not self.state.ready:
                self._report(self.state, now, waited=False)
            if self._stopping:
                self.send(link, [p.CMD[p.Command.DRAIN]])
        elif command == p.Command.BYE:
            self._disconnect(link, retry_at=0.0)
        elif command == p.Command.DRAIN:
            if self._stopping:
                link.drain_acked = True
            elif self.state is not None:
                log.info("broker %s asks us to leave: retiring", link.endpoint)
                self.state.ask_retire()
            else:
                self.stop()
        elif command == p.Command.ERROR:
            text = frames[3].decode("utf-8", "replace") if len(frames) > 3 else ""
            log.error("broker %s refused us: %s", link.endpoint, text)
            if not link.welcomed:
                self.exit_code = 3
        else:
            log.warning("unexpected command %#x from broker %s", command, link.endpoint)

    def _start(self, link: _Link, rid: bytes, script_name: bytes, raw: bytes,
               window: bytes | None, now: float) -> None:
        self.requests_started += 1
        if self._max_requests and self.requests_started >= self._max_requests:
            assert self.state is not None
            self.state.ask_retire()
        try:
            event = m2.parse_message(raw)
        except m2.Mongrel2ProtocolError as exc:
            log.warning("unparseable request from broker: %s", exc)
            self.send(link, [p.CMD[p.Command.REPLY], rid, p.FLAG_LAST])
            return
        kind: type[_Conn]
        if isinstance(event, (m2.HttpRequest, m2.UploadDone)):
            kind = _Http
        elif isinstance(event, m2.WebSocketHandshake):
            kind = _WebSocket
        else:
            self.send(link, [p.CMD[p.Command.REPLY], rid, p.FLAG_LAST])
            return
        conn = kind(self, link, rid, event, script_name.decode("latin-1"), now, window)
        key = (link.index, rid)
        self._conns[key] = conn

        async def run() -> None:
            try:
                await conn.run(self.app)
            finally:
                conn.end(close=True)
                if self._conns.get(key) is conn:
                    del self._conns[key]

        self.spawn(run())

    def spawn(self, coro: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        """A task of a request or WebSocket, kept referenced until it is done."""
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task


def _log_send_failure(endpoint: str, sent: asyncio.Future[Any]) -> None:
    if not sent.cancelled() and sent.exception() is not None:
        log.warning("broker %s not accepting messages: %s", endpoint, sent.exception())


def event_loop_policy() -> str:
    """Which loop runs the worker: uvloop when installed (SCALE0_LOOP=asyncio to opt out)."""
    if os.environ.get("SCALE0_LOOP", "auto") == "asyncio":
        return "asyncio"
    try:
        import uvloop  # type: ignore[import-not-found,unused-ignore]
    except ImportError:
        return "asyncio"
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    return "uvloop"
