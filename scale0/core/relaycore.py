"""The relay's decisions (`RelayCore`): no sockets, no clock of its own.

`scale0 relay` (net/relay.py) feeds it Mongrel2's messages and the brokers'
S0R1 control frames (wire/s0r1.py, docs/protocol.md Appendix B) and sends
what it leaves in `to_brokers` (``[ident, *frames]``) and `to_mongrel2`
(empty replies that close a lost broker's connections). Three rules:

* **Sticky connections.** Every message of a client connection goes to the
  broker that got its first request, until Mongrel2 reports the disconnect
  or that broker leaves.
* **Credits.** A broker says how many messages it can take (HELLO, then
  CREDIT as it reads them); a new connection goes to the broker, among
  those not draining, that has credit and was used least recently. With no
  broker able to take it, new connections wait in `pending`, and with none
  connected at all `intake` says to stop reading Mongrel2 (requests wait
  there, not lost). A sticky message is always delivered.
* **Leaving is a handshake.** DRAIN: no new connections for this broker
  (answered DRAINING). RELEASE: it holds nothing of one of its connections
  and has read all of it sent since DRAINING, so the connection's next
  message goes elsewhere. LEAVE: forget my connections; the core answers
  BYE after everything it sent that broker before. A broker that expires or is unreachable is
  lost: its connections are forgotten (and, with `close_lost`, closed).

Commands are a table (command type -> handler); a malformed one is counted
and logged (rate-limited), never raised.
"""

from __future__ import annotations

import logging
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar, cast

from scale0.core.ratelog import RateLimitedLog
from scale0.wire import mongrel2_reply as m2r
from scale0.wire import s0r1

log = logging.getLogger(__name__)

MAX_CONNECTIONS = 200_000  # sticky entries kept; the least recently used go first
MAX_PENDING = 10_000  # new connections held while no broker can take one
MAX_CLOSE_TARGETS = 128  # Mongrel2's limits.handler_targets: ids per reply
MIN_PEER_HEARTBEAT_S = 0.01  # HELLO's heartbeat_ms as the worker protocol bounds it

HEARTBEAT, BYE, WHO = s0r1.Control.HEARTBEAT, s0r1.Control.BYE, s0r1.Control.WHO
DRAINING = s0r1.Control.DRAINING


@dataclass(slots=True, eq=False)
class BrokerPeer:
    ident: bytes
    credit: int
    expires_at: float
    expiry_s: float  # its heartbeat (from HELLO) x our liveness
    draining: bool = False
    connections: int = 0  # entries of `RelayCore.owners` naming this peer, while in `peers`
    # Since its DRAIN was answered DRAINING: messages sent it per connection,
    # what a RELEASE's count is checked against. None: not draining.
    since_drain: dict[bytes, int] | None = None


class RelayCore:
    """The relay's decisions, with no sockets and no clock of its own.

    `to_brokers` collects ``[ident, *frames]`` to send. Invariants: a peer in
    `ready` is in `peers`, not draining and has credit > 0; `ready` is LRU;
    the `connections` of a peer in `peers` is the number of `owners` entries
    naming it (a peer that left or was lost never returns: its count is
    never read again).
    """

    def __init__(self, heartbeat_s: float, liveness: int, *, max_peer_heartbeat_s: float,
                 close_lost: bool = False) -> None:
        # No defaults here: `scale0 relay`'s declared settings (config/declared.py)
        # are the one source, and net/relay.py passes them.
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
        self.released = 0  # connections a draining broker RELEASEd, dealt anew
        self.malformed = 0
        self.brokers_lost = 0  # expired or unreachable (not LEAVE)
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
        # 'SENDER CONN_ID PATH rest': the key is 'SENDER CONN_ID'; no copy of the
        # body. The broker keys its RELEASE counts with the same function.
        key = s0r1.connection_key(raw)
        if key is None:  # no connection to answer: nobody could reply to it
            self.malformed += 1
            self.warnings.warning("malformed Mongrel2 message", self._now,
                                  "malformed message from Mongrel2 (%d bytes): dropped",
                                  len(raw))
            return
        j = len(key)
        k = raw.find(b" ", j + 1)
        # Anything else goes to a broker, which parses it and answers 400 if
        # it is malformed (the client waits for an answer).
        owner = self.owners.get(key)
        # Mongrel2's own messages (disconnect, credits) have the path '@*'.
        special = k == j + 3 and raw.startswith(b"@*", j + 1)
        if owner is not None and self.peers.get(owner.ident) is owner:
            self.owners.move_to_end(key)
            if special and raw.find(b'"disconnect"', k, k + 64) >= 0:
                del self.owners[key]
                owner.connections -= 1
            since = owner.since_drain
            if since is not None:
                since[key] = since.get(key, 0) + 1
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
        if owner is not None:  # its broker is gone: the entry changes hands, and is new
            self.owners.move_to_end(key)
        self.owners[key] = peer
        peer.connections += 1
        if len(self.owners) > MAX_CONNECTIONS:
            self.owners.popitem(last=False)[1].connections -= 1
        self._send(peer, raw)

    def on_broker(self, ident: bytes, frame: bytes, now: float) -> None:
        """One control frame from broker `ident` (docs/protocol.md Appendix B)."""
        peer = self.peers.get(ident)
        try:
            command = s0r1.parse_command(frame)
        except s0r1.S0R1Error as exc:
            if exc.command != s0r1.HELLO and peer is None:
                self.to_brokers.append([ident, *s0r1.control_message(WHO)])
                return
            self.malformed += 1
            if exc.command == s0r1.HELLO:
                self.warnings.warning("bad broker HELLO", now, "bad HELLO from broker %s: %r",
                                      ident.hex(), frame[:64])
            else:
                self.warnings.warning("unknown broker command", now,
                                      "unknown command from broker %s: %r", ident.hex(),
                                      frame[:64])
            return
        if isinstance(command, s0r1.Hello):
            peer = self._on_hello(ident, peer, command, now)
        elif peer is None:  # anything but HELLO from a broker we do not know
            self.to_brokers.append([ident, *s0r1.control_message(WHO)])
            return
        elif not self._handlers[type(command)](self, peer, command):
            return  # it left
        peer.expires_at = now + peer.expiry_s
        self._update(peer)
        self._place_pending()

    def _on_hello(self, ident: bytes, peer: BrokerPeer | None, hello: s0r1.Hello,
                  now: float) -> BrokerPeer:
        expiry_s = self.peer_expiry_s(hello.heartbeat_ms)
        if peer is not None:  # joined again (after WHO): keep its connections
            peer.credit, peer.draining, peer.expiry_s = hello.window, False, expiry_s
            peer.since_drain = None
            return peer
        peer = self.peers[ident] = BrokerPeer(ident, hello.window, now + expiry_s, expiry_s)
        log.info("broker %s joined (window %d)", ident.hex(), peer.credit)
        return peer

    # A known peer's commands other than HELLO; each returns whether the peer stays.
    def _on_credit(self, peer: BrokerPeer, credit: s0r1.BrokerCommand) -> bool:
        peer.credit += cast(s0r1.Credit, credit).n  # the table's key is its type
        return True

    def _on_heartbeat(self, peer: BrokerPeer, _: s0r1.BrokerCommand) -> bool:
        return True

    def _on_drain(self, peer: BrokerPeer, _: s0r1.BrokerCommand) -> bool:
        """No new connections for it; DRAINING goes after all it was sent
        before, and from then on its connections' messages are counted."""
        peer.draining = True
        peer.since_drain = {}
        self.to_brokers.append([peer.ident, *s0r1.control_message(DRAINING)])
        log.info("broker %s draining", peer.ident.hex())
        return True

    def _on_release(self, peer: BrokerPeer, command: s0r1.BrokerCommand) -> bool:
        """A draining broker holds nothing of a connection: if it has read
        every message of it sent since DRAINING, the connection's next message
        is dealt as a new connection's (to another broker). A count short of
        ours means a message is on its way there: it RELEASEs again after it."""
        release = cast(s0r1.Release, command)  # the table's key is its type
        since = peer.since_drain
        if (since is not None and self.owners.get(release.key) is peer
                and since.get(release.key, 0) == release.n):
            del self.owners[release.key]
            peer.connections -= 1
            since.pop(release.key, None)
            self.released += 1
        return True

    def _on_leave(self, peer: BrokerPeer, _: s0r1.BrokerCommand) -> bool:
        self._remove(peer)
        self.to_brokers.append([peer.ident, *s0r1.control_message(BYE)])
        log.info("broker %s left", peer.ident.hex())
        return False

    _handlers: ClassVar[dict[type, Callable[[RelayCore, BrokerPeer, s0r1.BrokerCommand], bool]]] = {
        s0r1.Credit: _on_credit, s0r1.Heartbeat: _on_heartbeat,
        s0r1.Drain: _on_drain, s0r1.Release: _on_release, s0r1.Leave: _on_leave,
    }

    def peer_expiry_s(self, heartbeat_ms: int | None) -> float:
        """A broker's expiry: its announced interval (HELLO, in ms), clamped to
        [MIN_PEER_HEARTBEAT_S, max_peer_heartbeat_s], x our liveness; our
        own interval if it announced none."""
        if not heartbeat_ms:
            return self.expiry_s
        interval_s = min(max(heartbeat_ms / 1000, MIN_PEER_HEARTBEAT_S),
                         self.max_peer_heartbeat_s)
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
                self.to_brokers.append([peer.ident, *s0r1.control_message(HEARTBEAT)])

    def next_deadline(self) -> float:
        return self._next_heartbeat

    def snapshot(self, now: float) -> dict[str, Any]:
        """The state and counters, as plain data for other threads (the
        relay's status and metrics). O(brokers)."""
        brokers = [{"id": peer.ident.hex(), "credit": peer.credit, "draining": peer.draining,
                    "sticky": peer.connections,
                    "expires_in_s": round(peer.expires_at - now, 3)}
                   for peer in self.peers.values()]
        return {"brokers": brokers, "pending": len(self.pending),
                "sticky": sum(peer.connections for peer in self.peers.values()),
                "counters": {"malformed": self.malformed, "dropped": self.dropped,
                             "released": self.released, "brokers_lost": self.brokers_lost,
                             "lost_connections": self.lost_connections}}

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
        self.brokers_lost += 1
        for key in keys:
            del self.owners[key]
            sender, _, conn_id = key.partition(b" ")  # a decimal id: s0r1.connection_key
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
                    self.to_mongrel2.append(m2r.close_reply(sender, ids[i:i + MAX_CLOSE_TARGETS]))
                except m2r.ReplyError:  # a sender no reply can name
                    break
