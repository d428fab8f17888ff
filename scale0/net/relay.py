"""The relay: one Mongrel2 handler shared by several brokers, without loss.

Mongrel2's PUSH deals every message round-robin to whichever handlers are
connected. With several brokers connected directly, that breaks what
belongs to one client connection: an upload's start and done, the download
credits of a streamed reply and a pipelined second request land on
different brokers. And a broker that leaves loses whatever Mongrel2 had
already queued for it (MONGREL2.md; docs/reliability.md).

The relay is the only handler Mongrel2 sees: it PULLs from Mongrel2's
send_spec and deals requests to brokers over a ROUTER; brokers PUBlish their
replies straight to Mongrel2's recv_spec, or, given the relay's recv_spec,
send them back to the relay, which publishes them (a broker on another host
then needs no path to Mongrel2's own ports). It lives as long as its
Mongrel2 (under `scale0 up` it stops after the brokers), so brokers can come
and go without Mongrel2 noticing. Three rules:

* **Sticky connections.** Every message of a client connection goes to the
  broker that got its first request, until Mongrel2 reports the disconnect
  or that broker leaves.
* **Credits.** A broker says how many messages it can take (HELLO, then
  CREDIT as it reads them); a new connection goes to the broker, among
  those not draining, that has credit and was used least recently. With no
  broker able to take it, the relay stops reading from Mongrel2 (requests
  wait there, not lost). A sticky message is always delivered.
* **Leaving is a handshake.** DRAIN: no new connections for this broker.
  LEAVE: forget my connections; the relay answers BYE, and everything it
  sent before BYE arrives before BYE on the same ordered connection. So a
  broker that reads until BYE has lost nothing.

A broker that dies (silent past its heartbeat x liveness, or unreachable)
takes its clients' requests with it; nobody else can answer them. Given
Mongrel2's recv_spec (`--mongrel2-recv`), the relay closes that broker's
connections at once (an empty reply per connection, MONGREL2.md): a client
waiting for a reply sees its connection closed instead of hanging until its
own timeout, and its next request goes to another broker.

Wire (ROUTER on the relay, DEALER on the broker), `docs/protocol.md`
Appendix B: broker -> relay single frames ``HELLO S0R1 <window>``,
``CREDIT <n>``, ``HEARTBEAT``, ``DRAIN``, ``LEAVE``, or ``""`` followed by
replies to publish; relay -> broker one or more frames (Mongrel2 messages,
byte for byte, in order) or two frames ``""`` + ``HEARTBEAT`` | ``BYE`` |
``WHO`` (the relay does not know this broker: say HELLO again).
"""

from __future__ import annotations

import logging
import math
import signal
import socket
import time
from collections import OrderedDict, deque
from dataclasses import dataclass

import zmq

from scale0.auth.zap import CurveServer
from scale0.config import RelayConfig, default
from scale0.core.ratelog import RateLimitedLog
from scale0.net.frames import recv_frames, recv_one, send_frames
from scale0.net.handover import HANDOVER_TIMEOUT_S, MongrelPull
from scale0.wire import mongrel2 as m2

log = logging.getLogger(__name__)

VERSION = b"S0R1"
MAX_CONNECTIONS = 200_000  # sticky entries kept; the least recently used go first
MAX_PENDING = 10_000  # new connections held while no broker can take one
MAX_HELD_REPLIES = 100_000  # replies held while Mongrel2 takes none
BATCH = 256
# Brokers send the relay only short control frames (HELLO S0R1 <window> <ms>,
# CREDIT <n>, ...): a peer sending a larger frame is disconnected by libzmq.
MAX_BROKER_MESSAGE_BYTES = 4096
# With a recv_spec, brokers linked as relay+ENDPOINT alone send their replies
# here: frames as big as the broker takes from its workers (2 MiB, net/broker.py).
MAX_BROKER_REPLY_FRAME_BYTES = 4 << 20
MAX_CLOSE_TARGETS = 128  # Mongrel2's limits.handler_targets: ids per reply
MIN_PEER_HEARTBEAT_S = 0.01  # HELLO's heartbeat_ms as the worker protocol bounds it
HELD_RETRY_S = 0.02  # how often held replies are offered to Mongrel2 again

HEARTBEAT = b"HEARTBEAT"
BYE = b"BYE"
WHO = b"WHO"


@dataclass(slots=True, eq=False)
class BrokerPeer:
    ident: bytes
    credit: int
    expires_at: float
    expiry_s: float  # its heartbeat (from HELLO) x our liveness
    draining: bool = False


class RelayCore:
    """The relay's decisions, with no sockets and no clock of its own.

    `to_brokers` collects ``[ident, *frames]`` to send. Invariant: a peer in
    `ready` is in `peers`, not draining and has credit > 0; `ready` is LRU.
    """

    def __init__(self, heartbeat_s: float = 1.0, liveness: int = 3, *,
                 max_peer_heartbeat_s: float = 30.0, close_lost: bool = False) -> None:
        self.heartbeat_s = heartbeat_s
        self.liveness = liveness
        self.expiry_s = heartbeat_s * liveness
        # A broker's announced heartbeat is honoured up to this (or ours, if
        # longer): a rogue one declaring an hour is still expired in minutes.
        self.max_peer_heartbeat_s = max(max_peer_heartbeat_s, heartbeat_s)
        # Close the connections of a broker that died (`to_mongrel2`), or just forget them.
        self.close_lost = close_lost
        self.to_mongrel2: list[bytes] = []  # empty replies (closes) for Mongrel2's recv_spec
        self.lost_connections = 0  # connections of dead brokers, closed or forgotten
        self.warnings = RateLimitedLog(log)
        # New connections (and anything a lost broker could not take) while no
        # broker is ready: placed in order as soon as one is.
        self.pending: deque[bytes] = deque()
        self.peers: dict[bytes, BrokerPeer] = {}
        self.ready: OrderedDict[bytes, BrokerPeer] = OrderedDict()
        self.owners: OrderedDict[bytes, BrokerPeer] = OrderedDict()  # by b'SENDER CONN_ID'
        self.to_brokers: list[list[bytes]] = []
        self.dropped = 0  # per-connection messages with no broker to take them
        self.malformed = 0
        self._next_heartbeat = 0.0
        self._now = 0.0  # of the last tick: the rate-limited log's clock on the Mongrel2 path

    @property
    def intake(self) -> bool:
        """Whether to read from Mongrel2. While any broker is there: the
        connections it holds (a lone draining broker too) need their credits
        and disconnects; new ones wait in `pending`, up to MAX_PENDING. With
        no broker at all, requests wait in Mongrel2."""
        return bool(self.peers) and len(self.pending) < MAX_PENDING

    def on_mongrel2(self, raw: bytes) -> None:
        self._route(raw, waiting=bool(self.pending))

    def _route(self, raw: bytes, *, waiting: bool) -> None:
        """Send `raw` to the broker that holds its connection, or place a new
        connection; `waiting`: older new connections wait, so this one too."""
        # 'SENDER CONN_ID PATH rest': the key is 'SENDER CONN_ID'; no copy of the body.
        i = raw.find(b" ")
        j = raw.find(b" ", i + 1) if i > 0 else -1
        if j < 0:  # no connection to answer: nobody could reply to it
            self.malformed += 1
            self.warnings.warning("malformed Mongrel2 message", self._now,
                                  "malformed message from Mongrel2 (%d bytes): dropped",
                                  len(raw))
            return
        k = raw.find(b" ", j + 1)
        # Anything else goes to a broker, which parses it and answers 400 if
        # it is malformed (MONGREL2.md: the client waits for an answer).
        key = raw[:j]
        owner = self.owners.get(key)
        # Mongrel2's own messages (disconnect, credits) have the path '@*'.
        special = k == j + 3 and raw.startswith(b"@*", j + 1)
        if owner is not None and self.peers.get(owner.ident) is owner:
            self.owners.move_to_end(key)
            if special and raw.find(b'"disconnect"', k, k + 64) >= 0:
                del self.owners[key]
            owner.credit -= 1
            self.to_brokers.append([owner.ident, raw])
            if owner.credit <= 0:  # else its place in `ready` (or not) stays right
                self._update(owner)
            return
        if special:  # of a connection nobody holds
            self.owners.pop(key, None)
            self.dropped += 1
            return
        if waiting or not self.ready:
            self.pending.append(raw)
            return
        peer = self.ready.popitem(last=False)[1]
        self.owners[key] = peer
        if len(self.owners) > MAX_CONNECTIONS:
            self.owners.popitem(last=False)
        self._send(peer, raw)

    def on_broker(self, ident: bytes, frame: bytes, now: float) -> None:
        command, _, arg = frame.partition(b" ")
        peer = self.peers.get(ident)
        if command == b"HELLO":
            version, _, rest = arg.partition(b" ")
            window, _, hb_ms = rest.partition(b" ")
            if version != VERSION or not window.isdigit() or len(window) > 12:
                self.malformed += 1
                self.warnings.warning("bad broker HELLO", now, "bad HELLO from broker %s: %r",
                                      ident.hex(), frame[:64])
                return
            expiry_s = self.peer_expiry_s(hb_ms)
            if peer is not None:  # joined again (after WHO): keep its connections
                peer.credit, peer.draining, peer.expiry_s = int(window), False, expiry_s
            else:
                peer = self.peers[ident] = BrokerPeer(ident, int(window), now + expiry_s,
                                                      expiry_s)
                log.info("broker %s joined (window %d)", ident.hex(), peer.credit)
        elif peer is None:
            self.to_brokers.append([ident, b"", WHO])
            return
        elif command == b"CREDIT" and arg.isdigit():
            peer.credit += int(arg)
        elif command == b"HEARTBEAT":
            pass
        elif command == b"DRAIN":
            peer.draining = True
            log.info("broker %s draining", ident.hex())
        elif command == b"LEAVE":
            self._remove(peer)
            self.to_brokers.append([ident, b"", BYE])
            log.info("broker %s left", ident.hex())
            return
        else:
            self.malformed += 1
            self.warnings.warning("unknown broker command", now,
                                  "unknown command from broker %s: %r", ident.hex(), frame[:64])
            return
        peer.expires_at = now + peer.expiry_s
        self._update(peer)
        self._place_pending()

    def peer_expiry_s(self, hb_ms: bytes) -> float:
        """A broker's expiry: its announced interval (HELLO, in ms), clamped to
        [MIN_PEER_HEARTBEAT_S, max_peer_heartbeat_s], x our liveness; our
        own interval if it announced none."""
        if len(hb_ms) > 12 or not hb_ms.isdigit() or not int(hb_ms):
            return self.expiry_s
        interval_s = min(max(int(hb_ms) / 1000, MIN_PEER_HEARTBEAT_S), self.max_peer_heartbeat_s)
        return interval_s * self.liveness

    def on_tick(self, now: float) -> None:
        self._now = now
        if now < self._next_heartbeat:
            return
        self._next_heartbeat = now + self.heartbeat_s
        self.warnings.flush(now)
        for peer in list(self.peers.values()):
            if peer.expires_at <= now:
                log.warning("broker %s silent for %.1f s: dropped", peer.ident.hex(),
                            now - peer.expires_at + peer.expiry_s)
                self._remove(peer)
                self._lost(peer)
            else:
                self.to_brokers.append([peer.ident, b"", HEARTBEAT])

    def next_deadline(self) -> float:
        return self._next_heartbeat

    def unreachable(self, ident: bytes) -> None:
        peer = self.peers.get(ident)
        if peer is not None:
            log.warning("broker %s unreachable: dropped", ident.hex())
            self._remove(peer)
            self._lost(peer)

    def _send(self, peer: BrokerPeer, raw: bytes) -> None:
        peer.credit -= 1
        self.to_brokers.append([peer.ident, raw])
        self._update(peer)

    def _place_pending(self) -> None:
        """Oldest first, while a broker can take them. O(1) per message."""
        while self.pending and self.ready:
            self._route(self.pending.popleft(), waiting=False)

    def _update(self, peer: BrokerPeer) -> None:
        if peer.credit > 0 and not peer.draining and self.peers.get(peer.ident) is peer:
            if peer.ident not in self.ready:
                self.ready[peer.ident] = peer
        else:
            self.ready.pop(peer.ident, None)

    def _remove(self, peer: BrokerPeer) -> None:
        # Its sticky entries die lazily: an owner not in `peers` is no owner.
        self.peers.pop(peer.ident, None)
        self.ready.pop(peer.ident, None)

    def _lost(self, peer: BrokerPeer) -> None:
        """`peer` died (expired or unreachable, not LEAVE): its connections
        are forgotten now and, with `close_lost`, closed with one empty reply
        per sender and up to MAX_CLOSE_TARGETS ids. O(connections), once per
        lost broker. What it held is lost with it; the close tells the client
        so at once (docs/reliability.md)."""
        keys = [key for key, owner in self.owners.items() if owner is peer]
        by_sender: dict[bytes, list[int]] = {}
        for key in keys:
            del self.owners[key]
            sender, _, conn_id = key.partition(b" ")
            if conn_id.isdigit() and len(conn_id) <= 20:
                by_sender.setdefault(sender, []).append(int(conn_id))
        self.lost_connections += len(keys)
        if keys:
            log.warning("broker %s lost with %d connections: %s", peer.ident.hex(), len(keys),
                        "closing them" if self.close_lost else "forgotten (no --mongrel2-recv)")
        if not self.close_lost:
            return
        for sender, ids in by_sender.items():
            for i in range(0, len(ids), MAX_CLOSE_TARGETS):
                try:
                    self.to_mongrel2.append(m2.close_reply(sender, ids[i:i + MAX_CLOSE_TARGETS]))
                except m2.ReplyError:  # a sender no reply can name (MONGREL2.md)
                    break


class ReplyPub:
    """An XPUB on Mongrel2's recv_spec for the replies brokers send the relay.

    As in the broker: replies go out only once Mongrel2's SUB has subscribed
    (the slow-joiner gap would lose them); at the high-water mark
    (XPUB_NODROP) or unsubscribed they are held in order, and the relay stops
    reading Mongrel2 until they are out (`ok`), which bounds them by what
    the brokers hold. A batch from a broker goes out as one multipart message:
    Mongrel2 takes each frame as a reply. Made in the thread that uses it.
    """

    def __init__(self, ctx: zmq.Context[zmq.Socket[bytes]], recv_spec: str,
                 recv_ident: bytes = b"") -> None:
        self.recv_spec = recv_spec
        self.recv_ident = recv_ident
        self.socket: zmq.Socket[bytes] = ctx.socket(zmq.XPUB)
        self.socket.setsockopt(zmq.LINGER, 2000)  # let queued replies out on a clean stop
        self.socket.setsockopt(zmq.XPUB_NODROP, 1)
        self.socket.setsockopt(zmq.XPUB_VERBOSE, 1)
        self.socket.connect(recv_spec)
        self.subscriptions = 0
        self.held: deque[bytes] = deque()
        self.published = 0
        self.dropped = 0

    @property
    def ok(self) -> bool:
        """Whether replies go out now: subscribed and none held."""
        return self.subscriptions > 0 and not self.held

    def read_subscriptions(self) -> None:
        while True:
            try:
                message = recv_one(self.socket)
            except zmq.Again:
                break
            if message[:1] == b"\x01":
                self.subscriptions += 1
                log.info("Mongrel2 at %s subscribed to the replies", self.recv_spec)
            elif message[:1] == b"\x00":
                self.subscriptions = max(0, self.subscriptions - 1)
                log.warning("Mongrel2 at %s unsubscribed", self.recv_spec)
        self.retry()

    def publish(self, replies: list[bytes]) -> None:
        ident = self.recv_ident
        if ident:  # Mongrel2 drops replies whose sender lacks its recv_ident prefix.
            replies = [ident + reply[reply.find(b" "):]
                       if not reply.startswith(ident) and reply.find(b" ") > 0 else reply
                       for reply in replies]
        if self.ok:
            try:
                send_frames(self.socket, replies)
                self.published += len(replies)
                return
            except zmq.Again:
                pass
        if not self.held:
            log.warning("Mongrel2 at %s is not taking replies: holding them, intake paused",
                        self.recv_spec)
        room = max(0, MAX_HELD_REPLIES - len(self.held))
        if len(replies) > room:
            self.dropped += len(replies) - room
            log.error("dropping %d replies: %d held for %s", len(replies) - room,
                      len(self.held), self.recv_spec)
        self.held.extend(replies[:room])

    def retry(self) -> None:
        held = self.held
        while held and self.subscriptions > 0:
            batch = [held[i] for i in range(min(BATCH, len(held)))]
            try:
                send_frames(self.socket, batch)
            except zmq.Again:
                return
            for _ in batch:
                held.popleft()
            self.published += len(batch)
            if not held:
                log.info("Mongrel2 at %s takes replies again", self.recv_spec)

    def close(self) -> None:
        self.retry()
        self.socket.close()  # LINGER: what is queued gets 2 s to go out


class Relay:
    """The I/O loop around RelayCore. Constructors do no I/O."""

    def __init__(self, send_spec: str, bind: str, *,
                 heartbeat_s: float = default(RelayConfig, "heartbeat"),
                 liveness: int = default(RelayConfig, "liveness"), recv_spec: str = "",
                 recv_ident: bytes = b"",
                 max_peer_heartbeat_s: float = default(RelayConfig, "max_peer_heartbeat"),
                 curve: CurveServer | None = None) -> None:
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
        self._stopping = False
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._ctx: zmq.Context[zmq.Socket[bytes]] | None = None
        self._mongrel2: MongrelPull | None = None
        self._router: zmq.Socket[bytes] | None = None
        self._replies: ReplyPub | None = None
        self._forced = False
        self.stray_replies = 0  # replies sent to a relay without a recv_spec (dropped)
        self.wakeups = 0  # of the loop: messages per wake-up is the batching achieved

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
            self._replies = ReplyPub(ctx, self.recv_spec, self.recv_ident)

    def stop(self) -> None:
        """Signal-safe. Graceful: leave Mongrel2 as net/handover.py describes (half-
        close, read until Mongrel2 closes), hand what was read to
        the brokers, then end; meanwhile Mongrel2 keeps new requests for the
        next relay. A second call ends at once."""
        self._forced = self._stopping
        self._stopping = True
        try:
            self._wake_w.send(b"\0")
        except OSError:
            pass

    def install_signal_handlers(self) -> None:
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: self.stop())
        # SIGHUP: re-read the authorized keys (in the ZAP thread); else nothing.
        signal.signal(signal.SIGHUP, lambda *_: self.curve.reload() if self.curve else None)

    def run(self) -> None:
        if self._router is None:
            self.start()
        router, mongrel2, core = self._router, self._mongrel2, self.core
        assert router is not None and mongrel2 is not None
        pull, monitor = mongrel2.socket, mongrel2.monitor
        poller = zmq.Poller()
        poller.register(router, zmq.POLLIN)
        poller.register(monitor, zmq.POLLIN)
        poller.register(self._wake_r, zmq.POLLIN)
        replies = self._replies
        if replies is not None:
            poller.register(replies.socket, zmq.POLLIN)
        reading = False
        leaving_until = 0.0  # stopping: Mongrel2 has this long to close its end
        left_at = 0.0  # disconnected from Mongrel2: hand over what waits, then end
        while not self._forced:
            now = time.monotonic()
            if self._stopping and not leaving_until:
                leaving_until = now + HANDOVER_TIMEOUT_S
                if not mongrel2.half_close():
                    left_at = self._leave(now)
            if leaving_until and not left_at and now >= leaving_until:
                log.warning("Mongrel2 did not close the half-closed link: disconnecting")
                left_at = self._leave(now)
            held = replies is not None and bool(replies.held)
            if left_at and ((not core.pending and not held)
                            or now >= left_at + HANDOVER_TIMEOUT_S):
                break
            # While leaving, read all Mongrel2 sent (it waits in `pending` if need be).
            # Else only while our replies (if we carry any) can go out.
            want = ((core.intake and (replies is None or replies.ok)) or leaving_until > 0) \
                and not left_at
            if want != reading:
                reading = want
                if reading:
                    poller.register(pull, zmq.POLLIN)
                else:
                    poller.unregister(pull)
            deadline = core.next_deadline()
            if leaving_until:
                deadline = min(deadline, now + 0.05)
            if held:  # an XPUB always polls writable: retry on a timer
                deadline = min(deadline, now + HELD_RETRY_S)
            timeout_ms = max(0, math.ceil((deadline - now) * 1000))
            events = dict(poller.poll(timeout_ms))
            self.wakeups += 1
            now = time.monotonic()
            if router in events:
                for _ in range(BATCH):
                    try:
                        frames = recv_frames(router)
                    except zmq.Again:
                        break
                    if len(frames) == 2:
                        core.on_broker(frames[0], frames[1], now)
                    elif len(frames) > 2 and not frames[1]:  # ["", replies...]
                        self._publish(frames[2:])
                    else:
                        core.malformed += 1
                self._flush(router)
            if pull in events:  # registered only while core.intake or leaving
                take = core.on_mongrel2
                for _ in range(BATCH):
                    try:
                        raw = recv_one(pull)
                    except zmq.Again:
                        break
                    take(raw)
                    if core.pending and not (core.intake or leaving_until):
                        break  # MAX_PENDING new connections wait: the rest in Mongrel2
                self._flush(router)
            if monitor in events and mongrel2.read_monitor() and leaving_until \
                    and not left_at:
                left_at = self._leave(now)  # Mongrel2 closed: all it sent is here
            if replies is not None:
                if replies.socket in events:
                    replies.read_subscriptions()
                elif held:
                    replies.retry()
            if self._wake_r in events:
                try:
                    self._wake_r.recv(64)
                except OSError:
                    pass
            core.on_tick(now)
            self._flush(router)
        if core.pending:
            log.error("relay stopping with %d requests no broker took", len(core.pending))
        log.info("relay stopping after %d wake-ups", self.wakeups)

    def _leave(self, now: float) -> float:
        """Read what is left, leave Mongrel2's PUSH for good, pass it on."""
        assert self._router is not None and self._mongrel2 is not None
        self._mongrel2.leave(self.core.on_mongrel2)
        self._flush(self._router)
        if self.core.pending:
            log.info("%d requests wait for a broker", len(self.core.pending))
        return now

    def _publish(self, replies: list[bytes]) -> None:
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
        self._wake_r.close()
        self._wake_w.close()

    def ready_line(self) -> str:
        line = f"READY relay brokers={self.endpoint} mongrel2={self.send_spec}"
        return line + (f" replies={self.recv_spec}" if self.recv_spec else "")
