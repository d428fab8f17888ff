"""ASGI worker runtime: one asyncio loop speaks S0W1 to the brokers and runs the app.

Theory of operation
-------------------
One event loop owns everything: a `zmq.asyncio` DEALER per broker (a reader
task each), a timer task (the links' timers, reports to the arbiter), and
one task per request or WebSocket (a cycle: worker/asgi_http.py,
worker/asgi_websocket.py). Each broker session is a `BrokerLink`
(worker/link.py), the sans-IO S0W1 session the WSGI worker's loops drive
too (docs/protocol.md 4.1): HELLO on connect, WELCOME makes it ready, a
silent broker is dropped and dialled again (0.5 s doubling to 10 s), a
broker's BYE redials at once, an ERROR before WELCOME exits with status 3.
What the link hands back about a request (REQUEST, CANCEL, CREDIT, BODY,
FRAME) is looked up in `_handlers`; exactly one LAST goes back per REQUEST,
and a CANCEL, or the loss of its broker, cancels a request's cycle.

Capacity: HELLO announces `concurrency` slots; the broker never sends more.
A WebSocket holds its slot from its handshake to its close. The worker
announces the `websocket` feature, so brokers send it handshakes and the
FRAMEs of its accepted connections (docs/protocol.md section 12), and
``bodies=stream``, so they stream request bodies to it (section 4.5).

Lifespan (worker/asgi_lifespan.py): `lifespan.startup` runs before the first
HELLO; a failed startup exits with supervise.BOOT_FAILED (the pool does not
respawn it). `lifespan.shutdown` runs on a graceful stop, after the requests.

Stopping (SIGTERM, SIGINT or a broker's DRAIN without an arbiter): DRAIN to
every broker; leave when nothing is in flight and every welcomed broker
acked, or after the graceful timeout: WebSockets still open then are closed
with 1001 (going away), requests still running are cancelled. Then the
lifespan shutdown and BYE.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any

import zmq
import zmq.asyncio

from scale0.auth.keys import CurveKeys
from scale0.config import AsgiConfig, default
from scale0.core.forwarded import LOOPBACK, Trust
from scale0.pool.childstate import ChildState
from scale0.pool.runloop import Stop
from scale0.pool.supervise import BOOT_FAILED
from scale0.wire import mongrel2 as m2
from scale0.wire import s0w1 as p
from scale0.worker import asgi_lifespan
from scale0.worker.asgi_cycle import App, Cycle
from scale0.worker.asgi_http import HttpCycle
from scale0.worker.asgi_link import AsgiLink
from scale0.worker.asgi_websocket import WebSocketCycle
from scale0.worker.link import Inbound, LinkSettings, Op

log = logging.getLogger(__name__)

REPORT_EVERY_S = 0.25
READY_WAIT_S = 5.0
TICK_S = 0.1


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
        self._links: list[AsgiLink] = []
        self._conns: dict[tuple[int, bytes], Cycle] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._ctx: zmq.asyncio.Context | None = None
        self._stop = Stop()  # graceful, then forced (pool/runloop.py)
        self._stop_event: asyncio.Event | None = None
        self._max_requests = state.max_requests if state is not None else 0
        # What a broker message asks of us (BrokerLink.receive) -> its handler.
        self._handlers: dict[Inbound, Callable[[AsgiLink, list[bytes]], None]] = {
            Inbound.REQUEST: self._on_request,
            Inbound.FRAME: self._on_frame,
            Inbound.CREDIT: self._on_credit,
            Inbound.CANCEL: self._on_cancel,
            Inbound.BODY: self._on_body,
            Inbound.WELCOMED: self._on_welcomed,
            Inbound.LOST: self._drop,
            Inbound.REFUSED: self._on_refused,
            Inbound.DRAIN_ASKED: self._on_drain_asked,
        }

    # ---- entry points ---------------------------------------------------

    def run(self) -> int:
        return asyncio.run(self._main())

    @property
    def _stopping(self) -> bool:
        return self._stop.stopping

    def stop(self, force: bool | None = False) -> None:
        """Stop: DRAIN, finish what is in flight (up to the graceful timeout),
        BYE. `force`, or with None a second call (the second SIGTERM or SIGINT,
        whose handlers run it in the loop), ends what is in flight now."""
        self._stop.request(force)
        if self._stop_event is not None:
            self._stop_event.set()

    # ---- the loop ---------------------------------------------------------

    def _hello(self) -> bytes:
        s = self.settings
        return p.Hello(s.services, s.concurrency, self.label, int(s.heartbeat_s * 1000),
                       {"pid": str(os.getpid()), "interface": "asgi",
                        # It takes streamed bodies: BODY in, READ out (protocol.md 4.5).
                        "bodies": "stream",
                        # It opens Mongrel2's spooled files itself (protocol.md 4.5).
                        **({"uploads": "file"} if s.upload_dir else {})},
                       (p.FEATURE_WEBSOCKET,)).encode()

    async def _main(self) -> int:
        s = self.settings
        loop = asyncio.get_running_loop()
        self._stop_event = asyncio.Event()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, self.stop, None)
        try:
            self.app_state, shutdown = await asgi_lifespan.startup(self.app, s.lifespan,
                                                                   s.graceful_timeout_s)
        except Exception as exc:
            log.error("%s: not serving", exc)
            return BOOT_FAILED
        self._ctx = zmq.asyncio.Context()
        hello = self._hello()
        link_settings = LinkSettings(s.heartbeat_s, s.liveness, s.reconnect_max_s,
                                     s.curve is not None)
        self._links = [AsgiLink(i, ep, hello, link_settings) for i, ep in enumerate(s.connect)]
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
                link.close()  # BYE if welcomed
                link.flush()
                link.close_socket()
            self._ctx.destroy(linger=500)
        return self.exit_code

    async def _drain(self) -> None:
        log.info("draining: %d requests in flight", len(self._conns))
        for link in self._links:
            link.drain()
            link.flush()
        self._stop.begin(time.monotonic(), self.settings.graceful_timeout_s)
        while not self._stop.overdue(time.monotonic()):  # forced: at once
            if not self._conns and all(link.drained for link in self._links):
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
                self._apply(link, link.tick(now)[0])
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

    # ---- the links' sockets (worker/asgi_link.py) ------------------------------

    def _apply(self, link: AsgiLink, op: Op) -> None:
        """Carry out a link's call: open its socket, send its outbox, close it."""
        if op is Op.OPEN:
            assert self._ctx is not None
            link.open(self._ctx, self.settings.curve, self._on_broker)
        if link.outbox:
            link.flush()
        if op is Op.CLOSE:
            self._drop(link)

    def _drop(self, link: AsgiLink, frames: list[bytes] | None = None) -> None:
        """The link was lost (silence, or the broker's BYE): close its socket.
        Its broker gave up its requests, so they are cancelled."""
        link.close_socket()
        for (index, _), conn in list(self._conns.items()):
            if index == link.index:
                conn.cancel()

    def send(self, link: AsgiLink, frames: list[bytes]) -> None:
        """Send [COMMAND, *args] to the broker of `link` (a cycle's REPLY or READ)."""
        link.send_frames([p.VERSION, *frames])

    # ---- broker messages: the link (worker/link.py) takes them, then this table ----

    def _on_broker(self, link: AsgiLink, frames: list[bytes]) -> None:
        event = link.receive(frames, time.monotonic())
        if link.outbox:
            link.flush()
        handle = self._handlers.get(event)
        if handle is not None:
            handle(link, frames)

    def _on_frame(self, link: AsgiLink, frames: list[bytes]) -> None:
        conn = self._conns.get((link.index, frames[2]))
        if conn is not None:
            try:
                conn.on_frame(m2.parse_message(frames[3]))
            except m2.Mongrel2ProtocolError as exc:
                log.warning("unparseable frame from broker: %s", exc)

    def _on_request(self, link: AsgiLink, frames: list[bytes]) -> None:
        self._start(link, frames[2], frames[4], frames[5],
                    frames[6] if len(frames) == 7 else None, link.last_seen)

    def _on_credit(self, link: AsgiLink, frames: list[bytes]) -> None:
        conn = self._conns.get((link.index, frames[2]))
        if conn is not None:
            conn.flow.grant(int(frames[3]))  # a count: BrokerLink.receive checked it

    def _on_cancel(self, link: AsgiLink, frames: list[bytes]) -> None:
        conn = self._conns.get((link.index, frames[2]))
        if conn is not None:
            conn.cancel()

    def _on_body(self, link: AsgiLink, frames: list[bytes]) -> None:
        conn = self._conns.get((link.index, frames[2]))
        if conn is not None:
            conn.on_body(frames[4], frames[3] == p.BODY_END)

    def _on_welcomed(self, link: AsgiLink, frames: list[bytes]) -> None:
        log.info("connected to broker %s", link.endpoint)
        if self.state is not None and not self.state.ready:
            self._report(self.state, link.last_seen, waited=False)

    def _on_refused(self, link: AsgiLink, frames: list[bytes]) -> None:
        self.exit_code = 3  # a HELLO that is refused will be refused again

    def _on_drain_asked(self, link: AsgiLink, frames: list[bytes]) -> None:
        if self._stopping:
            link.drain_acked = True  # our DRAIN's answer, come before we sent it
        elif self.state is not None:
            log.info("broker %s asks us to leave: retiring", link.endpoint)
            self.state.ask_retire()
        else:
            self.stop()

    def _start(self, link: AsgiLink, rid: bytes, script_name: bytes, raw: bytes,
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
        kind: type[Cycle]
        if isinstance(event, (m2.HttpRequest, m2.UploadDone)):
            kind = HttpCycle
        elif isinstance(event, m2.WebSocketHandshake):
            kind = WebSocketCycle
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
