"""Worker runtime: a process of `--threads` loops serving brokers.

Each loop (worker/loop.py) is a thread that owns its sockets, a DEALER per
broker, and runs the app inline: it is a worker of capacity 1 to every
broker, labelled ``host:pid/k``, its HELLO ``meta`` carrying ``pid`` and its
slot ``thread``. So T threads are T workers to a broker, and the broker
never sends a process more than T requests at once.

The main thread is the process's heartbeat thread: a few times a second it
sends HEARTBEAT for each loop whose app is running (taking that loop's lock,
which the loop gives up only while the app runs), so a broker never expires
a loop whose request takes a minute; it reports to the arbiter, and it takes
the signals.

Flow control (worker/reply.py, docs/protocol.md 3.9): a request's reply may leave at
most its window of bytes uncredited in Mongrel2 (the REQUEST's window frame,
else its DOWNLOAD_CREDITS header: the window is the connection's), in at
most MAX_OUTSTANDING_MESSAGES messages. While the app's send is over its window,
its own thread reads its own sockets for CREDIT, CANCEL and HEARTBEAT until
it may send. A CANCEL makes the app's next send raise `Cancelled`; the LAST
still goes out.

Under a Pool (pool/supervise.py) the process reports to the arbiter through a
`ChildState` (pool/childstate.py), at most every REPORT_EVERY_S and never per
request: that it is alive, the start of its oldest request, and once:

* ready: every loop WELCOMEd by every broker it connects to, or every loop
  by at least one once READY_WAIT_S have passed (one broker being down must
  not stall a reload; none answering means not ready, and the old processes
  keep serving);
* retire: it has started `max_requests` requests (counted per process, over
  all its loops), or a broker sent one of its loops DRAIN. It keeps serving
  until the arbiter, once a replacement is ready, sends SIGTERM; the limit
  triggers the recycling and is not a hard cap.

For the arbiter's --timeout a request's age does not count the time it
spends waiting for credits: a slow client is not the app being stuck
(gunicorn's sync workers get killed for that; here the broker's request
timeout and Mongrel2 deal with dead clients).

SIGTERM or SIGINT drains every loop: DRAIN to each broker, finish what is in
flight, BYE, then exit. Past the graceful timeout the heartbeat thread closes
the sockets of loops still inside the app (their app's next send raises); a
second SIGTERM or SIGINT does that at once (the stop of pool/runloop.py).
A broker ERROR before WELCOME exits with status 3. A broker silent for its
WELCOME's heartbeat_ms x liveness is reconnected with backoff. Every socket is
closed before the context is terminated, so Context.term() never hangs.
"""

from __future__ import annotations

import itertools
import logging
import math
import os
import socket
import time
from dataclasses import dataclass

import zmq

from scale0.auth.keys import CurveKeys
from scale0.config import WsgiConfig, default
from scale0.pool.childstate import ChildState
from scale0.pool.runloop import RunLoop, Wakeup
from scale0.wire import s0w1 as p
from scale0.worker.loop import BrokerConn, Loop
from scale0.worker.reply import MAX_MESSAGE_BYTES, MAX_OUTSTANDING_MESSAGES, Cancelled, ReplyStream
from scale0.worker.request import Handler

__all__ = ["MAX_MESSAGE_BYTES", "MAX_OUTSTANDING_MESSAGES", "Cancelled", "Handler",
           "ReplyStream", "Worker", "WorkerSettings"]

log = logging.getLogger(__name__)

REPORT_EVERY_S = 0.25  # ChildState updates; the arbiter checks about once a second
READY_WAIT_S = 5.0  # then one WELCOME of several is enough to be ready
JOIN_TIMEOUT_S = 2.0  # for a loop to end once its sockets were closed under it
READ_BEHIND_S = 0.02  # an app running this long with requests behind it: its sockets are read


@dataclass(frozen=True, slots=True)
class WorkerSettings:
    connect: tuple[str, ...]
    services: tuple[p.ServiceSpec, ...]
    # Defaults as declared (config/declared.py); cli.py builds it with config.build.
    capacity: int = default(WsgiConfig, "threads")  # the number of loops (threads) here
    prefetch: int = default(WsgiConfig, "prefetch")  # per loop: requests waiting behind its own
    heartbeat_s: float = default(WsgiConfig, "heartbeat")
    liveness: int = default(WsgiConfig, "liveness")
    graceful_timeout_s: float = default(WsgiConfig, "graceful_timeout")
    reconnect_max_s: float = 10.0
    label: str = ""
    meta: tuple[tuple[str, str], ...] = ()  # more HELLO meta, e.g. ("uploads", "file")
    curve: CurveKeys | None = None  # our key pair and the brokers' public key


class Worker:
    """Serves `handler` for the brokers in `settings.connect` until stopped."""

    ctx: zmq.Context[zmq.Socket[bytes]]  # made by run(), used by the loops

    def __init__(self, handler: Handler, settings: WorkerSettings, *,
                 state: ChildState | None = None) -> None:
        self.handler = handler
        self.settings = settings
        self.state = state  # the arbiter's view of us, under a Pool
        self.label = settings.label or f"{socket.gethostname()}:{os.getpid()}"
        self.exit_code = 0
        self._counter = itertools.count(1)  # next() is atomic: loops count without a lock
        self.requests_started = 0
        self._max_requests = state.max_requests if state is not None else 0
        self.loops: list[Loop] = []
        self._started_s = 0.0
        # The loop helper (pool/runloop.py): its Stop is graceful, then forced;
        # its wake-up pipe is polled by every loop until it drains, so a stop
        # (or a stop signal, through set_wakeup_fd) wakes them at once. Made
        # here so that a stop() before run() counts; run() closes it.
        self.runloop = RunLoop()
        self.done = Wakeup()  # a loop that ends wakes the heartbeat thread

    @property
    def stopping(self) -> bool:
        return self.runloop.stop.stopping

    def stop(self, force: bool | None = False) -> None:
        """Stop: drain, finish in-flight requests (up to the graceful timeout),
        say BYE. `force` (or, with None, a second call: the second SIGTERM or
        SIGINT) ends in-flight requests now. Signal-safe and thread-safe."""
        self.runloop.request_stop(force)

    def fail(self, code: int) -> None:
        """Stop at once with exit status `code` (every loop leaves at its next timer)."""
        if not self.exit_code:
            self.exit_code = code
        self.stop()

    def install_signal_handlers(self) -> None:
        """SIGTERM and SIGINT stop us, the second one forced (main thread only)."""
        self.runloop.install_signals()

    # ---- called by the loops -------------------------------------------

    def count_request(self) -> None:
        n = self.requests_started = next(self._counter)
        if self._max_requests and n >= self._max_requests and self.state is not None:
            self.state.ask_retire()  # idempotent; the arbiter replaces us

    def on_welcome(self) -> None:
        if self.state is not None and not self.state.ready:
            self._check_ready(time.monotonic())

    def on_drain(self, loop: Loop, conn: BrokerConn) -> None:
        if self.stopping:
            conn.drain_acked = True  # our DRAIN's answer: no REQUEST is on its way
        elif self.state is not None:
            # Under a pool: be replaced, not just gone. The arbiter starts a
            # new process, then stops this one (every loop) once it is ready.
            if not self.state.retire:
                log.info("broker %s asks loop %d to leave: retiring", conn.endpoint,
                         loop.index)
            self.state.ask_retire()
        else:
            self.stop()  # the broker asks us to leave

    # ---- the heartbeat thread (the main thread) ------------------------

    def run(self) -> int:
        s = self.settings
        pid = str(os.getpid())
        self.ctx = zmq.Context()
        stop = self.runloop.stop
        self.loops = [
            Loop(self, k, p.Hello(s.services, 1, f"{self.label}/{k}", int(s.heartbeat_s * 1000),
                                  {"pid": pid, "thread": str(k), **dict(s.meta)},
                                  prefetch=s.prefetch).encode())
            for k in range(max(1, s.capacity))]
        self._started_s = time.monotonic()
        try:
            for loop in self.loops:
                loop.thread.start()
            while any(loop.thread.is_alive() for loop in self.loops):
                now = time.monotonic()
                for loop in self.loops:
                    self._heartbeat(loop, now)
                if self.state is not None:
                    self._report(self.state, now)
                # The loops leave by the graceful timeout; past it (or forced)
                # close those still inside the app.
                if stop.begin(now, s.graceful_timeout_s + 2 * REPORT_EVERY_S):
                    log.info("draining: %d requests in flight",
                             sum(loop.current is not None for loop in self.loops))
                if stop.overdue(now):
                    self._close_stuck_loops()
                    break
                # Twice per heartbeat interval, the brokers' (WELCOME) included;
                # and once an app has run READ_BEHIND_S with requests waiting
                # behind it, so that a RECALL of one is answered (docs/protocol.md 4.6).
                heartbeat_s = min(c.heartbeat_s for loop in self.loops for c in loop.conns)
                wait_s = min(REPORT_EVERY_S, heartbeat_s / 2, self._read_behind_in(now))
                # A loop that ends wakes us (done): the process leaves as
                # soon as its last loop has said BYE.
                if self.done.wait(max(0.005, wait_s)):
                    for loop in self.loops:
                        if loop.closed:
                            loop.thread.join(JOIN_TIMEOUT_S)
        finally:
            for loop in self.loops:
                loop.thread.join(JOIN_TIMEOUT_S if loop.thread.is_alive() else None)
            if all(loop.closed for loop in self.loops):
                self.ctx.term()  # every socket is closed: this cannot hang
            else:  # a loop never started or is stuck: leave its sockets to exit
                log.error("worker loops did not stop; not terminating the ZeroMQ context")
            self.runloop.close()  # restores the signal handlers it installed
            self.done.close()
        return self.exit_code

    def _read_behind_in(self, now: float) -> float:
        """How soon a loop whose app has run READ_BEHIND_S with requests
        waiting behind it is due a read (inf: none is). A quick request never
        makes this thread wake for it."""
        due = math.inf
        for loop in self.loops:
            if loop.current is not None and loop.pending:
                due = min(due, max(0.0, loop.current_since + READ_BEHIND_S - now))
        return due

    def _heartbeat(self, loop: Loop, now: float) -> None:
        """HEARTBEAT for `loop` if its app runs (the loop then holds no lock),
        and read its sockets once the app has run READ_BEHIND_S."""
        if loop.current is None or (now - loop.current_since < READ_BEHIND_S
                                    and now < min(c.next_heartbeat for c in loop.conns)):
            return
        if loop.lock.acquire(blocking=False):
            try:
                if loop.current is not None and not loop.closed:
                    loop.heartbeat_locked(now)
            finally:
                loop.lock.release()

    def _close_stuck_loops(self) -> None:
        """Past the graceful timeout: BYE and close the sockets of loops still
        in the app, so the process can leave (their app's next send raises)."""
        for loop in self.loops:
            if loop.thread.is_alive() and loop.lock.acquire(timeout=JOIN_TIMEOUT_S):
                try:
                    log.warning("loop %d still busy after the graceful timeout: closing it",
                                loop.index)
                    loop.close_locked()
                finally:
                    loop.lock.release()

    def _report(self, state: ChildState, now: float) -> None:
        """Tell the arbiter we are alive, our oldest request's start, and
        whether we are ready (see the module docstring)."""
        oldest = 0.0
        alive = now
        for loop in self.loops:
            stream = loop.current
            if stream is not None:
                if not stream.blocked and (not oldest or stream.started_s < oldest):
                    oldest = stream.started_s
            elif loop.alive_s and loop.thread.is_alive():
                alive = min(alive, loop.alive_s)  # its timers run at least every 0.25 s
        state.beat(alive, oldest)
        self._check_ready(now)

    def _check_ready(self, now: float) -> None:
        state = self.state
        if state is None or state.ready or self.stopping or not self.loops:
            return
        waited = now - self._started_s >= READY_WAIT_S
        conns = [loop.conns for loop in self.loops]
        if all(all(c.welcomed for c in cs) for cs in conns) or (
                waited and all(any(c.welcomed for c in cs) for cs in conns)):
            state.set_ready()
