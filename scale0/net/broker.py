"""The broker's I/O loop: sockets, poller and timers around `dispatch.Dispatcher`.

For each Mongrel2 link the broker connects a PULL to its send_spec and an XPUB
to its recv_spec (docs/protocol.md section 1, "Link"), or a DEALER to a `scale0 relay`
(net/links.py); workers connect DEALERs to the broker's ROUTER. The loop owns
every socket and the clock; all decisions are the dispatcher's (core/dispatch.py)
and, for relay links, the relay client's (core/relayclient.py).

The loop is thin: a table of socket -> reader (`_handlers`), a table of
timers (`_timers`, net/timers.py), and between wake-ups the graceful stop's
two steps. A link takes requests only while its replies can go out: the
intake socket is polled only while the link is `writable` (or handing over).

Handing over without losing requests: a stopping broker leaves a Mongrel2
it is connected to directly as net/handover.py describes (half-close, read
until Mongrel2 closes, then disconnect); Mongrel2 sends new requests to the
other brokers meanwhile (or keeps them until one connects). A link through a
relay leaves with the relay's DRAIN/LEAVE/BYE handshake instead.
"""

from __future__ import annotations

import logging
import os
import signal
import time
from collections.abc import Callable
from functools import partial
from typing import TYPE_CHECKING, Any

import zmq

from scale0.auth.keys import CurveKeys
from scale0.auth.zap import CurveServer
from scale0.config import BrokerConfig, default
from scale0.config.kinds import LinkSpec as LinkSpec  # re-exported; config parses it, no zmq
from scale0.core.dispatch import Dispatcher, DispatchSettings, Done
from scale0.net import spool_files
from scale0.net.links import Handler, Link, make_link
from scale0.net.timers import NEVER, Timer, Timers, poll_timeout_ms
from scale0.net.workers import WorkerPort
from scale0.ops.control import ControlServer, default_endpoint
from scale0.pool.runloop import RunLoop

if TYPE_CHECKING:
    from scale0.ops.status import StatusServer

__all__ = ["Broker", "LinkSpec"]

log = logging.getLogger(__name__)

SNAPSHOT_EVERY_S = 0.5  # how stale `Broker.snapshot` may be, when other threads read it
HELD_RETRY_S = 0.02  # how often replies held for a Mongrel2 are offered again
DRAIN_CHECK_S = 0.1  # stopping: how often the loop looks whether all is done


class Broker:
    """Constructors do no I/O: `start()` makes sockets, `run()` loops until `stop()`."""

    def __init__(self, links: list[LinkSpec], bind: str,
                 settings: DispatchSettings | None = None,
                 context: zmq.Context[zmq.Socket[bytes]] | None = None, *,
                 graceful_timeout_s: float = default(BrokerConfig, "graceful_timeout"),
                 startup_grace_s: float | None = None,
                 control: str = "", metrics: tuple[str, int] | None = None,
                 curve: CurveServer | None = None, relay_curve: CurveKeys | None = None) -> None:
        if not links:
            raise ValueError("a broker needs at least one Mongrel2 link")
        self.link_specs = links
        self.bind = bind
        self.dispatcher = Dispatcher(settings)
        s = self.dispatcher.settings
        self.graceful_timeout_s = graceful_timeout_s
        # Workers of a previous broker reconnect within heartbeat x liveness:
        # until then requests wait (in Mongrel2 or our socket), not 404/503.
        self.startup_grace_s = (s.heartbeat_s * s.liveness if startup_grace_s is None
                                else startup_grace_s)
        self.wakeups = 0  # of the loop: requests per wake-up is the batching achieved
        self._context = context
        self._links: list[Link] = []
        # Wake-up fd, signals that only count, and the one meaning of stop (pool/runloop.py).
        self._loop = RunLoop()
        # The loop's state between wake-ups (see run()).
        self._intake_opens = 0.0  # startup grace: requests wait until then
        self._taking = False  # the grace is over
        self._next_relay_beat = 0.0
        self._next_snapshot = 0.0
        self._registered: dict[zmq.Socket[bytes], int] = {}  # each intake's poll flags
        self._poller = zmq.Poller()
        self.endpoint = ""
        # Consumers of finished requests (access log, metrics, tap), called
        # from the loop with each batch of Done records; see add_done_sink().
        self._done_sinks: list[tuple[Callable[[list[Done]], None],
                                     Callable[[], bool] | None]] = []
        # The dispatcher's snapshot() for other threads (metrics, status page):
        # replaced whole every SNAPSHOT_EVERY_S while `publish_snapshots`, so a
        # reader needs no lock. Empty until the loop runs.
        self.publish_snapshots = False
        self.snapshot: dict[str, Any] = {}
        # The control socket (ops/control.py): an ipc:// endpoint, "auto" for the
        # default derived from the bound worker endpoint, "" for none.
        self.control = control
        self._control: ControlServer | None = None
        # Where to serve /metrics and the status page (ops/status.py); None: nowhere.
        self.metrics_address = metrics
        self.status_server: StatusServer | None = None
        # CURVE (auth/keys.py, auth/zap.py): on the worker port, and as a client of relay+tcp links.
        self.curve = curve
        self.relay_curve = relay_curve
        self._workers = WorkerPort(bind, self.dispatcher, curve)

    def add_done_sink(self, sink: Callable[[list[Done]], None], *,
                      wanted: Callable[[], bool] | None = None) -> None:
        """Call `sink` from the loop with every batch of finished requests.
        A sink must be quick (hand work to another thread if it is not) and
        must not raise: an exception is logged and the batch dropped for it.
        `wanted`, if given, says whether the sink needs records right now (a
        tap with no subscriber does not): while no sink wants them, the
        dispatcher keeps none, which saves its per-request record."""
        self._done_sinks.append((sink, wanted))
        self._update_recording()

    def _update_recording(self) -> None:
        self.dispatcher.record = any(w is None or w() for _, w in self._done_sinks)

    # ---- lifecycle -----------------------------------------------------

    def start(self) -> None:
        ctx = self._context or zmq.Context.instance()
        self._workers.open(ctx)
        self.endpoint = self._workers.endpoint
        try:  # before linking to Mongrel2: a broker that cannot start takes no request
            self._start_control(ctx)
            if self.metrics_address is not None:
                from scale0.ops.status import for_broker  # prometheus_client only when asked for

                self.status_server = for_broker(self, self.metrics_address)
                self.status_server.start()
        except Exception:
            if self._control is not None:
                self._control.close()
                self._control = None
            self._workers.close()
            raise
        self._links = [make_link(index, spec, self.dispatcher, ctx, self.relay_curve)
                       for index, spec in enumerate(self.link_specs)]

    def stop(self, *, force: bool | None = None) -> None:
        """Graceful stop: take no new requests, finish those held, then end.
        `force=None` (a signal): a second call ends at once. True or False
        (`ctl shutdown`): as asked, so a repeated graceful shutdown stays
        graceful. Safe from a signal handler (sets flags, wakes the poll)."""
        self._loop.request_stop(force)

    def close(self) -> None:
        if self.status_server is not None:
            self.status_server.close()
        for link in self._links:
            link.close()
        self._workers.close()
        if self._control is not None:
            self._control.close()
        if self._context is None:
            # Our own context: term() waits for the lingering replies; process
            # exit alone would kill the I/O thread with them still queued.
            zmq.Context.instance().term()
        self._loop.close()

    def install_signal_handlers(self) -> None:
        """SIGINT/SIGTERM stop the loop; SIGHUP re-reads the authorized keys.
        Handlers only count and wake the poll; the loop acts on its next turn."""
        self._loop.install_signals(count=(signal.SIGHUP,))

    @property
    def _forced(self) -> bool:
        return self._loop.stop.forced

    @property
    def _draining(self) -> bool:
        """A graceful stop began: its deadline is `self._loop.stop.deadline`."""
        return self._loop.stop.deadline > 0

    # ---- the loop ------------------------------------------------------

    def run(self) -> None:
        if self._workers.socket is None:
            self.start()
        d, links, stop = self.dispatcher, self._links, self._loop.stop
        handlers = self._handlers()
        poller = self._poller
        for sock in handlers:  # the intake sockets come and go in _poll_intake
            if not any(sock is link.intake for link in links):
                poller.register(sock, zmq.POLLIN)
        timers = self._timers()
        monotonic = time.monotonic
        self._intake_opens = monotonic() + self.startup_grace_s
        while True:
            now = monotonic()
            if stop.begin(now, self.graceful_timeout_s):
                self._stop_intake(now)
            if stop.stopping:
                for link in links:
                    link.handover(now)
                self._flush()
                if stop.overdue(now) or self._drained():
                    break
            if self._loop.take(signal.SIGHUP) and self.curve is not None:
                self.curve.reload()  # in the ZAP thread
            self._poll_intake()
            events = poller.poll(poll_timeout_ms(timers.plan(now), monotonic()))
            self.wakeups += 1
            now = monotonic()
            for sock, _ in events:
                handlers[sock](now)
            self._flush()
            for link in links:  # an XPUB always polls writable: retry at every wake-up
                link.replies.retry()
            timers.fire(now)
            if d.done:
                self._pass_done()
        left = d.shutdown(monotonic())  # whatever the grace period did not finish
        self._flush()
        self._pass_done()
        if left:
            log.warning("stopped with %d requests unfinished (answered 503)", left)
        log.info("broker stopping after %d wake-ups", self.wakeups)

    def _handlers(self) -> dict[Any, Handler]:
        """Which reader runs when a socket is readable."""
        handlers: dict[Any, Handler] = {self._workers.socket: self._workers.read}
        for link in self._links:
            handlers[link.intake] = link.read
            handlers.update(link.handlers())
        control = self._control
        for sock in control.sockets if control is not None else ():
            handlers[sock] = partial(self._on_control, sock)
        # By fd: zmq.Poller gives back the int it was given.
        handlers[self._loop.fileno()] = lambda now: self._loop.drain()
        return handlers

    def _timers(self) -> Timers:
        d, links = self.dispatcher, self._links
        relays = any(link.spec.relay for link in links)
        return Timers([
            Timer("startup grace",
                  lambda now: NEVER if self._taking or self._draining else self._intake_opens,
                  self._open_intake),
            Timer("relay heartbeat", lambda now: self._next_relay_beat if relays else NEVER,
                  self._beat_relays),
            Timer("held replies", lambda now: now + HELD_RETRY_S
                  if any(link.replies.held for link in links) else NEVER),
            Timer("stopping", lambda now: now + DRAIN_CHECK_S if self._draining else NEVER),
            Timer("snapshot", lambda now: self._next_snapshot if self.publish_snapshots
                  else NEVER, self._take_snapshot),
            Timer("dispatcher", lambda now: d.next_deadline(), self._tick),
        ])

    @property
    def _intake(self) -> bool:
        return self._taking and not self._draining

    def _open_intake(self, now: float) -> None:
        self._taking = True
        log.info("taking requests")
        self._next_relay_beat = now  # a relay sends nothing before our HELLO

    def _beat_relays(self, now: float) -> None:
        """HELLO once intake opens (so a relay sends nothing during the
        startup grace), then a HEARTBEAT every heartbeat interval."""
        self._next_relay_beat = now + self.dispatcher.settings.heartbeat_s
        intake = self._intake
        for link in self._links:
            link.beat(intake=intake)

    def _take_snapshot(self, now: float) -> None:
        self._next_snapshot = now + SNAPSHOT_EVERY_S
        self.snapshot = {**self.dispatcher.snapshot(now), "keys": self.key_status()}

    def _tick(self, now: float) -> None:
        self.dispatcher.on_tick(now)
        self._flush()

    def _poll_intake(self) -> None:
        """Read a link only while its replies can be delivered (or while it
        hands over: every request sent here must be read). Registered anew
        only on a change, not on every wake-up."""
        intake, registered, poller = self._intake, self._registered, self._poller
        for link in self._links:
            flags = zmq.POLLIN if (intake and link.writable) or link.handing_over else 0
            sock = link.intake
            if registered.get(sock, 0) != flags:
                registered[sock] = flags
                if flags:
                    poller.register(sock, flags)
                else:
                    poller.unregister(sock)

    def _on_control(self, sock: zmq.Socket[bytes], now: float) -> None:
        assert self._control is not None
        self._control.on_readable(sock, now)
        self._update_recording()  # a tap may have come or gone

    def _pass_done(self) -> None:
        batch, self.dispatcher.done = self.dispatcher.done, []
        if not batch:
            return
        for sink, _ in self._done_sinks:
            try:
                sink(batch)
            except Exception:
                log.exception("a consumer of finished requests failed")

    def _stop_intake(self, now: float) -> None:
        """Start the handover of every link (see the module docstring)."""
        log.info("draining: no new requests, %d in progress",
                 len(self.dispatcher.requests))
        for link in self._links:
            link.stop_intake(now)
        self._flush()

    def _drained(self) -> bool:
        return (not self.dispatcher.requests
                and all(link.closed and not link.replies.held for link in self._links))

    def _flush(self) -> None:
        """Send what the dispatcher decided: to workers, then replies per link."""
        d = self.dispatcher
        self._workers.send()
        if d.to_unlink:  # spooled bodies whose request is over (net/spool_files.py)
            unlink, d.to_unlink = d.to_unlink, []
            spool_files.remove(unlink, d.settings.upload_dir)
        if d.to_mongrel2:
            out2, d.to_mongrel2 = d.to_mongrel2, []
            links = self._links
            if len(links) == 1:
                links[0].replies.publish([message for _, message in out2])
            else:
                by_link: dict[int, list[bytes]] = {}
                for index, message in out2:
                    by_link.setdefault(index, []).append(message)
                for index, messages in by_link.items():
                    links[index].replies.publish(messages)
            if d.to_workers:  # removing an unreachable worker may answer clients
                self._flush()

    def ready_line(self) -> str:
        links = " ".join(str(spec) for spec in self.link_specs)
        line = f"READY broker pid={os.getpid()} workers={self.endpoint} mongrel2={links}"
        if self._control is not None:
            line += f" control={self._control.endpoint}"
        if self.status_server is not None:
            line += f" metrics={self.status_server.url}/metrics"
        return line

    # ---- control interface (ops/control.py; commands run in the loop) --------

    def _start_control(self, ctx: zmq.Context[zmq.Socket[bytes]]) -> None:
        if not self.control:
            return
        endpoint = default_endpoint(self.endpoint) if self.control == "auto" else self.control
        self._control = ControlServer(self, endpoint)
        self._control.start(ctx)
        self.add_done_sink(self._control.on_done, wanted=self._control.tapping)

    @property
    def taking(self) -> bool:
        """Mongrel2's requests are read: the startup grace is over (ctl status)."""
        return self._taking

    @property
    def stopping(self) -> bool:
        return self._loop.stop.stopping

    def key_status(self) -> dict[str, Any]:
        return self._workers.key_status()

    def link_status(self) -> list[dict[str, Any]]:
        return [link.status() for link in self._links]
