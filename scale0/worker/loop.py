"""One worker loop: a thread, a DEALER per broker, the app run inline.

Theory of operation: each of a process's `--threads` loops is a worker of
capacity 1 to every broker (its own HELLO, label ``host:pid/k``). A loop
polls its sockets, reads each readable one until it is empty, runs a REQUEST's
handler on its own thread and sends the reply frames straight on the DEALER
the request came in on: no hand-off between threads per request. With several
brokers a loop may hold one request from each; it runs them in arrival order.

The loop holds its `lock` whenever it touches its sockets, and releases it
only while the app runs. The process's heartbeat thread (worker/process.py) takes the
lock then, and only then, to send HEARTBEATs on the loop's sockets, so a
broker does not expire a loop whose app runs for minutes. A lock is a full
memory barrier, which is what ZeroMQ asks of a socket that moves between
threads. The app's sends take the lock too (worker/reply.py).

Timers (reconnect, broker expiry, heartbeats, drain) run only right after
the sockets were read to empty, so a broker's messages queued while the app
ran count before its silence is judged.
"""

from __future__ import annotations

import json
import logging
import math
import os
import signal
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import zmq
from zmq.backend import zmq_poll

from scale0.core.bodystream import BodyError, BodyInput, BodyReader
from scale0.core.routing import normalize_path, split_script_name
from scale0.net.frames import recv_frames, send_frames
from scale0.wire import mongrel2 as m2
from scale0.wire import s0w1 as p
from scale0.worker.reply import Cancelled, FlowWindow, ReplyStream

if TYPE_CHECKING:
    from scale0.worker.process import Worker

log = logging.getLogger(__name__)

TICK_S = 0.25  # at most this long between timer runs (and stop checks) when idle
DETACH_AFTER_S = 1.0  # a request running this long makes its loop leave the other brokers
BROKER_HEARTBEAT_MS = (10, 600_000)  # a WELCOME's heartbeat_ms outside this is clamped

# A request handler runs on its loop's thread and writes to its ReplyStream;
# it returns whether the client connection must be closed.
Handler = Callable[[m2.HttpRequest | m2.UploadDone, str, str, ReplyStream], bool]

_CMD_HEARTBEAT = [p.VERSION, p.CMD[p.Command.HEARTBEAT]]
_CMD_DRAIN = [p.VERSION, p.CMD[p.Command.DRAIN]]
_CMD_BYE = [p.VERSION, p.CMD[p.Command.BYE]]
_POLLIN = zmq.POLLIN
_SIGNALS = {signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGCHLD}


@dataclass(slots=True, eq=False)
class BrokerConn:
    """One loop's session with one broker (docs/protocol.md 4.1)."""

    endpoint: str
    heartbeat_s: float  # how often we send HEARTBEAT: ours, or the broker's if shorter
    expiry_s: float  # silence after which the broker is gone: its heartbeat x liveness
    socket: zmq.Socket[bytes] | None = None
    welcomed: bool = False
    last_seen: float = 0.0
    next_heartbeat: float = 0.0
    retry_at: float = 0.0
    backoff_s: float = 0.5
    drain_acked: bool = False
    detached: bool = False  # left (BYE) while another broker's request runs long


@dataclass(slots=True)
class _Pending:
    conn: BrokerConn
    rid: bytes
    script_name: bytes
    raw: bytes
    window: bytes | None  # the broker's REQUEST window frame, if any (protocol.md 3.9)
    cancelled: bool = field(default=False)


class Loop:
    """Serves requests for one slot of a Worker process (see the module docstring)."""

    def __init__(self, worker: Worker, index: int, hello: bytes) -> None:
        s = worker.settings
        self.worker = worker
        self.index = index
        self.hello = hello
        self.lock = threading.Lock()
        self.conns = [BrokerConn(ep, s.heartbeat_s, s.heartbeat_s * s.liveness)
                      for ep in s.connect]
        self._items: list[tuple[zmq.Socket[bytes] | int, int]] = []
        self._by_socket: dict[object, BrokerConn] = {}  # keyed as zmq_poll answers
        self.pending: deque[_Pending] = deque()
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
                try:
                    os.write(self.worker.done_w, b"d")  # wakes the heartbeat thread
                except OSError:  # full (it is awake anyway) or closed
                    pass

    def _serve(self) -> None:
        worker = self.worker
        graceful_s = worker.settings.graceful_timeout_s
        while not self.closed:
            now = time.monotonic()
            timeout_ms = (0 if self.pending
                          else max(0, math.ceil((self.next_timer - now) * 1000)))
            self._read(timeout_ms)
            now = time.monotonic()
            if now >= self.next_timer or (worker.stopping and not self.drain_started):
                self.next_timer = self._timers(now)
                if worker.exit_code:
                    return
                if self.drain_started and not self.pending and (
                        all(c.drain_acked or not c.welcomed for c in self.conns)
                        or now - self.drain_started > graceful_s):
                    return
            if self.pending:
                self._run_request(self.pending.popleft())

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
        due = [c.next_heartbeat - now for c in self.conns if c.socket is not None]
        return max(0.001, min(due, default=TICK_S))

    def _timers(self, now: float) -> float:
        """Stop, reconnect, expiry and heartbeats; returns when to run again."""
        self.alive_s = now
        worker = self.worker
        if worker.stopping and not self.drain_started:
            self.drain_started = now
            self._sockets_changed()  # the wake-up pipe stays readable: poll it no more
            for c in self.conns:
                self.send(c, _CMD_DRAIN)
        if (self.drain_started and self.current is not None
                and now - self.drain_started > worker.settings.graceful_timeout_s):
            self.current.cancelled = True  # waiting for credits past the graceful timeout
        self.detach_others_locked(now)  # a long download waits for credits here
        next_timer = now + TICK_S
        for c in self.conns:
            if c.socket is None:
                if c.detached and (self.current is not None or self.drain_started):
                    continue  # back once the long request is over (not when leaving)
                c.detached = False
                if now >= c.retry_at:
                    self._connect(c, now)
                else:
                    next_timer = min(next_timer, c.retry_at)
                    continue
            elif now - c.last_seen > c.expiry_s:
                log.warning("broker %s silent for %.1fs: reconnecting%s", c.endpoint,
                            now - c.last_seen, " (CURVE: is our key among its authorized "
                            "keys, and --broker-key its key?)"
                            if worker.settings.curve and not c.welcomed else "")
                self._disconnect(c, retry_at=now + c.backoff_s)
                c.backoff_s = min(c.backoff_s * 2, worker.settings.reconnect_max_s)
                next_timer = min(next_timer, c.retry_at)
                continue
            elif now >= c.next_heartbeat:
                c.next_heartbeat = now + c.heartbeat_s
                self.send(c, _CMD_HEARTBEAT)
            next_timer = min(next_timer, c.next_heartbeat)
        return next_timer

    def heartbeat_locked(self, now: float) -> None:
        """From the heartbeat thread, lock held, while the app runs: HEARTBEAT
        every broker that is due one. Reads nothing (the loop does that)."""
        for c in self.conns:
            if c.socket is not None and now >= c.next_heartbeat:
                c.next_heartbeat = now + c.heartbeat_s
                self.send(c, _CMD_HEARTBEAT)
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
            if c is not current.conn and c.socket is not None:
                # BYE even before its WELCOME was read (the app may have started
                # first): the broker registered us at our HELLO.
                self.send(c, _CMD_BYE)
                log.debug("loop %d leaves broker %s while a long request runs",
                          self.index, c.endpoint)
                self._disconnect(c, retry_at=0.0)
                c.detached = True

    # ---- sockets -------------------------------------------------------

    def _connect(self, c: BrokerConn, now: float) -> None:
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
        c.welcomed = c.drain_acked = False
        c.last_seen = now
        c.heartbeat_s = s.heartbeat_s
        c.expiry_s = s.heartbeat_s * s.liveness  # until WELCOME tells the broker's
        c.next_heartbeat = now + c.heartbeat_s
        self._sockets_changed()
        self.send(c, [p.VERSION, p.CMD[p.Command.HELLO], self.hello])

    def _disconnect(self, c: BrokerConn, *, retry_at: float) -> None:
        """Drop the link to `c`. Its requests are cancelled: the broker that
        sent them has given them up (or is gone)."""
        if c.socket is not None:
            c.socket.close(0)
        c.socket = None
        c.welcomed = c.drain_acked = False
        c.retry_at = retry_at
        self._sockets_changed()
        current = self.current
        if current is not None and current.conn is c:
            current.cancelled = True
        if any(r.conn is c for r in self.pending):
            self.pending = deque(r for r in self.pending if r.conn is not c)

    def _sockets_changed(self) -> None:
        items: list[tuple[zmq.Socket[bytes] | int, int]] = [
            (c.socket, _POLLIN) for c in self.conns if c.socket is not None]
        if not self.drain_started and not self.closed and self.worker.wake_r >= 0:
            items.append((self.worker.wake_r, _POLLIN))  # stop() wakes us at once
        self._items = items
        self._by_socket = {c.socket: c for c in self.conns if c.socket is not None}

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
            if c.socket is not None:
                if bye and c.welcomed:
                    self.send(c, _CMD_BYE)
                c.socket.close()  # LINGER 500: the BYE and late LASTs get out
                c.socket = None
        self._sockets_changed()

    # ---- broker messages -----------------------------------------------

    def _on_message(self, c: BrokerConn, frames: list[bytes]) -> None:
        c.last_seen = now = time.monotonic()
        if len(frames) < 2 or frames[0] != p.VERSION or len(frames[1]) != 1:
            log.warning("malformed message from broker %s", c.endpoint)
            return
        command = frames[1][0]
        if command == p.Command.REQUEST and len(frames) in (6, 7):
            self.pending.append(_Pending(c, frames[2], frames[4], frames[5],
                                         frames[6] if len(frames) == 7 else None))
        elif command == p.Command.CREDIT and len(frames) == 4:
            current = self.current
            if (current is not None and current.conn is c and current.rid == frames[2]
                    and current.flow is not None and frames[3].isdigit()):
                current.flow.grant(int(frames[3]))
        elif command == p.Command.CANCEL and len(frames) == 3:
            self._cancel(c, frames[2])
        elif command == p.Command.BODY and len(frames) == 5:
            current = self.current  # pieces come only for the request that asked (READ)
            if (current is not None and current.conn is c and current.rid == frames[2]
                    and current.body is not None):
                current.body.feed(frames[4], frames[3] == p.BODY_END)
        elif command == p.Command.HEARTBEAT:
            pass
        elif command == p.Command.WELCOME:
            self._welcomed(c, frames[2] if len(frames) > 2 else b"", now)
        elif command == p.Command.BYE:  # the broker does not know us: announce again
            self._disconnect(c, retry_at=0.0)
        elif command == p.Command.DRAIN:
            self.worker.on_drain(self, c)
        elif command == p.Command.ERROR:
            text = frames[3].decode("utf-8", "replace") if len(frames) > 3 else ""
            log.error("broker %s refused us: %s", c.endpoint, text)
            if not c.welcomed:
                self.worker.fail(3)  # a HELLO that is refused will be refused again
        else:
            log.warning("unexpected command %#x from broker %s", command, c.endpoint)

    def _cancel(self, c: BrokerConn, rid: bytes) -> None:
        current = self.current
        if current is not None and current.conn is c and current.rid == rid:
            current.cancelled = True  # the app's next send raises Cancelled
            return
        for r in self.pending:
            if r.conn is c and r.rid == rid:
                r.cancelled = True

    def _welcomed(self, c: BrokerConn, payload: bytes, now: float) -> None:
        s = self.worker.settings
        c.welcomed = True
        c.backoff_s = 0.5
        heartbeat_ms = _welcome_heartbeat_ms(payload)
        if heartbeat_ms is not None:
            # Expire the broker by its own announced interval; heartbeat it at
            # least that often too, so it keeps us whatever its liveness rule.
            broker_s = heartbeat_ms / 1000
            c.expiry_s = broker_s * s.liveness
            c.heartbeat_s = min(s.heartbeat_s, broker_s)
            c.next_heartbeat = min(c.next_heartbeat, now + c.heartbeat_s)
            self.next_timer = min(self.next_timer, c.next_heartbeat)
        log.info("loop %d connected to broker %s", self.index, c.endpoint)
        self.worker.on_welcome()
        if self.worker.stopping:  # reconnected while draining: say so again
            self.send(c, _CMD_DRAIN)

    # ---- requests ------------------------------------------------------

    def _run_request(self, r: _Pending) -> None:
        """Run one request's handler on this thread; the lock is held on entry
        and on return, and released while the app runs."""
        now = time.monotonic()
        self.worker.count_request()
        try:
            event = m2.parse_message(r.raw)
        except m2.Mongrel2ProtocolError as exc:
            log.warning("unparseable request from broker: %s", exc)
            event = None
        if r.cancelled or not isinstance(event, (m2.HttpRequest, m2.UploadDone)):
            self.send(r.conn, [p.VERSION, p.CMD[p.Command.REPLY], r.rid, p.FLAG_LAST])
            return
        # The broker's window frame wins: Mongrel2 puts DOWNLOAD_CREDITS only on
        # a connection's first request, and its window is the connection's.
        credits = r.window if r.window is not None else event.headers.get(b"DOWNLOAD_CREDITS")
        flow = FlowWindow(int(credits)) if type(credits) is bytes and credits.isdigit() else None
        stream = ReplyStream(self, r.conn, r.rid, event, flow, now)
        if m2.streamed_body(event.headers):  # upload.stream: the body follows as BODY
            try:
                stream.body = self._body_input(stream, event)
            except BodyError as exc:
                log.warning("bad streamed body from broker: %s", exc)
                self.send(r.conn, [p.VERSION, p.CMD[p.Command.REPLY], r.rid, p.FLAG_LAST])
                return
        close = True
        self.current = stream
        self.current_since = now
        self.lock.release()
        try:
            path = normalize_path(event.path)
            try:
                script, path_info = split_script_name(path, r.script_name.decode("latin-1"))
            except ValueError:
                script, path_info = split_script_name(path, "")
            close = self.worker.handler(event, script, path_info, stream)
        except Cancelled:
            close = False
        except Exception:
            log.exception("request handler failed")
        finally:
            self.lock.acquire()
            self.alive_s = time.monotonic()  # before `current` clears (worker._report)
            self.current = None
            if not self.closed:
                stream.end_locked(close)


    def _body_input(self, stream: ReplyStream, event: m2.Message) -> BodyInput:
        """The wsgi.input of a streamed body (core/bodystream.py). The app reads it
        on this thread: waiting for pieces reads our own socket, as waiting
        for download credits does (worker/reply.py)."""
        length = event.header(b"content-length")
        reader = BodyReader(event.body, int(length) if length and length.isdigit() else None)

        def wait() -> None:
            with self.lock:
                if not stream.cancelled and not self.closed:
                    self.wait_io()  # reads BODY, CANCEL, ... and keeps heartbeats going
                if stream.cancelled or self.closed:
                    raise Cancelled
            stream.started_s = time.monotonic()  # reading the body is progress

        def grant(n: int) -> None:
            with self.lock:
                if not stream.cancelled and not self.closed:
                    self.send(stream.conn, [*_READ_HEAD, stream.rid, b"%d" % n])

        return BodyInput(reader, wait, grant)


_READ_HEAD = (p.VERSION, p.CMD[p.Command.READ])


def _welcome_heartbeat_ms(payload: bytes) -> int | None:
    """The broker's heartbeat interval from a WELCOME payload, clamped; None if absent."""
    try:
        data = json.loads(payload)
    except (ValueError, UnicodeDecodeError, RecursionError):
        return None
    value = data.get("heartbeat_ms") if isinstance(data, dict) else None
    if type(value) is not int:
        return None
    low, high = BROKER_HEARTBEAT_MS
    return min(max(value, low), high)
