"""The broker's I/O loop: sockets, poller and timers around `dispatch.Dispatcher`.

For each Mongrel2 link the broker connects a PULL to its send_spec and an XPUB
to its recv_spec (MONGREL2.md "Sockets"); workers connect DEALERs to the
broker's ROUTER. The loop owns every socket and the clock; all decisions are
the dispatcher's.

A link takes no requests until Mongrel2's SUB has subscribed on our XPUB
(the slow-joiner gap loses replies sent before that): the PULL is only polled
while the link is subscribed. Replies for a link that cannot take them right
now (unsubscribed, or XPUB at its high-water mark with XPUB_NODROP) are held
in order and the link's intake pauses until they are flushed.

A link to a relay given without a RECV_SPEC (`relay+tcp://HOST:PORT`) sends
its replies to the relay too, over the same DEALER, and the relay publishes
them to Mongrel2 (docs/protocol.md Appendix B): a broker on another host
then needs to reach only the relay, never Mongrel2's own ports.

Handing over without losing requests: a stopping broker leaves a Mongrel2
it is connected to directly as net/handover.py describes (half-close, read until
Mongrel2 closes, then disconnect); Mongrel2 sends new requests to the other
brokers meanwhile (or keeps them until one connects). A link through a relay
leaves with the relay's DRAIN/LEAVE/BYE handshake instead (net/relay.py).
"""

from __future__ import annotations

import logging
import math
import os
import signal
import socket
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import zmq

from scale0.auth.keys import CurveKeys
from scale0.auth.zap import CurveServer, HelloGate
from scale0.config import BrokerConfig, default
from scale0.config.kinds import LinkSpec as LinkSpec  # re-exported; config parses it, no zmq
from scale0.core.dispatch import Dispatcher, DispatchSettings, Done
from scale0.net import spool_files
from scale0.net.frames import recv_frames, recv_one, send_frames, send_one
from scale0.net.handover import HANDOVER_TIMEOUT_S, MongrelPull
from scale0.ops.control import ControlServer, default_endpoint

if TYPE_CHECKING:
    from scale0.ops.status import StatusServer

log = logging.getLogger(__name__)

BATCH = 256  # messages read from one socket per wake-up before looking at the others
MAX_HELD_REPLIES = 100_000
SNAPSHOT_EVERY_S = 0.5  # how stale `Broker.snapshot` may be, when other threads read it
HELD_RETRY_S = 0.02  # how often replies held for a Mongrel2 are offered again
RELAY_WINDOW = 512  # messages a relay may send us ahead of our reading them
# ZMQ_MAXMSGSIZE of the workers' ROUTER, per frame: a worker that sends a larger
# one is disconnected by libzmq before it is read. worker/process.py sends a reply in
# pieces of at most 1 MiB (MAX_MESSAGE_BYTES) plus the Mongrel2 reply prefix;
# a HELLO is at most some 300 KB (protocol.md 3.1). 2 MiB leaves room for both.
MAX_WORKER_FRAME_BYTES = 2 << 20


@dataclass(slots=True, eq=False)
class _Link:
    index: int
    spec: LinkSpec
    pull: zmq.Socket[bytes]  # a PULL from Mongrel2, or a DEALER to a relay
    pub: zmq.Socket[bytes] | None  # None: replies go to the relay over `pull`
    mongrel2: MongrelPull | None  # owns `pull` when it is Mongrel2's; None for a relay
    subscriptions: int = 0
    held: deque[bytes] = field(default_factory=deque)
    replies: int = 0
    closing_until: float = 0.0  # half-closed: reading what is left until Mongrel2 closes
    closed: bool = False  # disconnected from Mongrel2's PUSH for good
    joined: bool = False  # relay: HELLO sent
    unacked: int = 0  # relay: messages read since our last CREDIT
    left_at: float = 0.0  # relay: when LEAVE was sent
    bye: bool = False  # relay: BYE came (nothing more will)

    @property
    def subscribed(self) -> bool:
        """Whether replies can be sent: Mongrel2 subscribed to our XPUB, or
        (replies through the relay) the relay holds them until it can."""
        return self.subscriptions > 0 or self.pub is None

    @property
    def writable(self) -> bool:
        return self.subscribed and not self.held


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
        self._forced = False
        self.wakeups = 0  # of the loop: requests per wake-up is the batching achieved
        self._context = context
        self._links: list[_Link] = []
        self._router: zmq.Socket[bytes] | None = None
        self._stopping = False
        self._wakeup_r: socket.socket | None = None
        self._wakeup_w: socket.socket | None = None
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
        self._hello_gate = HelloGate(curve.authorizer) if curve is not None else None

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
        router = ctx.socket(zmq.ROUTER)
        router.setsockopt(zmq.LINGER, 0)
        router.setsockopt(zmq.ROUTER_MANDATORY, 1)  # a vanished worker raises, never drops
        router.setsockopt(zmq.SNDHWM, 0)
        router.setsockopt(zmq.RCVHWM, 0)
        router.setsockopt(zmq.MAXMSGSIZE, MAX_WORKER_FRAME_BYTES)
        try:
            if self.curve is not None:  # ZAP first: a CURVE port never runs without it
                self.curve.start(ctx)
                self.curve.secure(router)
            router.bind(self.bind)
        except Exception:
            router.close(0)
            if self.curve is not None:
                self.curve.close()
            raise
        self.endpoint = router.getsockopt_string(zmq.LAST_ENDPOINT)
        self._router = router
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
            router.close(0)
            self._router = None
            raise
        for index, spec in enumerate(self.link_specs):
            mongrel2: MongrelPull | None = None
            if spec.relay:
                pull = ctx.socket(zmq.DEALER)
                pull.setsockopt(zmq.LINGER, 1000)
                pull.setsockopt(zmq.RCVHWM, 0)  # bounded by our credit
                # Nothing queues for a relay that is not there: HELLO and
                # HEARTBEAT are sent again anyway (see _relay_send).
                pull.setsockopt(zmq.IMMEDIATE, 1)
                pull.setsockopt(zmq.SNDHWM, 100)
                if self.relay_curve is not None:
                    self.relay_curve.client_socket(pull)
                pull.connect(spec.send_spec)
            else:
                mongrel2 = MongrelPull(ctx, spec.send_spec)
                pull = mongrel2.socket
            pub: zmq.Socket[bytes] | None = None
            if spec.recv_spec:
                pub = ctx.socket(zmq.XPUB)
                pub.setsockopt(zmq.LINGER, 2000)  # let queued replies go out on a clean stop
                pub.setsockopt(zmq.XPUB_NODROP, 1)  # at HWM, send raises EAGAIN: hold replies
                pub.setsockopt(zmq.XPUB_VERBOSE, 1)  # see every (re)subscription
                pub.connect(spec.recv_spec)
            self._links.append(_Link(index, spec, pull, pub, mongrel2))

    def stop(self, *, force: bool | None = None) -> None:
        """Graceful stop: take no new requests, finish those held, then end.
        `force=None` (a signal): a second call ends at once. True or False
        (`ctl shutdown`): as asked, so a repeated graceful shutdown stays
        graceful. Safe from a signal handler (sets flags, wakes the poll)."""
        self._forced = self._forced or (self._stopping if force is None else force)
        self._stopping = True
        if self._wakeup_w is not None:
            try:
                self._wakeup_w.send(b"\0")
            except OSError:
                pass

    def close(self) -> None:
        if self.status_server is not None:
            self.status_server.close()
        for link in self._links:
            if link.spec.relay and link.joined and not link.left_at:
                # A forced or timed-out stop: the relay forgets our connections
                # now instead of at our expiry (their next messages go elsewhere).
                self._relay_send(link, b"LEAVE")
            if link.mongrel2 is not None:
                link.mongrel2.close()
            else:  # LINGER 1 s: replies queued for the relay go out first
                link.pull.close(None if link.pub is None else 0)
            if link.pub is not None:
                link.pub.close()  # LINGER 2 s: replies still queued go out first
        if self._router is not None:
            self._router.close(0)
        if self.curve is not None:
            self.curve.close()
        if self._control is not None:
            self._control.close()
        if self._context is None:
            # Our own context: term() waits for the lingering replies; process
            # exit alone would kill the I/O thread with them still queued.
            zmq.Context.instance().term()
        for sock in (self._wakeup_r, self._wakeup_w):
            if sock is not None:
                sock.close()

    def install_signal_handlers(self) -> None:
        """SIGINT/SIGTERM stop the loop. Handlers only set a flag (and wake the poll)."""
        self._wakeup_r, self._wakeup_w = socket.socketpair()
        self._wakeup_r.setblocking(False)
        self._wakeup_w.setblocking(False)
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: self.stop())
        # SIGHUP: re-read the authorized keys (in the ZAP thread); else nothing.
        signal.signal(signal.SIGHUP, lambda *_: self.curve.reload() if self.curve else None)

    # ---- the loop ------------------------------------------------------

    def run(self) -> None:
        if self._router is None:
            self.start()
        router = self._router
        assert router is not None
        d = self.dispatcher
        links = self._links
        pull_to_link = {link.pull: link for link in links}
        pub_to_link = {link.pub: link for link in links if link.pub is not None}
        monitor_to_link = {link.mongrel2.monitor: link for link in links
                           if link.mongrel2 is not None}
        poller = zmq.Poller()
        poller.register(router, zmq.POLLIN)
        if self._wakeup_r is not None:
            poller.register(self._wakeup_r, zmq.POLLIN)
        # What each link's sockets are registered for; changed only on a change
        # of state, not re-registered on every wake-up.
        registered: dict[zmq.Socket[bytes], int] = {}
        for link in links:
            if link.pub is not None:
                registered[link.pub] = zmq.POLLIN
                poller.register(link.pub, zmq.POLLIN)
            if link.mongrel2 is not None:
                poller.register(link.mongrel2.monitor, zmq.POLLIN)
        relays = any(link.spec.relay for link in links)
        control = self._control
        for sock in control.sockets if control is not None else ():
            poller.register(sock, zmq.POLLIN)
        monotonic = time.monotonic
        intake_opens = monotonic() + self.startup_grace_s
        drain_until = 0.0
        next_snapshot = 0.0
        next_relay_beat = 0.0
        taking = False
        while True:
            now = monotonic()
            if self._stopping and not drain_until:
                drain_until = now + self.graceful_timeout_s
                self._stop_intake(now)
            if drain_until:
                self._finish_handovers(now)
                if self._forced or now >= drain_until or self._drained():
                    break
            intake = now >= intake_opens and not drain_until
            held_retry = False
            if intake and not taking:
                taking = True
                log.info("taking requests")
                next_relay_beat = now  # a relay sends nothing before our HELLO
            if now >= next_relay_beat:
                next_relay_beat = now + d.settings.heartbeat_s
                self._beat_relays(intake)
            for link in links:
                # Read from Mongrel2 only while its replies can be delivered
                # (or while handing over: every request sent here must be read).
                # An XPUB always polls writable, even at its high-water mark or
                # with no peer, so held replies are retried on a timer instead.
                take = (intake and link.writable) or link.closing_until > 0
                self._want(poller, registered, link.pull, zmq.POLLIN if take else 0)
                if link.held:
                    held_retry = True
            deadline = d.next_deadline()
            if held_retry:
                deadline = min(deadline, now + HELD_RETRY_S)
            if not intake and not drain_until:
                deadline = min(deadline, intake_opens)
            if drain_until:
                deadline = min(deadline, now + 0.1)  # re-check _drained() often
            if self.publish_snapshots:
                deadline = min(deadline, next_snapshot)
            if relays:
                deadline = min(deadline, next_relay_beat)
            timeout_ms = max(0, math.ceil((deadline - monotonic()) * 1000))
            events = poller.poll(timeout_ms)
            self.wakeups += 1
            now = monotonic()
            for sock, _ in events:
                if sock is router:
                    self._read_workers(router, now)
                elif sock in pull_to_link:
                    self._read_mongrel2(pull_to_link[sock], now)
                elif sock in pub_to_link:
                    self._read_subscriptions(pub_to_link[sock])
                elif sock in monitor_to_link:
                    self._read_monitor(monitor_to_link[sock], now)
                elif control is not None and sock in control.sockets:
                    control.on_readable(sock, now)
                    self._update_recording()  # a tap may have come or gone
                elif self._wakeup_r is not None:
                    try:
                        self._wakeup_r.recv(64)
                    except OSError:
                        pass
            self._flush(router)
            if held_retry:
                for link in links:
                    self._drain_held(link)
            if now >= deadline:  # new deadlines are later; an early tick is harmless
                d.on_tick(now)
                self._flush(router)
            if d.done:
                self._pass_done()
            if self.publish_snapshots and now >= next_snapshot:
                next_snapshot = now + SNAPSHOT_EVERY_S
                self.snapshot = {**d.snapshot(now), "keys": self.key_status()}
        left = d.shutdown(monotonic())  # whatever the grace period did not finish
        self._flush(router)
        self._pass_done()
        if left:
            log.warning("stopped with %d requests unfinished (answered 503)", left)
        log.info("broker stopping after %d wake-ups", self.wakeups)

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
            if link.spec.relay:
                if link.joined:  # no new connections; LEAVE once our requests are done
                    self._relay_send(link, b"DRAIN")
                    link.closing_until = math.inf
                else:
                    self._close_link(link, now)
                continue
            assert link.mongrel2 is not None
            if link.mongrel2.half_close():
                link.closing_until = now + HANDOVER_TIMEOUT_S
            else:  # not connected (nothing can be in flight to us), or it failed
                self._close_link(link, now)

    def _finish_handovers(self, now: float) -> None:
        for link in self._links:
            if link.bye:
                if not link.closed:
                    self._after_bye(link, now)
                continue
            if link.spec.relay and link.closing_until and not link.left_at:
                # Done when nothing is in progress here: no request, and no
                # upload whose done message the relay would give another broker.
                # Replies through the relay: none may be left held here either.
                d = self.dispatcher
                if (not d.requests and not link.held
                        and not any(key[0] == link.index for key in d.uploads)):
                    self._relay_send(link, b"LEAVE")  # answered BYE after all it sent
                    link.left_at = now
                    link.closing_until = now + HANDOVER_TIMEOUT_S
                continue
            if link.closing_until and now >= link.closing_until:
                log.warning("%s did not let go of the link in %.0f s: disconnecting",
                            link.spec.send_spec, HANDOVER_TIMEOUT_S)
                self._close_link(link, now)

    def _close_link(self, link: _Link, now: float) -> None:
        """Read every request that reached us, then leave for good."""
        if link.closed:
            return
        link.closed = True
        link.closing_until = 0.0
        if link.mongrel2 is not None:
            d, index = self.dispatcher, link.index
            link.mongrel2.leave(lambda raw: d.on_mongrel2(index, raw, now))
        else:  # a relay: BYE came (nothing follows it), or it did not answer
            try:
                link.pull.disconnect(link.spec.send_spec)
            except zmq.ZMQError:
                pass
        if self._router is not None:
            self._flush(self._router)

    def _read_monitor(self, link: _Link, now: float) -> None:
        assert link.mongrel2 is not None
        if link.mongrel2.read_monitor() and link.closing_until:
            self._close_link(link, now)  # Mongrel2 closed its end: all it sent is here

    def _drained(self) -> bool:
        return (not self.dispatcher.requests
                and all(link.closed and not link.held for link in self._links))

    @staticmethod
    def _want(poller: zmq.Poller, registered: dict[zmq.Socket[bytes], int],
              sock: zmq.Socket[bytes], flags: int) -> None:
        if registered.get(sock, 0) != flags:
            registered[sock] = flags
            if flags:
                poller.register(sock, flags)
            else:
                poller.unregister(sock)

    def _read_mongrel2(self, link: _Link, now: float) -> None:
        if link.spec.relay:
            self._read_relay(link, now)
            return
        d = self.dispatcher
        pull = link.pull
        for _ in range(BATCH):
            try:
                raw = recv_one(pull)
            except zmq.Again:
                return
            d.on_mongrel2(link.index, raw, now)
            if d.to_mongrel2 and not link.writable:
                return

    def _read_relay(self, link: _Link, now: float) -> None:
        d = self.dispatcher
        for _ in range(BATCH):
            try:
                frames = recv_frames(link.pull)
            except zmq.Again:
                break
            if frames[0]:  # Mongrel2 messages, byte for byte (one or a batch)
                for raw in frames:
                    d.on_mongrel2(link.index, raw, now)
                link.unacked += len(frames)
                if d.to_mongrel2 and not link.writable:
                    break
            elif frames == [b"", b"BYE"]:
                link.bye = True
                self._after_bye(link, now)
                return
            elif frames == [b"", b"WHO"]:  # the relay restarted: join again
                link.joined = False
                if not self._stopping:
                    self._beat_relays(True)
            elif frames != [b"", b"HEARTBEAT"]:
                d.warnings.warning("relay message", now, "unexpected message from the relay at %s",
                                   link.spec.send_spec)
        if link.unacked >= RELAY_WINDOW // 4 and not link.closed:
            self._relay_send(link, b"CREDIT %d" % link.unacked)
            link.unacked = 0

    def _after_bye(self, link: _Link, now: float) -> None:
        """The relay let us go. Replies through the relay still need this
        DEALER for the requests read between LEAVE and BYE (and any reply
        held): stay connected until those are out (the graceful timeout
        bounds it), then disconnect."""
        d = self.dispatcher
        if link.pub is None and (link.held or any(
                r.link == link.index and not r.cancelled for r in d.requests.values())):
            link.closing_until = math.inf
            return
        self._close_link(link, now)

    def _beat_relays(self, intake: bool) -> None:
        """HELLO once intake opens (so a relay sends nothing during the
        startup grace), then a HEARTBEAT every heartbeat interval."""
        for link in self._links:
            if not link.spec.relay or link.closed or link.bye:
                continue
            if link.joined:
                self._relay_send(link, b"HEARTBEAT")
            elif intake and link.writable:  # only once its replies can be delivered
                hb_ms = int(self.dispatcher.settings.heartbeat_s * 1000)
                if self._relay_send(link, b"HELLO S0R1 %d %d" % (RELAY_WINDOW, hb_ms)):
                    link.joined, link.unacked = True, 0
                    log.info("joined the relay at %s", link.spec.send_spec)

    @staticmethod
    def _relay_send(link: _Link, message: bytes) -> bool:
        """Never raises: with the relay away (IMMEDIATE, small SNDHWM) a
        control message is dropped; HELLO and HEARTBEAT are sent again, and
        a relay that restarted asks WHO."""
        try:
            send_one(link.pull, message)
            return True
        except zmq.ZMQError:
            return False

    def _read_workers(self, router: zmq.Socket[bytes], now: float) -> None:
        d = self.dispatcher
        gate = self._hello_gate  # CURVE: a HELLO is checked against its key's services
        for _ in range(BATCH):
            try:
                frames = recv_frames(router) if gate is None else gate.recv(router)
            except zmq.Again:
                return
            if frames:  # [] : a refused HELLO, answered by the gate
                d.on_worker(frames[0], frames[1:], now)

    def _read_subscriptions(self, link: _Link) -> None:
        assert link.pub is not None
        while True:
            try:
                message = link.pub.recv(zmq.NOBLOCK)
            except zmq.Again:
                break
            if message[:1] == b"\x01":
                link.subscriptions += 1
                log.info("Mongrel2 at %s subscribed", link.spec.recv_spec)
            elif message[:1] == b"\x00":
                link.subscriptions = max(0, link.subscriptions - 1)
                log.warning("Mongrel2 at %s unsubscribed", link.spec.recv_spec)
        self._drain_held(link)

    def _flush(self, router: zmq.Socket[bytes]) -> None:
        d = self.dispatcher
        if d.to_workers:
            out, d.to_workers = d.to_workers, []
            for frames in out:
                try:
                    send_frames(router, frames)
                except zmq.ZMQError as exc:  # EHOSTUNREACH: that worker is gone
                    worker = d.workers.get(frames[0])
                    if worker is not None:
                        log.warning("worker %s unreachable: %s", worker.label, exc)
                        d.worker_unreachable(worker, frames, time.monotonic())
        if d.to_unlink:  # spooled bodies whose request is over (net/spool_files.py)
            unlink, d.to_unlink = d.to_unlink, []
            spool_files.remove(unlink, d.settings.upload_dir)
        if d.to_mongrel2:
            out2, d.to_mongrel2 = d.to_mongrel2, []
            links = self._links
            if len(links) == 1:
                self._send_replies(links[0], [message for _, message in out2])
            else:
                by_link: dict[int, list[bytes]] = {}
                for index, message in out2:
                    by_link.setdefault(index, []).append(message)
                for index, messages in by_link.items():
                    self._send_replies(links[index], messages)
            if d.to_workers:  # removing an unreachable worker may answer clients
                self._flush(router)

    def _send_replies(self, link: _Link, messages: list[bytes]) -> None:
        """Publish `messages` in order, up to BATCH of them per ZeroMQ message.

        Mongrel2 reads its SUB one frame at a time and takes each frame as a
        reply (handler.c: one zmq_msg_recv per reply, RCVMORE never looked
        at), so a multipart message is that many replies: one wake-up of the
        I/O threads on both sides instead of one per reply. ZeroMQ queues a
        multipart message whole or not at all, so at the high-water mark the
        batch is held whole, in order."""
        ident = link.spec.recv_ident
        if ident:  # Mongrel2 drops replies whose sender lacks its recv_ident prefix.
            messages = [message if message.startswith(ident)
                        else ident + message[message.index(b" "):] for message in messages]
        start = 0
        if link.writable:
            while start < len(messages):
                batch = messages[start:start + BATCH]
                try:
                    self._publish(link, batch)
                except zmq.Again:
                    break
                start += len(batch)
                link.replies += len(batch)
            if start == len(messages):
                return
        if not link.held:
            log.warning("Mongrel2 at %s is not taking replies: holding them, intake paused",
                        _reply_target(link))
        room = MAX_HELD_REPLIES - len(link.held)
        left = len(messages) - start
        if left > room:
            log.error("dropping %d replies: %d replies held for %s", left - max(room, 0),
                      len(link.held), _reply_target(link))
        link.held.extend(messages[start:start + max(room, 0)])

    @staticmethod
    def _publish(link: _Link, batch: list[bytes]) -> None:
        """Send one batch of replies now, or raise zmq.Again. Through the
        relay: an empty frame, then the replies (Appendix B); with no relay
        connected (IMMEDIATE) that raises too, and the replies are held."""
        if link.pub is not None:
            send_frames(link.pub, batch)
        else:
            send_frames(link.pull, [b"", *batch])

    def _drain_held(self, link: _Link) -> None:
        if not link.held:
            return
        held = link.held
        while held and link.subscribed:
            batch = [held[i] for i in range(min(BATCH, len(held)))]
            try:
                self._publish(link, batch)
            except zmq.Again:
                return
            for _ in batch:
                held.popleft()
            link.replies += len(batch)
        if not held:
            log.info("Mongrel2 at %s takes replies again", _reply_target(link))

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
    def stopping(self) -> bool:
        return self._stopping

    def key_status(self) -> dict[str, Any]:
        status: dict[str, Any] = {"curve": False}
        if self.curve is not None and self._hello_gate is not None:
            status = {**self.curve.status(), "hellos_refused": self._hello_gate.refused,
                      "revoked_messages": self._hello_gate.revoked}
        return status

    def link_status(self) -> list[dict[str, Any]]:
        return [{"send_spec": str(link.spec).split(",")[0], "recv_spec": link.spec.recv_spec,
                 "relay": link.spec.relay,
                 "connected": link.mongrel2.connected if link.mongrel2 else link.joined,
                 "subscribed": link.subscriptions > 0 if link.pub is not None else link.joined,
                 "held": len(link.held), "replies": link.replies, "closed": link.closed}
                for link in self._links]


def _reply_target(link: _Link) -> str:
    return link.spec.recv_spec or f"{link.spec.send_spec} (through the relay)"
