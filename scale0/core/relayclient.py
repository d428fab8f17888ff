"""The broker's side of S0R1 for one relay link: state and decisions, no sockets.

A broker linked to a `scale0 relay` (``--mongrel2 relay+ENDPOINT...``) joins
it, keeps it fed with credit and heartbeats, and leaves it with the
DRAIN/LEAVE/BYE handshake (docs/protocol.md Appendix B). `RelayClient` holds
that link's state and decides; the link in net/links.py owns the DEALER,
sends what the methods return (`Send`, `Disconnect`) and tells the client
what the dispatcher knows (`busy`: requests or uploads still in progress).

Theory of operation::

    [out] --beat: intake open, link writable / HELLO sent--> [joined]
      ^  <-- WHO (the relay restarted): HELLO again at once ---'  |
      |                                                          | stop_intake
    stop_intake before joining: Disconnect                 DRAIN, [draining]
                                                                  | handover, not busy
                                                             LEAVE, [left]
          BYE: Disconnect once nothing of ours is in flight <-----' (or timeout)

* HELLO goes only once the startup grace is over and the link can deliver
  replies, so nothing waits at a broker whose workers have not announced.
* CREDIT after every read of a quarter of the window: the relay's send
  queue for us is bounded by `window`.
* LEAVE only when nothing is in progress here: a request, an upload whose
  done message the relay would give another broker, or a reply held for the
  relay. Everything that arrives between LEAVE and BYE is served too.
* Until then, connections move one by one: once the relay has answered
  DRAIN with DRAINING, every connection of ours that holds nothing here
  (and whose download credits are all back) is RELEASEd with the count of
  its messages read since DRAINING; the relay deals its next message to
  another broker if it sent us no more than that. So keep-alive clients
  that never pause all at once cannot keep a draining broker busy.
* A forced or timed-out stop still says LEAVE as it exits (`on_close`): the
  relay forgets our connections at once rather than at our expiry.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar, Final

from scale0.core.ratelog import RateLimitedLog
from scale0.wire import s0r1

log = logging.getLogger(__name__)

RELAY_WINDOW = 512  # messages a relay may send us ahead of our reading them


@dataclass(frozen=True, slots=True)
class Send:
    """Send this control frame to the relay (best effort: see the link)."""

    frame: bytes


@dataclass(frozen=True, slots=True)
class Disconnect:
    """Leave the relay for good: nothing more will be read from it. The
    link keeps the connection until the broker exits, so replies already
    queued for the relay still go out."""


DISCONNECT: Final = Disconnect()
Action = Send | Disconnect


class RelayClient:
    """One relay link's S0R1 state. Methods take `now` and return actions."""

    def __init__(self, spec: str, heartbeat_s: float, *, handover_timeout_s: float,
                 window: int = RELAY_WINDOW, warnings: RateLimitedLog | None = None) -> None:
        self.spec = spec  # the relay's endpoint, for the log
        self.handover_timeout_s = handover_timeout_s  # how long the relay has to answer LEAVE
        self.heartbeat_ms = int(heartbeat_s * 1000)
        self.window = window
        self.warnings = warnings if warnings is not None else RateLimitedLog(log)
        self.joined = False  # HELLO went out (and no WHO since)
        self.unacked = 0  # messages read since our last CREDIT
        self.leave_by = 0.0  # handing over: inf until LEAVE, then the BYE deadline
        self.left_at = 0.0  # when LEAVE was sent
        self.bye = False  # BYE came: nothing more will
        self.closed = False  # disconnected for good
        # Since DRAINING: messages read per connection (b"SENDER CONN_ID").
        self.counts: dict[bytes, int] | None = None
        # Since DRAIN: the connections to RELEASE once nothing of theirs is held
        # here (held at a look, or a message of theirs read). From DRAIN, not
        # DRAINING: a request that ends in the wake-up that reads DRAINING,
        # before any look, must not leave its connection unreleased.
        self.watch: set[bytes] | None = None

    @property
    def handing_over(self) -> bool:
        """Read everything the relay sends: DRAIN or LEAVE went out."""
        return self.leave_by > 0

    # ---- heartbeats and joining ----------------------------------------------------

    def beat(self, *, intake: bool, writable: bool) -> list[Action]:
        """Every heartbeat interval: HEARTBEAT once joined; HELLO once intake
        opens and replies can be delivered."""
        if self.closed or self.bye:
            return []
        if self.joined:
            return [Send(s0r1.HEARTBEAT)]
        if intake and writable:
            return [Send(s0r1.encode_hello(self.window, self.heartbeat_ms))]
        return []

    def sent(self, frame: bytes) -> None:
        """`frame` went out: a HELLO means we joined."""
        if frame.startswith(s0r1.HELLO) and not self.joined:
            self.joined, self.unacked = True, 0
            log.info("joined the relay at %s", self.spec)

    # ---- what the relay sends ------------------------------------------------------

    def took(self, n: int) -> None:
        """`n` Mongrel2 messages of a batch were read."""
        self.unacked += n

    def credit(self) -> list[Action]:
        """After a read: give back a quarter window's credit at a time."""
        if self.unacked >= self.window // 4 and not self.closed:
            n, self.unacked = self.unacked, 0
            return [Send(s0r1.encode_credit(n))]
        return []

    def on_control(self, control: s0r1.Control, now: float, *, may_join: bool,
                   busy_after_bye: bool) -> list[Action]:
        """A control message from the relay. `may_join`: not stopping, the link
        writable; `busy_after_bye`: replies through the relay still owed."""
        if self.closed:  # left for good: whatever still arrives changes nothing
            return []
        return self._handlers[control](self, now, may_join, busy_after_bye)

    def took_message(self, key: bytes) -> None:
        """A Mongrel2 message of connection `key` was read (only while draining)."""
        if self.watch is not None:
            self.watch.add(key)
        counts = self.counts
        if counts is not None:
            counts[key] = counts.get(key, 0) + 1

    def releases(self, held: set[bytes], idle: Callable[[bytes], bool]) -> list[Action]:
        """While draining, before LEAVE: RELEASE each watched connection that
        holds nothing here. `held`: connections with a request here (watched
        from now on); `idle(key)`: nothing else of it is here either (no
        upload, no download credits owed)."""
        watch = self.watch
        if watch is None or self.left_at or self.closed:
            return []
        watch |= held
        if self.counts is None:  # DRAIN sent, no DRAINING yet: watched, not released
            return []
        free = [key for key in watch if key not in held and idle(key)]
        counts = self.counts
        for key in free:
            watch.discard(key)
        return [Send(s0r1.encode_release(key, counts.get(key, 0))) for key in free]

    def on_malformed(self, error: s0r1.S0R1Error, now: float) -> None:
        self.warnings.warning("relay message", now, "unexpected message from the relay at %s: %s",
                              self.spec, error)

    def _on_heartbeat(self, now: float, may_join: bool, busy: bool) -> list[Action]:
        return []

    def _on_draining(self, now: float, may_join: bool, busy: bool) -> list[Action]:
        """The relay's answer to DRAIN: count from here (Appendix B, RELEASE)."""
        if self.leave_by and not self.left_at:
            self.counts = {}
            if self.watch is None:
                self.watch = set()
        return []

    def _on_who(self, now: float, may_join: bool, busy: bool) -> list[Action]:
        self.joined = False  # the relay restarted and forgot us: join again
        return self.beat(intake=True, writable=True) if may_join else []

    def _on_bye(self, now: float, may_join: bool, busy: bool) -> list[Action]:
        self.bye = True
        return self.after_bye(busy)

    _handlers: ClassVar[dict[s0r1.Control,
                             Callable[[RelayClient, float, bool, bool], list[Action]]]] = {
        s0r1.Control.HEARTBEAT: _on_heartbeat,
        s0r1.Control.DRAINING: _on_draining,
        s0r1.Control.WHO: _on_who,
        s0r1.Control.BYE: _on_bye,
    }

    def after_bye(self, busy: bool) -> list[Action]:
        """The relay let us go. Replies through the relay still need the
        DEALER for the requests read between LEAVE and BYE (and any reply
        held): stay until those are out (the graceful timeout bounds it)."""
        if busy:
            self.leave_by = math.inf
            return []
        return self.disconnect()

    # ---- leaving -------------------------------------------------------------------

    def stop_intake(self) -> list[Action]:
        """A graceful stop begins: DRAIN if joined, else just go."""
        if self.closed:  # the relay let us go already (BYE)
            return []
        if self.joined:  # no new connections; LEAVE once our requests are done
            self.leave_by = math.inf
            self.watch = set()
            return [Send(s0r1.DRAIN)]
        return self.disconnect()

    def handover(self, now: float, *, busy: bool, busy_after_bye: bool) -> list[Action]:
        """While stopping, every round of the loop. `busy`: a request, an
        upload of this link or a held reply is still in progress."""
        if self.bye:
            return [] if self.closed else self.after_bye(busy_after_bye)
        if self.leave_by and not self.left_at:
            if busy:
                return []
            self.left_at = now
            self.leave_by = now + self.handover_timeout_s
            return [Send(s0r1.LEAVE)]  # answered BYE after all it sent us
        if self.leave_by and now >= self.leave_by:
            log.warning("%s did not let go of the link in %.0f s: disconnecting",
                        self.spec, self.handover_timeout_s)
            return self.disconnect()
        return []

    def disconnect(self) -> list[Action]:
        if self.closed:
            return []
        self.closed = True
        self.leave_by = 0.0
        return [DISCONNECT]

    def on_close(self) -> list[Action]:
        """The broker exits: a relay we joined and did not leave forgets us now."""
        return [Send(s0r1.LEAVE)] if self.joined and not self.left_at and not self.closed else []

