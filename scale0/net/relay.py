"""The relay: one Mongrel2 handler shared by several brokers, without loss.

Mongrel2's PUSH deals every message round-robin to whichever handlers are
connected. With several brokers connected directly, that breaks what
belongs to one client connection: an upload's start and done, the download
credits of a streamed reply and a pipelined second request land on
different brokers. And a broker that leaves loses whatever Mongrel2 had
already queued for it (docs/reliability.md).

The relay is the only handler Mongrel2 sees: it PULLs from Mongrel2's
send_spec and deals requests to brokers over a ROUTER; brokers PUBlish their
replies straight to Mongrel2's recv_spec, or, given the relay's recv_spec,
send them back to the relay, which publishes them (a broker on another host
then needs no path to Mongrel2's own ports). It lives as long as its
Mongrel2 (under `scale0 up` it stops after the brokers), so brokers can come
and go without Mongrel2 noticing. The rules (sticky connections, credits,
leaving as a handshake) are `RelayCore`'s, in core/relaycore.py; the wire is
S0R1 (wire/s0r1.py, docs/protocol.md Appendix B). This module is the loop
around them: it owns the sockets and the clock. With `--metrics` it also
publishes a snapshot of its state for ops/relay_status.py to serve.

A broker that dies (silent past its heartbeat x liveness, or unreachable)
takes its clients' requests with it; nobody else can answer them. Given
Mongrel2's recv_spec (`--mongrel2-recv`), the relay closes that broker's
connections at once (an empty reply per connection closes it): a client
waiting for a reply sees its connection closed instead of hanging until its
own timeout, and its next request goes to another broker.
"""

from __future__ import annotations

import logging
import signal
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import zmq

from scale0.auth.zap import CurveServer
from scale0.config import RelayConfig, default
from scale0.core.relaycore import RelayCore
from scale0.net.frames import recv_frames, recv_one, send_frames
from scale0.net.handover import HANDOVER_TIMEOUT_S, MongrelPull
from scale0.net.links import Handler
from scale0.net.replies import XPubReplies
from scale0.net.timers import NEVER, Timer, Timers, poll_timeout_ms
from scale0.pool.runloop import RunLoop
from scale0.wire import s0r1

if TYPE_CHECKING:
    from scale0.ops.status import StatusServer

__all__ = ["Relay", "RelayCore"]

log = logging.getLogger(__name__)

BATCH = 256
# Brokers send the relay only short control frames (HELLO S0R1 <window> <ms>,
# CREDIT <n>, ...): a peer sending a larger frame is disconnected by libzmq.
MAX_BROKER_MESSAGE_BYTES = 4096
# With a recv_spec, brokers linked as relay+ENDPOINT alone send their replies
# here: frames as big as the broker takes from its workers (2 MiB, net/broker.py).
MAX_BROKER_REPLY_FRAME_BYTES = 4 << 20
HELD_RETRY_S = 0.02  # how often held replies are offered to Mongrel2 again
LEAVING_CHECK_S = 0.05  # stopping: how often the loop looks whether Mongrel2 let go
SNAPSHOT_EVERY_S = 0.5  # how stale `Relay.snapshot` may be, when other threads read it


class Relay:
    """The I/O loop around RelayCore. Constructors do no I/O."""

    def __init__(self, send_spec: str, bind: str, *,
                 heartbeat_s: float = default(RelayConfig, "heartbeat"),
                 liveness: int = default(RelayConfig, "liveness"), recv_spec: str = "",
                 recv_ident: bytes = b"",
                 max_peer_heartbeat_s: float = default(RelayConfig, "max_peer_heartbeat"),
                 curve: CurveServer | None = None,
                 metrics: tuple[str, int] | None = None) -> None:
        self.send_spec = send_spec
        self.bind = bind
        # Mongrel2's recv_spec (and recv_ident), "" for none: where the relay
        # closes a lost broker's connections and publishes the replies that
        # brokers linked as relay+ENDPOINT alone send it.
        self.recv_spec = recv_spec
        self.recv_ident = recv_ident
        self.curve = curve  # CURVE on the broker port (auth/keys.py, auth/zap.py)
        self.core = RelayCore(heartbeat_s, liveness, max_peer_heartbeat_s=max_peer_heartbeat_s,
                              close_lost=bool(recv_spec))
        self.endpoint = ""
        # Wake-up fd, signals that only count, and the one meaning of stop (pool/runloop.py).
        self._loop = RunLoop()
        self._ctx: zmq.Context[zmq.Socket[bytes]] | None = None
        self._mongrel2: MongrelPull | None = None
        self._router: zmq.Socket[bytes] | None = None
        self._replies: XPubReplies | None = None
        self.stray_replies = 0  # replies sent to a relay without a recv_spec (dropped)
        self.wakeups = 0  # of the loop: messages per wake-up is the batching achieved
        self.mongrel2_messages = 0  # read from Mongrel2's PUSH
        # Where to serve /metrics and /status.json (ops/relay_status.py); None: nowhere.
        self.metrics_address = metrics
        self.status_server: StatusServer | None = None
        # `snapshot()` for other threads, replaced whole every SNAPSHOT_EVERY_S
        # while `publish_snapshots` (so it is read without a lock).
        self.publish_snapshots = False
        self.snapshot: dict[str, Any] = {}
        self._next_snapshot = 0.0
        # The loop's state between wake-ups (see run()).
        self._poller = zmq.Poller()
        self._reading = False  # Mongrel2's PULL is registered
        self._leaving_until = 0.0  # stopping: Mongrel2 has until then to close its end
        self._left_at = 0.0  # disconnected from Mongrel2: hand over what waits, then end

    def start(self) -> None:
        self._ctx = ctx = zmq.Context()
        router = ctx.socket(zmq.ROUTER)
        router.setsockopt(zmq.LINGER, 1000)
        router.setsockopt(zmq.ROUTER_MANDATORY, 1)
        router.setsockopt(zmq.SNDHWM, 0)  # bounded by the brokers' credit
        router.setsockopt(zmq.RCVHWM, 0)
        router.setsockopt(zmq.MAXMSGSIZE, MAX_BROKER_REPLY_FRAME_BYTES if self.recv_spec
                          else MAX_BROKER_MESSAGE_BYTES)
        if self.curve is not None:  # ZAP first: a CURVE port never runs without it
            self.curve.start(ctx)
            self.curve.secure(router)
        router.bind(self.bind)
        self.endpoint = router.getsockopt_string(zmq.LAST_ENDPOINT)
        self._router, self._mongrel2 = router, MongrelPull(ctx, self.send_spec)
        if self.recv_spec:
            self._replies = XPubReplies(ctx, self.recv_spec, self.recv_ident)
        if self.metrics_address is not None:
            from scale0.ops.relay_status import for_relay  # prometheus_client only when asked for

            self.status_server = for_relay(self, self.metrics_address)
            self._take_snapshot(time.monotonic())  # a whole document from the first request
            self.status_server.start()

    def stop(self) -> None:
        """Signal-safe. Graceful: leave Mongrel2 as net/handover.py describes (half-
        close, read until Mongrel2 closes), hand what was read to
        the brokers, then end; meanwhile Mongrel2 keeps new requests for the
        next relay. A second call ends at once."""
        self._loop.request_stop()

    def install_signal_handlers(self) -> None:
        """SIGINT/SIGTERM stop; SIGHUP re-reads the authorized keys. Handlers
        only count and wake the poll; the loop acts on its next turn."""
        self._loop.install_signals(count=(signal.SIGHUP,))

    # ---- the loop ------------------------------------------------------

    def run(self) -> None:
        if self._router is None:
            self.start()
        router, mongrel2, core = self._router, self._mongrel2, self.core
        assert router is not None and mongrel2 is not None
        handlers = self._handlers(router, mongrel2)
        for sock in handlers:  # Mongrel2's PULL comes and goes in _poll_intake
            if sock is not mongrel2.socket:
                self._poller.register(sock, zmq.POLLIN)
        timers = self._timers()
        replies = self._replies
        monotonic = time.monotonic
        stop = self._loop.stop
        while not stop.forced:
            now = monotonic()
            if stop.begin(now, HANDOVER_TIMEOUT_S):  # Mongrel2 has this long to close its end
                self._leaving_until = stop.deadline
                if not mongrel2.half_close():
                    self._leave(now)
            if self._loop.take(signal.SIGHUP) and self.curve is not None:
                self.curve.reload()  # in the ZAP thread
            if self._leaving_until and not self._left_at and now >= self._leaving_until:
                log.warning("Mongrel2 did not close the half-closed link: disconnecting")
                self._leave(now)
            if self._left_at and ((not core.pending and not self._held())
                                  or now >= self._left_at + HANDOVER_TIMEOUT_S):
                break
            self._poll_intake(mongrel2)
            events = self._poller.poll(poll_timeout_ms(timers.plan(now), monotonic()))
            self.wakeups += 1
            now = monotonic()
            for sock, _ in events:
                handlers[sock](now)
            if replies is not None:  # an XPUB always polls writable: retry at every wake-up
                replies.retry()
            core.on_tick(now)
            self._flush(router)
            if self.publish_snapshots and now >= self._next_snapshot:
                self._take_snapshot(now)
        if core.pending:
            log.error("relay stopping with %d requests no broker took", len(core.pending))
        log.info("relay stopping after %d wake-ups; %d connections released by draining "
                 "brokers, %d messages no broker took", self.wakeups, core.released, core.dropped)

    def _handlers(self, router: zmq.Socket[bytes], mongrel2: MongrelPull) -> dict[Any, Handler]:
        handlers: dict[Any, Handler] = {
            router: self._read_brokers,
            mongrel2.socket: self._read_mongrel2,
            mongrel2.monitor: self._read_monitor,
            self._loop.fileno(): lambda now: self._loop.drain(),  # by fd: as zmq.Poller gives it
        }
        if self._replies is not None:
            replies = self._replies
            handlers[replies.socket] = lambda now: replies.read_subscriptions()
        return handlers

    def _timers(self) -> Timers:
        """On_tick runs at every wake-up; these only say when to wake at the latest."""
        core = self.core
        return Timers([
            Timer("heartbeat", lambda now: core.next_deadline()),
            Timer("leaving", lambda now: now + LEAVING_CHECK_S if self._leaving_until else NEVER),
            Timer("held replies", lambda now: now + HELD_RETRY_S if self._held() else NEVER),
            Timer("snapshot", lambda now: self._next_snapshot if self.publish_snapshots
                  else NEVER),
        ])

    def _take_snapshot(self, now: float) -> None:
        self._next_snapshot = now + SNAPSHOT_EVERY_S
        snap = self.core.snapshot(now)
        replies = self._replies
        snap["counters"].update(
            mongrel2_messages=self.mongrel2_messages, wakeups=self.wakeups,
            stray_replies=self.stray_replies,
            replies_published=replies.published if replies is not None else 0,
            replies_dropped=replies.dropped if replies is not None else 0)
        snap["replies_held"] = len(replies.held) if replies is not None else 0
        snap["mongrel2_reading"] = self._reading
        self.snapshot = snap

    def _held(self) -> bool:
        return self._replies is not None and bool(self._replies.held)

    def _poll_intake(self, mongrel2: MongrelPull) -> None:
        """While leaving, read all Mongrel2 sent (it waits in `pending` if need
        be). Else only while the core takes more and our replies (if we carry
        any) can go out."""
        replies = self._replies
        want = ((self.core.intake and (replies is None or replies.writable))
                or self._leaving_until > 0) and not self._left_at
        if want != self._reading:
            self._reading = want
            if want:
                self._poller.register(mongrel2.socket, zmq.POLLIN)
            else:
                self._poller.unregister(mongrel2.socket)

    def _read_brokers(self, now: float) -> None:
        """Up to BATCH messages. The replies among them are published together
        (up to 256 per ZeroMQ message, net/replies.py), not one XPUB message
        per broker message: a burst stays far below the XPUB's high-water mark."""
        router, core = self._router, self.core
        assert router is not None
        replies: list[bytes] = []
        for _ in range(BATCH):
            try:
                frames = recv_frames(router)
            except zmq.Again:
                break
            try:
                message = s0r1.split_from_broker(frames[1:])
            except s0r1.S0R1Error:
                core.malformed += 1
                continue
            if isinstance(message, s0r1.Replies):
                replies += message.replies  # each broker's in order: a connection has one
            else:
                core.on_broker(frames[0], message, now)
        if replies:
            self._publish(replies)  # before the closes _flush sends, as when sent one by one
        self._flush(router)

    def _read_mongrel2(self, now: float) -> None:
        """Registered only while the core takes more, or while leaving."""
        core, mongrel2, router = self.core, self._mongrel2, self._router
        assert mongrel2 is not None and router is not None
        take, pull = core.on_mongrel2, mongrel2.socket
        read = 0
        while read < BATCH:
            try:
                raw = recv_one(pull)
            except zmq.Again:
                break
            take(raw)
            read += 1
            if core.pending and not (core.intake or self._leaving_until):
                break  # MAX_PENDING new connections wait: the rest in Mongrel2
        self.mongrel2_messages += read
        self._flush(router)

    def _read_monitor(self, now: float) -> None:
        assert self._mongrel2 is not None
        if self._mongrel2.read_monitor() and self._leaving_until and not self._left_at:
            self._leave(now)  # Mongrel2 closed: all it sent is here

    def _leave(self, now: float) -> None:
        """Read what is left, leave Mongrel2's PUSH for good, pass it on."""
        assert self._router is not None and self._mongrel2 is not None
        self._left_at = now
        self.mongrel2_messages += self._mongrel2.leave(self.core.on_mongrel2)
        self._flush(self._router)
        if self.core.pending:
            log.info("%d requests wait for a broker", len(self.core.pending))

    def _publish(self, replies: Sequence[bytes]) -> None:
        if self._replies is not None:
            self._replies.publish(replies)
            return
        self.stray_replies += len(replies)
        if self.stray_replies == len(replies) or self.stray_replies % 10_000 < len(replies):
            log.error("a broker sent replies, but this relay has no recv_spec to publish "
                      "them to: dropped (%d so far); give it --mongrel2-recv",
                      self.stray_replies)

    def _flush(self, router: zmq.Socket[bytes]) -> None:
        """Send what the core decided. The Mongrel2 messages for one broker
        go out as one multipart message (Appendix B), in order, and before
        any control message that follows them: one ZeroMQ message per
        wake-up instead of one per request."""
        core = self.core
        if core.to_mongrel2:
            self._send_closes()
        while core.to_brokers:
            out, core.to_brokers = core.to_brokers, []
            batches: dict[bytes, list[bytes]] = {}
            for frames in out:
                ident = frames[0]
                if len(frames) == 2:  # [ident, Mongrel2 message]
                    batch = batches.get(ident)
                    if batch is None:
                        batches[ident] = [ident, frames[1]]
                    else:
                        batch.append(frames[1])
                    continue
                batch = batches.pop(ident, None)
                if batch is not None:
                    self._send_batch(router, batch)
                try:
                    send_frames(router, frames)
                except zmq.ZMQError:  # EHOSTUNREACH: that broker's connection is gone
                    core.unreachable(ident)
            for batch in batches.values():
                self._send_batch(router, batch)

    def _send_batch(self, router: zmq.Socket[bytes], batch: list[bytes]) -> None:
        try:
            send_frames(router, batch)
        except zmq.ZMQError:  # EHOSTUNREACH: that broker's connection is gone
            core = self.core
            core.unreachable(batch[0])
            for raw in batch[1:]:  # give them to another broker, in order
                core.on_mongrel2(raw)

    def _send_closes(self) -> None:
        """A lost broker's connections: closes, in order with the replies."""
        out, self.core.to_mongrel2 = self.core.to_mongrel2, []
        if self._replies is not None:
            self._replies.publish(out)

    def close(self) -> None:
        if self.status_server is not None:
            self.status_server.close()
        if self._replies is not None:
            self._replies.close()
        if self._mongrel2 is not None:
            self._mongrel2.close()
        if self._router is not None:
            self._router.close()
        if self.curve is not None:
            self.curve.close()
        if self._ctx is not None:
            self._ctx.term()
        self._loop.close()

    def ready_line(self) -> str:
        line = f"READY relay brokers={self.endpoint} mongrel2={self.send_spec}"
        if self.recv_spec:
            line += f" replies={self.recv_spec}"
        if self.status_server is not None:
            line += f" metrics={self.status_server.url}/metrics"
        return line
