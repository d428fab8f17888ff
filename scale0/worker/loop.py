"""One worker loop: a thread, a DEALER per broker, the app run inline.

Theory of operation: each of a process's `--threads` loops is a worker of
capacity 1 to every broker (its own HELLO, label ``host:pid/k``). A loop
polls its sockets, reads each readable one until it is empty, runs a REQUEST's
handler on its own thread (worker/request.py) and sends the reply frames
straight on the DEALER the request came in on: no hand-off between threads
per request. With several brokers a loop may hold one request from each; it
runs them in arrival order.

Each broker session is a `BrokerConn`: the sans-IO `BrokerLink` of
worker/link.py (HELLO, WELCOME, heartbeats, expiry and backoff, DRAIN, BYE;
docs/protocol.md 4.1) with this loop's DEALER. The loop owns the sockets and
the clock: it feeds the link the broker's messages and the time, sends what
the link queues, opens and closes the socket when told, and looks up what a
message asks of it (a REQUEST, CANCEL, CREDIT, BODY...) in `_handlers`.

The loop holds its `lock` whenever it touches its sockets, and releases it
only while the app runs. The process's heartbeat thread (worker/process.py) takes the
lock then, and only then, to send HEARTBEATs on the loop's sockets, so a
broker does not expire a loop whose app runs for minutes, and to read what
came meanwhile (a RECALL of a request waiting behind the app's, a CANCEL). A lock is a full
memory barrier, which is what ZeroMQ asks of a socket that moves between
threads. The app's sends take the lock too (worker/reply.py).

Timers (the links' reconnect, expiry and heartbeats; drain) run only right after
the sockets were read to empty, so a broker's messages queued while the app
ran count before its silence is judged.
"""

from __future__ import annotations

import logging
import math
import signal
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING

import zmq
from zmq.backend import zmq_poll

from scale0.net.frames import recv_frames, send_frames
from scale0.wire import s0w1 as p
from scale0.worker.link import BrokerLink, Inbound, LinkSettings, Op
from scale0.worker.reply import ReplyStream
from scale0.worker.request import Pending, run_request

if TYPE_CHECKING:
    from scale0.worker.process import Worker

log = logging.getLogger(__name__)

TICK_S = 0.25  # at most this long between timer runs (and stop checks) when idle
DETACH_AFTER_S = 1.0  # a request running this long makes its loop leave the other brokers

_POLLIN = zmq.POLLIN
_RETURN = p.CMD[p.Command.RETURN]
_SIGNALS = {signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGCHLD}


class BrokerConn(BrokerLink):
    """One loop's session with one broker: the link's logic (worker/link.py,
    docs/protocol.md 4.1) and the DEALER this loop drives it on."""

    __slots__ = ("socket",)

    def __init__(self, endpoint: str, hello: bytes, settings: LinkSettings) -> None:
        super().__init__(endpoint, hello, settings)
        self.socket: zmq.Socket[bytes] | None = None


class Loop:
    """Serves requests for one slot of a Worker process (see the module docstring)."""

    def __init__(self, worker: Worker, index: int, hello: bytes) -> None:
        s = worker.settings
        self.worker = worker
        self.index = index
        self.hello = hello
        self.lock = threading.Lock()
        link = LinkSettings(s.heartbeat_s, s.liveness, s.reconnect_max_s, s.curve is not None)
        self.conns = [BrokerConn(ep, hello, link) for ep in s.connect]
        # What a broker message asks of us (BrokerLink.receive) -> its handler.
        self._handlers: dict[Inbound, Callable[[BrokerConn, list[bytes]], None]] = {
            Inbound.REQUEST: self._on_request,
            Inbound.CANCEL: self._on_cancel,
            Inbound.RECALL: self._on_recall,
            Inbound.CREDIT: self._on_credit,
            Inbound.BODY: self._on_body,
            Inbound.WELCOMED: self._on_welcomed,
            Inbound.LOST: self._on_lost,
            Inbound.REFUSED: self._on_refused,
            Inbound.DRAIN_ASKED: self._on_drain_asked,
        }
        self._items: list[tuple[zmq.Socket[bytes] | int, int]] = []
        self._by_socket: dict[object, BrokerConn] = {}  # keyed as zmq_poll answers
        self.pending: deque[Pending] = deque()
        self.current: ReplyStream | None = None  # the request whose app runs now
        self.current_since = 0.0  # when it started
        self.alive_s = 0.0  # last time the loop ran (read by the heartbeat thread)
        self.drain_started = 0.0
        self.next_timer = 0.0  # when _timers runs next; a WELCOME may bring it forward
        self.closed = False  # sockets closed: by the loop at its end, or forcibly
        self.thread = threading.Thread(target=self.run, name=f"scale0-loop-{index}",
                                       daemon=True)

    # ---- the loop ------------------------------------------------------

    def run(self) -> None:
        # Signals go to the main thread (the heartbeat thread) only: a loop's
        # poll is then never interrupted, and Python runs handlers there anyway.
        signal.pthread_sigmask(signal.SIG_BLOCK, _SIGNALS)
        with self.lock:
            try:
                self._serve()
            except Exception:
                log.exception("worker loop %d failed", self.index)
                self.worker.fail(1)
            finally:
                self.close_locked()
                self.worker.done.wake()  # the heartbeat thread: maybe the last loop

    def _serve(self) -> None:
        worker = self.worker
        stop = worker.runloop.stop  # graceful, then forced (pool/runloop.py)
        graceful_s = worker.settings.graceful_timeout_s
        while not self.closed:
            now = time.monotonic()
            timeout_ms = (0 if self.pending
                          else max(0, math.ceil((self.next_timer - now) * 1000)))
            self._read(timeout_ms)
            now = time.monotonic()
            if now >= self.next_timer or (stop.requests and not self.drain_started):
                self.next_timer = self._timers(now)
                if worker.exit_code:
                    return
                if self.drain_started and (stop.forced or (not self.pending and (
                        all(c.drained for c in self.conns)
                        or now - self.drain_started > graceful_s))):
                    return
            if self.pending:
                run_request(self, self.pending.popleft())

    def _read(self, timeout_ms: int) -> None:
        """Wait up to `timeout_ms` for input, then read every readable socket
        until it is empty. The lock is held."""
        items = self._items
        if not items:
            if timeout_ms:
                self.lock.release()  # nothing to poll: sleep without the lock
                try:
                    time.sleep(timeout_ms / 1000)
                finally:
                    self.lock.acquire()
            return
        for polled, _ in zmq_poll(items, timeout_ms):
            conn = self._by_socket.get(polled)
            sock = conn.socket if conn is not None else None
            if conn is None or sock is None:
                if polled == self.worker.runloop.fileno() and not self.worker.stopping:
                    # Not a stop (another handler's signal): empty it, or poll spins.
                    # A stop writes after it is requested, so none is lost here.
                    self.worker.runloop.drain()
                continue
            while True:
                try:
                    frames = recv_frames(sock)
                except zmq.Again:
                    break
                self._on_message(conn, frames)
                # zmq_poll is the cheapest "more?" (ZMQ_EVENTS costs more, Again more still)
                if conn.socket is not sock or not zmq_poll([(sock, _POLLIN)], 0):
                    break

    def read_now(self) -> None:
        """Read whatever is queued, without waiting (from the app's sends)."""
        if self._items:
            self._read(0)

    def wait_io(self) -> None:
        """Wait for input once, keeping timers going: a request waiting for
        credits calls this in a loop (worker/reply.py). The lock is held."""
        now = time.monotonic()
        self._read(math.ceil(min(TICK_S, self._heartbeat_due(now)) * 1000))
        self.next_timer = self._timers(time.monotonic())

    def _heartbeat_due(self, now: float) -> float:
        due = [c.next_heartbeat - now for c in self.conns if c.connected]
        return max(0.001, min(due, default=TICK_S))

    def _timers(self, now: float) -> float:
        """Stop, then each link's timers (worker/link.py); returns when to run again."""
        self.alive_s = now
        worker = self.worker
        if worker.stopping and not self.drain_started:
            self.drain_started = now
            self._sockets_changed()  # the wake-up pipe stays readable: poll it no more
            for c in self.conns:
                c.drain()
                self._flush(c)
        if self.drain_started and self.current is not None and (
                worker.runloop.stop.forced
                or now - self.drain_started > worker.settings.graceful_timeout_s):
            self.current.cancelled = True  # waiting for credits past the graceful timeout
        self.detach_others_locked(now)  # a long download waits for credits here
        # A detached broker is dialled again once the long request is over (not when leaving).
        hold = self.current is not None or bool(self.drain_started)
        next_timer = now + TICK_S
        for c in self.conns:
            op, due = c.tick(now, hold=hold)
            self._apply(c, op)
            next_timer = min(next_timer, due)
        return next_timer

    def heartbeat_locked(self, now: float) -> None:
        """From the heartbeat thread, lock held, while the app runs: HEARTBEAT
        every broker that is due one, and read what has come meanwhile, so a
        RECALL of a request waiting behind this one (docs/protocol.md 4.6), or
        a CANCEL of this one, does not wait for the app to return."""
        for c in self.conns:
            c.beat(now)
            if c.outbox:
                self._flush(c)
        self.read_now()
        self.detach_others_locked(now)

    def detach_others_locked(self, now: float) -> None:
        """A loop is a worker of capacity 1 at every broker, so while it runs
        one broker's request another broker may send it one more, which waits
        behind it. Once a request has run DETACH_AFTER_S, leave the other
        brokers (BYE: a request one of them had just sent is retried there,
        or answered 502) and come back when it is over. Lock held."""
        current = self.current
        if current is None or now - self.current_since < DETACH_AFTER_S:
            return
        for c in self.conns:
            if c is not current.conn and c.connected:
                log.debug("loop %d leaves broker %s while a long request runs",
                          self.index, c.endpoint)
                self._apply(c, c.detach())

    # ---- sockets -------------------------------------------------------

    def _apply(self, c: BrokerConn, op: Op) -> None:
        """Carry out a link's call: open its socket, send its outbox, close it."""
        if op is Op.OPEN:
            self._open(c)
        if c.outbox:
            self._flush(c)
        if op is Op.CLOSE:
            self._drop(c)

    def _open(self, c: BrokerConn) -> None:
        s = self.worker.settings
        sock = self.worker.ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 500)
        # No high-water mark: a reply (a LAST above all) is never dropped
        # while the broker is connected. Memory stays bounded by the flow
        # window (at most 8 messages per request) and one request per loop.
        sock.setsockopt(zmq.SNDHWM, 0)
        if s.curve is not None:  # CURVE client of the broker (auth/keys.py)
            s.curve.client_socket(sock)
        sock.connect(c.endpoint)
        c.socket = sock
        self._sockets_changed()

    def _drop(self, c: BrokerConn) -> None:
        """Close the socket of a link that was lost or left. Its requests are
        cancelled: the broker that sent them has given them up (or is gone)."""
        if c.socket is not None:
            c.socket.close(0)
        c.socket = None
        self._sockets_changed()
        current = self.current
        if current is not None and current.conn is c:
            current.cancelled = True
        if any(r.conn is c for r in self.pending):
            self.pending = deque(r for r in self.pending if r.conn is not c)

    def _sockets_changed(self) -> None:
        items: list[tuple[zmq.Socket[bytes] | int, int]] = [
            (c.socket, _POLLIN) for c in self.conns if c.socket is not None]
        wake_fd = self.worker.runloop.fileno()
        if not self.drain_started and not self.closed and wake_fd >= 0:
            items.append((wake_fd, _POLLIN))  # stop() wakes us at once
        self._items = items
        self._by_socket = {c.socket: c for c in self.conns if c.socket is not None}

    def _flush(self, c: BrokerConn) -> None:
        """Send what the link queued (lock held)."""
        for frames in c.outbox:
            self.send(c, frames)
        c.outbox.clear()

    def send(self, c: BrokerConn, frames: list[bytes]) -> None:
        """Send now on `c` (lock held); a message to a lost broker is dropped."""
        if c.socket is not None:
            try:
                send_frames(c.socket, frames)
            except zmq.Again:
                log.warning("broker %s not accepting messages", c.endpoint)

    def close_locked(self, bye: bool = True) -> None:
        """BYE to welcomed brokers, close every socket (lock held). Idempotent."""
        if self.closed:
            return
        self.closed = True
        if self.current is not None:
            self.current.cancelled = True
        for c in self.conns:
            c.close()
            if bye:
                self._flush(c)
            c.outbox.clear()
            if c.socket is not None:
                c.socket.close()  # LINGER 500: the BYE and late LASTs get out
                c.socket = None
        self._sockets_changed()

    # ---- broker messages: the link (worker/link.py) takes them, then this table ----

    def _on_message(self, c: BrokerConn, frames: list[bytes]) -> None:
        event = c.receive(frames, time.monotonic())
        if c.outbox:
            self._flush(c)
        handle = self._handlers.get(event)
        if handle is not None:
            handle(c, frames)
        elif event is not Inbound.NONE:  # FRAME: this worker takes no WebSockets
            log.warning("unexpected command %#x from broker %s", frames[1][0], c.endpoint)

    def _on_request(self, c: BrokerConn, frames: list[bytes]) -> None:
        self.pending.append(Pending(c, frames[2], frames[4], frames[5],
                                    frames[6] if len(frames) == 7 else None))

    def _on_recall(self, c: BrokerConn, frames: list[bytes]) -> None:
        """The broker wants a request that waits here back (docs/protocol.md 4.6):
        RETURN it if it has not started; one that runs (or ran) is not ours to give."""
        rid = frames[2]
        for r in self.pending:
            if r.conn is c and r.rid == rid:
                if not r.cancelled:  # a cancelled one ends with its LAST, as always
                    self.pending.remove(r)
                    self.send(c, [p.VERSION, _RETURN, rid])
                return

    def _on_credit(self, c: BrokerConn, frames: list[bytes]) -> None:
        current = self.current
        if (current is not None and current.conn is c and current.rid == frames[2]
                and current.flow is not None):
            current.flow.grant(int(frames[3]))  # a count: BrokerLink.receive checked it

    def _on_cancel(self, c: BrokerConn, frames: list[bytes]) -> None:
        rid = frames[2]
        current = self.current
        if current is not None and current.conn is c and current.rid == rid:
            current.cancelled = True  # the app's next send raises Cancelled
            return
        for r in self.pending:
            if r.conn is c and r.rid == rid:
                r.cancelled = True

    def _on_body(self, c: BrokerConn, frames: list[bytes]) -> None:
        current = self.current  # pieces come only for the request that asked (READ)
        if (current is not None and current.conn is c and current.rid == frames[2]
                and current.body is not None):
            current.body.feed(frames[4], frames[3] == p.BODY_END)

    def _on_welcomed(self, c: BrokerConn, frames: list[bytes]) -> None:
        self.next_timer = min(self.next_timer, c.next_heartbeat)  # WELCOME may shorten it
        log.info("loop %d connected to broker %s", self.index, c.endpoint)
        self.worker.on_welcome()

    def _on_lost(self, c: BrokerConn, frames: list[bytes]) -> None:
        self._drop(c)  # the broker does not know us: HELLO again at the next timer

    def _on_refused(self, c: BrokerConn, frames: list[bytes]) -> None:
        self.worker.fail(3)  # a HELLO that is refused will be refused again

    def _on_drain_asked(self, c: BrokerConn, frames: list[bytes]) -> None:
        self.worker.on_drain(self, c)
