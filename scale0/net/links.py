"""A broker's links to Mongrel2: directly (`DirectLink`) or through a relay (`RelayLink`).

Both kinds give the loop (net/broker.py) the same small interface:

* `intake`: the socket requests come in on, polled only while the link
  takes requests (`writable`) or hands over (`handing_over`: every request
  sent to us must be read);
* `handlers`: the link's other sockets and what to do when each is readable;
* `read(now)`: read requests into the dispatcher, up to BATCH per wake-up,
  pausing once replies for this link cannot go out;
* `replies`: where the dispatcher's replies go (net/replies.py), held in
  order while Mongrel2 (or the relay) takes none;
* `beat`, `stop_intake`, `handover`: the heartbeat and the graceful stop;
  `closed` once the link has left for good; `status()`; `close()`.

A link takes no requests until Mongrel2's SUB has subscribed on our XPUB
(the slow-joiner gap loses replies sent before that). A direct link leaves
Mongrel2 as net/handover.py describes (half-close, read until Mongrel2
closes, then disconnect). A relay link speaks S0R1 (wire/s0r1.py) with its
decisions in core/relayclient.py.
"""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import Any

import zmq

from scale0.auth.keys import CurveKeys
from scale0.config.kinds import LinkSpec
from scale0.core.dispatch import Dispatcher
from scale0.core.relayclient import Action, RelayClient, Send
from scale0.net.frames import recv_frames, recv_one, send_one
from scale0.net.handover import HANDOVER_TIMEOUT_S, MongrelPull
from scale0.net.replies import HeldReplies, RelayReplies, XPubReplies
from scale0.wire import s0r1

log = logging.getLogger(__name__)

BATCH = 256  # messages read from one socket per wake-up before looking at the others
RELEASE_EVERY_S = 0.02  # draining through a relay: how often idle connections are RELEASEd
Handler = Callable[[float], None]


class Link(ABC):
    """What the loop needs of a link; the two kinds below fill it in."""

    intake: zmq.Socket[bytes]
    replies: HeldReplies

    def __init__(self, index: int, spec: LinkSpec, dispatcher: Dispatcher) -> None:
        self.index = index
        self.spec = spec
        self.dispatcher = dispatcher

    @property
    def writable(self) -> bool:
        return self.replies.writable

    @property
    @abstractmethod
    def closed(self) -> bool: ...

    @property
    @abstractmethod
    def handing_over(self) -> bool: ...

    def handlers(self) -> dict[zmq.Socket[bytes], Handler]:
        """The link's sockets other than `intake`, each with its reader."""
        if isinstance(self.replies, XPubReplies):
            replies = self.replies
            return {replies.socket: lambda now: replies.read_subscriptions()}
        return {}

    @abstractmethod
    def read(self, now: float) -> None: ...

    @abstractmethod
    def beat(self, *, intake: bool) -> None:
        """Every heartbeat interval."""

    @abstractmethod
    def stop_intake(self, now: float) -> None: ...

    @abstractmethod
    def handover(self, now: float) -> None:
        """While stopping, every round of the loop."""

    @abstractmethod
    def status(self) -> dict[str, Any]: ...

    @abstractmethod
    def close(self) -> None: ...

    def _status(self, connected: bool, subscribed: bool) -> dict[str, Any]:
        return {"send_spec": str(self.spec).split(",")[0], "recv_spec": self.spec.recv_spec,
                "relay": self.spec.relay, "connected": connected, "subscribed": subscribed,
                "held": len(self.replies.held), "replies": self.replies.published,
                "closed": self.closed}


class DirectLink(Link):
    """A PULL on Mongrel2's send_spec and an XPUB on its recv_spec."""

    def __init__(self, index: int, spec: LinkSpec, dispatcher: Dispatcher,
                 ctx: zmq.Context[zmq.Socket[bytes]]) -> None:
        super().__init__(index, spec, dispatcher)
        self.mongrel2 = MongrelPull(ctx, spec.send_spec)
        self.intake = self.mongrel2.socket
        self.replies = self.xpub = XPubReplies(ctx, spec.recv_spec, spec.recv_ident)
        self.closing_until = 0.0  # half-closed: reading what is left until Mongrel2 closes
        self._closed = False  # disconnected from Mongrel2's PUSH for good

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def handing_over(self) -> bool:
        return self.closing_until > 0

    def handlers(self) -> dict[zmq.Socket[bytes], Handler]:
        return {**super().handlers(), self.mongrel2.monitor: self._read_monitor}

    def read(self, now: float) -> None:
        d, index, pull = self.dispatcher, self.index, self.intake
        for _ in range(BATCH):
            try:
                raw = recv_one(pull)
            except zmq.Again:
                return
            d.on_mongrel2(index, raw, now)
            if d.to_mongrel2 and not self.writable:
                return

    def beat(self, *, intake: bool) -> None:
        pass  # Mongrel2 needs none: its PUSH sees our connection

    def stop_intake(self, now: float) -> None:
        if self.mongrel2.half_close():
            self.closing_until = now + HANDOVER_TIMEOUT_S
        else:  # not connected (nothing can be in flight to us), or it failed
            self._leave(now)

    def handover(self, now: float) -> None:
        if self.closing_until and now >= self.closing_until:
            log.warning("%s did not let go of the link in %.0f s: disconnecting",
                        self.spec.send_spec, HANDOVER_TIMEOUT_S)
            self._leave(now)

    def _read_monitor(self, now: float) -> None:
        if self.mongrel2.read_monitor() and self.closing_until:
            self._leave(now)  # Mongrel2 closed its end: all it sent is here

    def _leave(self, now: float) -> None:
        """Read every request that reached us, then leave for good."""
        if self._closed:
            return
        self._closed = True
        self.closing_until = 0.0
        d, index = self.dispatcher, self.index
        self.mongrel2.leave(lambda raw: d.on_mongrel2(index, raw, now))

    def status(self) -> dict[str, Any]:
        return self._status(self.mongrel2.connected, self.xpub.subscriptions > 0)

    def close(self) -> None:
        self.mongrel2.close()
        self.xpub.close()  # LINGER 2 s: replies still queued go out first


class RelayLink(Link):
    """A DEALER to a `scale0 relay`; replies on an XPUB, or through the relay."""

    def __init__(self, index: int, spec: LinkSpec, dispatcher: Dispatcher,
                 ctx: zmq.Context[zmq.Socket[bytes]], curve: CurveKeys | None = None) -> None:
        super().__init__(index, spec, dispatcher)
        dealer = ctx.socket(zmq.DEALER)
        dealer.setsockopt(zmq.LINGER, 1000)  # replies queued for the relay go out first
        dealer.setsockopt(zmq.RCVHWM, 0)  # bounded by our credit
        # Nothing queues for a relay that is not there: HELLO and HEARTBEAT
        # are sent again anyway, and a relay that restarted asks WHO.
        dealer.setsockopt(zmq.IMMEDIATE, 1)
        dealer.setsockopt(zmq.SNDHWM, 100)
        if curve is not None:
            curve.client_socket(dealer)
        dealer.connect(spec.send_spec)
        self.intake = self.dealer = dealer
        self.replies = (XPubReplies(ctx, spec.recv_spec, spec.recv_ident) if spec.recv_spec
                        else RelayReplies(dealer, spec.send_spec))
        self._next_release = 0.0  # draining: when connections are next looked at for RELEASE
        self.client = RelayClient(spec.send_spec, dispatcher.settings.heartbeat_s,
                                  handover_timeout_s=HANDOVER_TIMEOUT_S,
                                  warnings=dispatcher.warnings)

    @property
    def closed(self) -> bool:
        return self.client.closed

    @property
    def handing_over(self) -> bool:
        return self.client.handing_over

    def read(self, now: float) -> None:
        d, index, client = self.dispatcher, self.index, self.client
        for _ in range(BATCH):
            try:
                frames = recv_frames(self.dealer)
            except zmq.Again:
                break
            try:
                message = s0r1.parse_from_relay(frames)
            except s0r1.S0R1Error as exc:
                client.on_malformed(exc, now)
                continue
            if isinstance(message, s0r1.Batch):  # Mongrel2 messages, byte for byte
                for raw in message.messages:
                    d.on_mongrel2(index, raw, now)
                if client.watch is not None:  # draining: RELEASE needs the counts
                    for raw in message.messages:
                        key = s0r1.connection_key(raw)
                        if key is not None:
                            client.took_message(key)
                client.took(len(message.messages))
                if d.to_mongrel2 and not self.writable:
                    break
                continue
            self._do(client.on_control(message, now, may_join=self._may_join(),
                                       busy_after_bye=self._busy_after_bye()))
            if client.bye:
                return  # nothing follows BYE
        self._do(client.credit())

    def beat(self, *, intake: bool) -> None:
        self._do(self.client.beat(intake=intake, writable=self.writable))

    def stop_intake(self, now: float) -> None:
        self._do(self.client.stop_intake())

    def handover(self, now: float) -> None:
        client = self.client
        if client.watch is not None and now >= self._next_release:
            # O(connections held): every RELEASE_EVERY_S, not at every wake-up.
            self._next_release = now + RELEASE_EVERY_S
            self._do(client.releases(self._held(), self._idle))
        self._do(client.handover(now, busy=self._busy(), busy_after_bye=self._busy_after_bye()))

    def _held(self) -> set[bytes]:
        """The relay's keys (b"SENDER CONN_ID") of this link's connections with
        a request here."""
        index = self.index
        return {b"%s %d" % (q[0].sender, conn_id)
                for (link, conn_id), q in self.dispatcher.connections.items() if link == index}

    def _idle(self, key: bytes) -> bool:
        """Nothing of connection `key` is here: no upload, no download credits owed."""
        conn_id = key.rpartition(b" ")[2]
        if not conn_id.isdigit():
            return True
        at = (self.index, int(conn_id))
        d = self.dispatcher
        return at not in d.uploads and at not in d.unacked and at not in d.connections

    def _may_join(self) -> bool:
        return not self.client.handing_over and self.writable

    def _busy(self) -> bool:
        """Not ready to LEAVE: a request in progress (any: the loop drains them
        all), an upload of this link whose done message the relay would give
        another broker, or a reply held for the relay."""
        d = self.dispatcher
        return (bool(d.requests) or bool(self.replies.held)
                or any(key[0] == self.index for key in d.uploads))

    def _busy_after_bye(self) -> bool:
        """Replies through the relay still owed for requests of this link."""
        if not isinstance(self.replies, RelayReplies):
            return False
        index = self.index
        return bool(self.replies.held) or any(
            r.link == index and not r.cancelled for r in self.dispatcher.requests.values())

    def _do(self, actions: list[Action]) -> None:
        for action in actions:
            if isinstance(action, Send):
                try:  # never raises: with the relay away a control message is dropped
                    send_one(self.dealer, action.frame)
                except zmq.ZMQError:
                    continue
                self.client.sent(action.frame)
            # Disconnect (BYE came, or the relay did not answer): `closed` is
            # now true, so the loop stops reading the DEALER. It stays
            # connected until close() at exit, whose LINGER sends the replies
            # still queued in it: zmq_disconnect would drop them (libzmq ends
            # the pipe without delay), losing answers to requests read
            # between LEAVE and BYE (tests/integration/test_relay_link.py).

    def status(self) -> dict[str, Any]:
        joined = self.client.joined
        subscribed = (self.replies.subscriptions > 0 if isinstance(self.replies, XPubReplies)
                      else joined)
        return self._status(joined, subscribed)

    def close(self) -> None:
        # A forced or timed-out stop: the relay forgets our connections now.
        self._do(self.client.on_close())
        # LINGER 1 s when replies go through the relay: they go out first.
        self.dealer.close(None if isinstance(self.replies, RelayReplies) else 0)
        if isinstance(self.replies, XPubReplies):
            self.replies.close()


def make_link(index: int, spec: LinkSpec, dispatcher: Dispatcher,
              ctx: zmq.Context[zmq.Socket[bytes]], relay_curve: CurveKeys | None) -> Link:
    if spec.relay:
        return RelayLink(index, spec, dispatcher, ctx, relay_curve)
    return DirectLink(index, spec, dispatcher, ctx)
