"""Worker runtime: connect to brokers, announce, heartbeat, run requests.

One thread (the loop) owns every ZeroMQ socket: a DEALER per broker and an
inproc PULL that request threads send their replies into. Requests run on a
thread pool of `capacity` threads, so heartbeats go on while the app works.

Flow control (docs/protocol.md 3.9, Mongrel2's download.flow_control): the
rule is "the reply bytes of a connection that Mongrel2 has not yet credited
back never exceed its window". The window is the connection's, not the
request's: Mongrel2 sets DOWNLOAD_CREDITS (102400) only on the first request of
a connection, so a request's starting window is the REQUEST's window frame
(what the broker, which sees every reply and credit of the connection, says is
left of it), else its DOWNLOAD_CREDITS header, else there is none. Each message
body takes from the window; CREDIT n gives n back. Mongrel2 closes the
connection as soon as one message would overrun it (the whole 150 KB reply of
a second keep-alive request sent as one message did). A request thread blocks
in `_Flow.acquire` until it may send, so a slow client slows the app. Without
a window (flow control off in Mongrel2) pieces are only capped in size and
Mongrel2's limit is 16 queued messages per connection: a streamed response of
many small blocks can then overrun it.

Under a Pool (supervise.py) the loop also reports to the arbiter through a
`ChildState` (childstate.py), at most every REPORT_EVERY_S and never per
request: that it is alive, the start of its oldest request, and once:

* ready: WELCOMEd by every broker it connects to, or by at least one once
  READY_WAIT_S have passed (one broker being down must not stall a reload;
  none answering means not ready, and the old processes keep serving);
* retire: it has started `max_requests` requests. It keeps serving until the
  arbiter, once a replacement is ready, sends SIGTERM; the limit triggers the
  recycling and is not a hard cap.

For the arbiter's --timeout a request's age does not count the time its
thread spends blocked in `_Flow.acquire`: waiting for a slow client's
credits is not the app being stuck (gunicorn's sync workers get killed for
that; here the broker's request timeout and Mongrel2 deal with dead clients).
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import zmq

from . import mongrel2 as m2
from . import protocol as p
from .childstate import ChildState
from .frames import recv_frames, send_frames
from .routing import normalize_path, split_script_name

log = logging.getLogger(__name__)

MAX_OUTSTANDING_MESSAGES = 8  # well under Mongrel2's 16 queued messages per connection
MAX_MESSAGE_BYTES = 1 << 20
REPORT_EVERY_S = 0.25  # ChildState updates; the arbiter checks about once a second
READY_WAIT_S = 5.0  # then one WELCOME of several is enough to be ready


class Cancelled(Exception):
    """The broker cancelled the request (client gone or timed out)."""


@dataclass(frozen=True, slots=True)
class WorkerSettings:
    connect: tuple[str, ...]
    services: tuple[p.ServiceSpec, ...]
    capacity: int = 1
    heartbeat_s: float = 1.0
    liveness: int = 3
    graceful_timeout_s: float = 30.0
    reconnect_max_s: float = 10.0
    label: str = ""
    meta: tuple[tuple[str, str], ...] = ()  # more HELLO meta, e.g. ("uploads", "file")


class ReplyStream:
    """What a handler writes its HTTP response to, from its pool thread.

    `send` streams bytes within the flow-control window; `last` sends the
    final bytes and ends the request in the same message (and closes the
    client connection when `close`). A request not ended by `last` is ended
    when the handler returns, closing the connection if it returns True.
    """

    def __init__(self, push: zmq.Socket[bytes], broker: bytes, rid: bytes,
                 event: m2.HttpRequest | m2.UploadDone, flow: _Flow) -> None:
        self._push = push
        self._head = [broker, rid]
        self._sender = event.sender
        self._conn_id = event.conn_id
        self._flow = flow
        self.ended = False

    def send(self, data: bytes) -> None:
        flow, sender, conn_id = self._flow, self._sender, self._conn_id
        while data:
            n = flow.acquire(len(data))
            piece, data = data[:n], data[n:]
            send_frames(self._push, [*self._head, p.FLAG_MORE, m2.reply(sender, conn_id, piece)],
                        block=True)

    def last(self, data: bytes, close: bool) -> None:
        if self.ended:
            raise RuntimeError("the request has already ended")
        flow = self._flow
        frames = [*self._head, p.FLAG_LAST]
        while data:
            n = flow.acquire(len(data))  # these n bytes of credit are ours now
            piece, data = data[:n], data[n:]
            if data:  # over the window: stream this piece, the tail ends the request
                send_frames(self._push, [*self._head, p.FLAG_MORE,
                                         m2.reply(self._sender, self._conn_id, piece)], block=True)
            else:
                frames.append(m2.reply(self._sender, self._conn_id, piece))
        if close:
            frames.append(m2.close_reply(self._sender, self._conn_id))
        self.ended = True
        send_frames(self._push, frames, block=True)

    def end(self, close: bool) -> None:
        """End the request if `last` did not (also after errors and cancels)."""
        if not self.ended:
            frames = [*self._head, p.FLAG_LAST]
            if close and not self._flow.cancelled:
                frames.append(m2.close_reply(self._sender, self._conn_id))
            self.ended = True
            send_frames(self._push, frames, block=True)


# A request handler runs on a pool thread and writes to its ReplyStream;
# it returns whether the client connection must be closed.
Handler = Callable[[m2.HttpRequest | m2.UploadDone, str, str, ReplyStream], bool]


class _Flow:
    """Per-request send window, shared by the loop (grant/cancel) and its thread."""

    def __init__(self, credits: int | None, started_s: float = 0.0) -> None:
        self.credits = credits
        self.outstanding: deque[int] = deque()
        self.cancelled = False
        self.cond = threading.Condition()
        # Read by the loop without the lock (one attribute each, atomic under the
        # GIL): the request's last progress (its start, then each piece of
        # reply), moved later by the time spent blocked. So `--timeout` reaps
        # an app that is stuck, never a long download that keeps going.
        self.started_s = started_s
        self.blocked = False

    def acquire(self, wanted: int) -> int:
        """Block until some bytes may be sent; return how many (<= wanted)."""
        self.started_s = time.monotonic()  # the app made progress: a piece to send
        with self.cond:
            while True:
                if self.cancelled:
                    raise Cancelled
                if self.credits is None:
                    return min(wanted, MAX_MESSAGE_BYTES)
                if self.credits > 0 and len(self.outstanding) < MAX_OUTSTANDING_MESSAGES:
                    n = min(wanted, self.credits, MAX_MESSAGE_BYTES)
                    self.credits -= n
                    self.outstanding.append(n)
                    return n
                self._wait()

    def _wait(self) -> None:
        """cond.wait(), with the time blocked left out of the request's age."""
        blocked_at = time.monotonic()
        self.blocked = True
        try:
            self.cond.wait()
        finally:
            self.started_s += time.monotonic() - blocked_at
            self.blocked = False

    def grant(self, n: int) -> None:
        with self.cond:
            if self.credits is not None:
                self.credits += n
                while self.outstanding and n >= self.outstanding[0]:
                    n -= self.outstanding.popleft()
                if self.outstanding and n:
                    self.outstanding[0] -= n
            self.cond.notify_all()

    def cancel(self) -> None:
        with self.cond:
            self.cancelled = True
            self.cond.notify_all()


@dataclass(slots=True, eq=False)
class _BrokerConn:
    index: int
    endpoint: str
    socket: zmq.Socket[bytes] | None = None
    welcomed: bool = False
    last_seen: float = 0.0
    next_heartbeat: float = 0.0
    retry_at: float = 0.0
    backoff_s: float = 0.5
    drain_acked: bool = False
    index_frame: bytes = field(default=b"")


class Worker:
    """Serves `handler` for the brokers in `settings.connect` until stopped."""

    def __init__(self, handler: Handler, settings: WorkerSettings, *,
                 state: ChildState | None = None) -> None:
        self.handler = handler
        self.settings = settings
        self.state = state  # the arbiter's view of us, under a Pool
        self.requests_started = 0
        self._max_requests = 0
        self._brokers: list[_BrokerConn] = []
        self.label = settings.label or f"{socket.gethostname()}:{os.getpid()}"
        self._stopping = False
        self._flows: dict[tuple[int, bytes], _Flow] = {}
        self._local = threading.local()
        # Every request thread's PUSH, closed by the loop at exit: a socket
        # left to the garbage collector may never be closed (its __del__ warns
        # first, and raises under -W error), and Context.term() then waits
        # for it forever.
        self._pushes: list[zmq.Socket[bytes]] = []
        self._ctx: zmq.Context[zmq.Socket[bytes]] | None = None
        self._inproc = f"inproc://scale0-replies-{id(self)}"
        self.exit_code = 0

    def stop(self) -> None:
        """Graceful stop: drain, finish in-flight requests, say BYE. Signal-safe."""
        self._stopping = True

    def install_signal_handlers(self) -> None:
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: self.stop())

    # ---- the loop ------------------------------------------------------

    def run(self) -> int:
        s = self.settings
        self._ctx = ctx = zmq.Context()
        replies = ctx.socket(zmq.PULL)
        replies.bind(self._inproc)
        self._brokers = brokers = [_BrokerConn(i, ep, index_frame=b"%d" % i)
                                   for i, ep in enumerate(s.connect)]
        pool = ThreadPoolExecutor(s.capacity, thread_name_prefix="scale0-req")
        hello = p.Hello(s.services, s.capacity, self.label, int(s.heartbeat_s * 1000),
                        {"pid": str(os.getpid()), **dict(s.meta)}).encode()
        drain_started = 0.0
        polled: tuple[zmq.Socket[bytes] | None, ...] = ()
        poller = zmq.Poller()
        started = next_report = time.monotonic()
        self._max_requests = self.state.max_requests if self.state is not None else 0
        try:
            while True:
                now = time.monotonic()
                if self.state is not None and now >= next_report:
                    next_report = now + REPORT_EVERY_S
                    self._report(self.state, brokers, now, now - started >= READY_WAIT_S)
                if self._stopping and not drain_started:
                    drain_started = now
                    log.info("draining: %d requests in flight", len(self._flows))
                    for b in brokers:
                        self._send(b, [p.CMD[p.Command.DRAIN]])
                if drain_started and (
                    (not self._flows and all(b.drain_acked or not b.welcomed for b in brokers))
                    or now - drain_started > s.graceful_timeout_s
                ):
                    break
                for b in brokers:
                    self._keep_alive(b, hello, now)
                sockets = tuple(b.socket for b in brokers)
                if sockets != polled:  # rebuilt only when a broker (re)connects
                    polled = sockets
                    poller = zmq.Poller()
                    poller.register(replies, zmq.POLLIN)
                    for sock in sockets:
                        if sock is not None:
                            poller.register(sock, zmq.POLLIN)
                timeout_ms = max(1, int(min(s.heartbeat_s, 0.25) * 1000))
                for sock, _ in poller.poll(timeout_ms):
                    if sock is replies:
                        self._forward_replies(replies, brokers)
                    else:
                        b = next(b for b in brokers if b.socket is sock)
                        self._read_broker(b, pool)
                if self.exit_code:
                    break
        finally:
            for b in brokers:
                if b.socket is not None and b.welcomed:
                    self._send(b, [p.CMD[p.Command.BYE]])
            for flow in self._flows.values():
                flow.cancel()
            pool.shutdown(wait=True, cancel_futures=True)
            self._forward_replies(replies, brokers)
            for push in self._pushes:  # the request threads are done with them
                push.close()
            ctx.destroy(linger=500)
        return self.exit_code

    def _report(self, state: ChildState, brokers: list[_BrokerConn], now: float,
                waited: bool) -> None:
        """Tell the arbiter we are alive, our oldest request's start, and
        whether we are ready (see the module docstring)."""
        oldest = 0.0
        for flow in list(self._flows.values()):
            if not flow.blocked and (not oldest or flow.started_s < oldest):
                oldest = flow.started_s
        state.beat(now, oldest)
        if not state.ready and not self._stopping and (
                all(b.welcomed for b in brokers)
                or (waited and any(b.welcomed for b in brokers))):
            state.set_ready()

    def _keep_alive(self, b: _BrokerConn, hello: bytes, now: float) -> None:
        s = self.settings
        if b.socket is None:
            if now < b.retry_at:
                return
            assert self._ctx is not None
            b.socket = self._ctx.socket(zmq.DEALER)
            b.socket.setsockopt(zmq.LINGER, 500)
            # No high-water mark: a reply (a LAST above all) is never dropped
            # while the broker is connected. Memory stays bounded by the flow
            # window (at most 8 messages per request) and the capacity.
            b.socket.setsockopt(zmq.SNDHWM, 0)
            b.socket.connect(b.endpoint)
            b.welcomed = False
            b.last_seen = now
            self._send(b, [p.CMD[p.Command.HELLO], hello])
            b.next_heartbeat = now + s.heartbeat_s
            return
        if now - b.last_seen > s.heartbeat_s * s.liveness:
            log.warning("broker %s silent for %.1fs: reconnecting", b.endpoint, now - b.last_seen)
            self._disconnect(b, retry_at=now + b.backoff_s)
            b.backoff_s = min(b.backoff_s * 2, s.reconnect_max_s)
            return
        if now >= b.next_heartbeat:
            b.next_heartbeat = now + s.heartbeat_s
            self._send(b, [p.CMD[p.Command.HEARTBEAT]])

    def _disconnect(self, b: _BrokerConn, *, retry_at: float) -> None:
        """Drop the link to `b`. Its requests are cancelled: the broker that
        sent them has given them up (or is gone), and threads waiting for its
        credits must not wait forever."""
        if b.socket is not None:
            b.socket.close(0)
        b.socket = None
        b.welcomed = b.drain_acked = False
        b.retry_at = retry_at
        for (index, _), flow in self._flows.items():
            if index == b.index:
                flow.cancel()

    def _send(self, b: _BrokerConn, frames: list[bytes]) -> None:
        if b.socket is not None:
            try:
                send_frames(b.socket, [p.VERSION, *frames])
            except zmq.Again:
                log.warning("broker %s not accepting messages", b.endpoint)

    def _read_broker(self, b: _BrokerConn, pool: ThreadPoolExecutor) -> None:
        assert b.socket is not None
        while True:
            try:
                frames = recv_frames(b.socket)
            except zmq.Again:
                return
            b.last_seen = now = time.monotonic()
            if len(frames) < 2 or frames[0] != p.VERSION or len(frames[1]) != 1:
                log.warning("malformed message from broker %s", b.endpoint)
                continue
            command = frames[1][0]
            if command == p.Command.REQUEST and len(frames) in (6, 7):
                window = frames[6] if len(frames) == 7 else None
                self._start_request(b, frames[2], frames[4], frames[5], window, pool, now)
            elif command == p.Command.CREDIT and len(frames) == 4:
                flow = self._flows.get((b.index, frames[2]))
                if flow is not None and frames[3].isdigit():
                    flow.grant(int(frames[3]))
            elif command == p.Command.CANCEL and len(frames) == 3:
                flow = self._flows.get((b.index, frames[2]))
                if flow is not None:
                    flow.cancel()
            elif command == p.Command.HEARTBEAT:
                pass
            elif command == p.Command.WELCOME:
                b.welcomed = True
                b.backoff_s = 0.5
                log.info("connected to broker %s", b.endpoint)
                if self.state is not None and not self.state.ready:
                    self._report(self.state, self._brokers, now, waited=False)
                if self._stopping:  # reconnected while draining: say so again
                    self._send(b, [p.CMD[p.Command.DRAIN]])
            elif command == p.Command.BYE:  # the broker does not know us: announce again
                self._disconnect(b, retry_at=0.0)
                return
            elif command == p.Command.DRAIN:
                if self._stopping:
                    b.drain_acked = True  # our DRAIN's answer: no REQUEST is on its way
                elif self.state is not None:
                    # Under a pool: be replaced, not just gone. The arbiter
                    # starts a new process, then stops this one once it is ready.
                    log.info("broker %s asks us to leave: retiring", b.endpoint)
                    self.state.ask_retire()
                else:
                    self.stop()  # the broker asks us to leave
            elif command == p.Command.ERROR:
                text = frames[3].decode("utf-8", "replace") if len(frames) > 3 else ""
                log.error("broker %s refused us: %s", b.endpoint, text)
                if not b.welcomed:
                    self.exit_code = 3  # a HELLO that is refused will be refused again
            else:
                log.warning("unexpected command %#x from broker %s", command, b.endpoint)

    def _start_request(self, b: _BrokerConn, rid: bytes, script_name: bytes, raw: bytes,
                       window: bytes | None, pool: ThreadPoolExecutor, now: float) -> None:
        self.requests_started += 1
        if self._max_requests and self.requests_started >= self._max_requests:
            assert self.state is not None
            self.state.ask_retire()  # idempotent; the arbiter replaces us
        try:
            event = m2.parse_message(raw)
        except m2.Mongrel2ProtocolError as exc:
            log.warning("unparseable request from broker: %s", exc)
            event = None
        if not isinstance(event, (m2.HttpRequest, m2.UploadDone)):
            self._send(b, [p.CMD[p.Command.REPLY], rid, p.FLAG_LAST])
            return
        # The broker's window frame wins: Mongrel2 puts DOWNLOAD_CREDITS only on
        # a connection's first request, and its window is the connection's.
        credits = window if window is not None else event.header(b"DOWNLOAD_CREDITS")
        flow = _Flow(int(credits) if credits is not None and credits.isdigit() else None, now)
        self._flows[(b.index, rid)] = flow
        pool.submit(self._run_request, b.index_frame, rid, event,
                    script_name.decode("latin-1"), flow)

    def _forward_replies(self, replies: zmq.Socket[bytes], brokers: list[_BrokerConn]) -> None:
        while True:
            try:
                frames = recv_frames(replies)
            except zmq.Again:
                return
            b = brokers[int(frames[0])]
            if frames[2] == p.FLAG_LAST:
                self._flows.pop((b.index, frames[1]), None)
            self._send(b, [p.CMD[p.Command.REPLY], *frames[1:]])

    # ---- request threads -----------------------------------------------

    def _push(self) -> zmq.Socket[bytes]:
        sock: zmq.Socket[bytes] | None = getattr(self._local, "push", None)
        if sock is None:
            assert self._ctx is not None
            sock = self._local.push = self._ctx.socket(zmq.PUSH)
            sock.setsockopt(zmq.LINGER, 500)
            sock.connect(self._inproc)
            self._pushes.append(sock)  # list.append is atomic
        return sock

    def _run_request(self, broker: bytes, rid: bytes, event: m2.HttpRequest | m2.UploadDone,
                     script_name: str, flow: _Flow) -> None:
        stream = ReplyStream(self._push(), broker, rid, event, flow)
        close = True
        try:
            path = normalize_path(event.path)
            try:
                script, path_info = split_script_name(path, script_name)
            except ValueError:
                script, path_info = split_script_name(path, "")
            close = self.handler(event, script, path_info, stream)
        except Cancelled:
            close = False
        except Exception:
            log.exception("request handler failed")
        finally:
            stream.end(close)
