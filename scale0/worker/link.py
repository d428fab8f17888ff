"""The worker's end of one broker link, sans-IO (docs/protocol.md 4.1 and 5).

Theory of operation
-------------------
A worker keeps one S0W1 session per broker (per loop, for `scale0 wsgi`).
`BrokerLink` is that session's logic with no socket and no clock: its driver
(worker/loop.py for WSGI, worker/asgi_loop.py for ASGI) owns the DEALER and
the time, and calls

* `tick(now)` from its timer: dial (HELLO) when due, drop a silent broker,
  HEARTBEAT when due. It returns what to do with the socket (`Op`) and when
  to tick again;
* `receive(frames, now)` with every message from the broker. The link's own
  commands (WELCOME, BYE, DRAIN, ERROR, HEARTBEAT) are handled here, through
  the table `_LINK_COMMANDS`; a request's (REQUEST, CANCEL, CREDIT, BODY,
  FRAME, RECALL) is checked for its frame count (`_FOR_DRIVER`) and handed back as
  an `Inbound`, which the driver looks up in its own table. Either way the
  answer says what the driver must do; `Inbound.NONE` is nothing;
* `beat(now)` where only heartbeats may go out (the WSGI heartbeat thread,
  while a loop's app runs and nobody reads its sockets);
* `drain()`, `detach()` and `close()` when the worker stops, leaves a broker
  for a while, or leaves for good.

What the link sends is queued in `outbox` as complete messages (VERSION
first), in order. After each call the driver opens the socket if told
(`Op.OPEN`), sends the outbox, then closes the socket if told (`Op.CLOSE`),
so a HELLO goes out on the new socket and a BYE before the close.

States (docs/protocol.md 4.1; the one table of moves is `_TRANSITIONS`, and a
move it lacks raises `LinkStateError`, a bug in a driver, never input):

    DISCONNECTED --dial, HELLO--> HELLO_SENT --WELCOME--> WELCOMED
    HELLO_SENT, WELCOMED --silence > expiry_s (redial after the backoff:
        0.5 s doubling to reconnect_max_s; a WELCOME resets it)--> DISCONNECTED
    HELLO_SENT, WELCOMED --BYE from the broker (redial at once)--> DISCONNECTED
    HELLO_SENT, WELCOMED --detach: BYE--> DETACHED --dial, HELLO--> HELLO_SENT
    any but GONE --close: BYE if welcomed--> GONE

An ERROR before WELCOME is `Inbound.REFUSED`: the same HELLO would be refused
again, so the worker exits (status 3) rather than dial again. Draining is the
worker's, not a state of one link: after `drain()` the link sends DRAIN now
if connected and again after each WELCOME, takes the broker's DRAIN as the
ack (`drained`), and an unprompted DRAIN before it is `Inbound.DRAIN_ASKED`.

Heartbeats are negotiated (section 5): until WELCOME the link heartbeats
every `settings.heartbeat_s` and expires the broker after that times
liveness; a WELCOME's `heartbeat_ms` (clamped to BROKER_HEARTBEAT_MS) then
sets the expiry to the broker's interval times liveness, and the heartbeat
to the shorter of ours and the broker's.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum, IntEnum

from scale0.core.backoff import Backoff, CrashPolicy
from scale0.errors import Scale0Error
from scale0.wire.s0w1 import CMD, VERSION, Command, count_of

log = logging.getLogger(__name__)

FIRST_BACKOFF_S = 0.5  # the first redial after a silent broker; doubles up to reconnect_max_s
BROKER_HEARTBEAT_MS = (10, 600_000)  # a WELCOME's heartbeat_ms outside this is clamped

_HELLO = CMD[Command.HELLO]
_HEARTBEAT = [VERSION, CMD[Command.HEARTBEAT]]
_DRAIN = [VERSION, CMD[Command.DRAIN]]
_BYE = [VERSION, CMD[Command.BYE]]


@dataclass(frozen=True, slots=True)
class LinkSettings:
    """The worker's settings a link reads (no defaults here: they are the
    worker's, declared in scale0/config)."""

    heartbeat_s: float  # ours, announced in HELLO
    liveness: int  # silent intervals before a broker is given up
    reconnect_max_s: float  # the backoff's cap
    curve: bool = False  # a CURVE client: the silence warning says what to check


class State(Enum):
    DISCONNECTED = "disconnected"  # no socket; dial at retry_at
    HELLO_SENT = "hello sent"  # a socket, HELLO sent, no WELCOME yet
    WELCOMED = "welcomed"  # registered: REQUESTs may come
    DETACHED = "detached"  # left with BYE while another broker's request runs long
    GONE = "gone"  # closed for good


class Trigger(Enum):
    DIAL = "dial"
    WELCOME = "welcome"
    SILENCE = "silence"
    BYE = "bye"  # from the broker: it does not know us
    DETACH = "detach"
    CLOSE = "close"


_CONNECTED = (State.HELLO_SENT, State.WELCOMED)
_TRANSITIONS: dict[tuple[State, Trigger], State] = {
    (State.DISCONNECTED, Trigger.DIAL): State.HELLO_SENT,
    (State.DETACHED, Trigger.DIAL): State.HELLO_SENT,
    (State.HELLO_SENT, Trigger.WELCOME): State.WELCOMED,
    (State.WELCOMED, Trigger.WELCOME): State.WELCOMED,  # a repeated WELCOME renews its terms
    **{(s, Trigger.SILENCE): State.DISCONNECTED for s in _CONNECTED},
    **{(s, Trigger.BYE): State.DISCONNECTED for s in _CONNECTED},
    **{(s, Trigger.DETACH): State.DETACHED for s in _CONNECTED},
    **{(s, Trigger.CLOSE): State.GONE for s in State if s is not State.GONE},
}


class LinkStateError(Scale0Error, RuntimeError):
    """A driver asked for a move `_TRANSITIONS` does not have (a bug, never input)."""


class Op(Enum):
    """What the driver does with the link's socket after a call."""

    NONE = "none"
    OPEN = "open"  # make a socket and connect it, before sending the outbox
    CLOSE = "close"  # close it, after sending the outbox


class Inbound(IntEnum):
    """What a broker message asks of the driver (`BrokerLink.receive`)."""

    NONE = 0  # handled here, or malformed or unexpected (logged): nothing to do
    # A request's commands, frame counts checked (docs/protocol.md section 3):
    REQUEST = Command.REQUEST  # [V, cmd, rid, service, script_name, message(, window)]
    CANCEL = Command.CANCEL  # [V, cmd, rid]
    CREDIT = Command.CREDIT  # [V, cmd, rid, n], n decimal digits
    BODY = Command.BODY  # [V, cmd, rid, flags, bytes]
    FRAME = Command.FRAME  # [V, cmd, rid, message]
    RECALL = Command.RECALL  # [V, cmd, rid]
    # The link's own news:
    WELCOMED = 0x100  # registered now (the process may be ready)
    LOST = 0x101  # BYE from the broker: close the socket; its requests are given up
    REFUSED = 0x102  # ERROR before WELCOME: exit 3, a new HELLO would be refused too
    DRAIN_ASKED = 0x103  # an unprompted DRAIN: retire (under a pool) or stop


def _no_jitter() -> float:
    return 0.0


def welcome_heartbeat_ms(payload: bytes) -> int | None:
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


class BrokerLink:
    """One S0W1 session with one broker, as the worker sees it (module docstring)."""

    __slots__ = ("backoff", "drain_acked", "draining", "endpoint", "expiry_s", "heartbeat_s",
                 "hello", "last_seen", "next_heartbeat", "outbox", "retry_at", "settings",
                 "state")

    def __init__(self, endpoint: str, hello: bytes, settings: LinkSettings) -> None:
        self.endpoint = endpoint
        self.hello = hello  # the HELLO payload (JSON), sent on every dial
        self.settings = settings
        self.state = State.DISCONNECTED
        self.outbox: list[list[bytes]] = []  # messages for the driver to send, in order
        self.heartbeat_s = settings.heartbeat_s  # how often we HEARTBEAT
        self.expiry_s = settings.heartbeat_s * settings.liveness  # silence that loses it
        self.last_seen = 0.0
        self.next_heartbeat = 0.0
        self.retry_at = 0.0  # when to dial, while DISCONNECTED
        # After a silent broker: 0.5 s doubling to reconnect_max_s, no jitter,
        # reset by a WELCOME (the loop helper's schedule, core/backoff.py).
        self.backoff = Backoff(CrashPolicy(
            first_s=FIRST_BACKOFF_S, max_s=max(FIRST_BACKOFF_S, settings.reconnect_max_s),
            healthy_s=math.inf, jitter=0.0), rand=_no_jitter)
        self.draining = False  # the worker is stopping: DRAIN after every WELCOME
        self.drain_acked = False  # the broker answered our DRAIN on this session

    def __repr__(self) -> str:
        return f"<BrokerLink {self.endpoint} {self.state.value}>"

    @property
    def connected(self) -> bool:
        """A socket is open: HELLO sent, welcomed or not."""
        return self.state is State.WELCOMED or self.state is State.HELLO_SENT

    @property
    def welcomed(self) -> bool:
        return self.state is State.WELCOMED

    @property
    def drained(self) -> bool:
        """Nothing more comes from this broker: it acked our DRAIN, or it never
        welcomed this session (so it holds no request of ours)."""
        return self.drain_acked or self.state is not State.WELCOMED

    def _go(self, trigger: Trigger) -> None:
        state = _TRANSITIONS.get((self.state, trigger))
        if state is None:
            raise LinkStateError(f"{trigger.value} in state {self.state.value} ({self.endpoint})")
        self.state = state

    # ---- timers -----------------------------------------------------------

    def tick(self, now: float, *, hold: bool = False) -> tuple[Op, float]:
        """Dial when due, give up a silent broker, HEARTBEAT when due. Returns
        the socket's Op and when to tick again (inf: only when told). `hold`
        keeps a DETACHED link away (its long request runs, or we are leaving).
        Run it only right after the socket was read empty: messages that
        queued meanwhile count before silence is judged."""
        state = self.state
        if state is State.WELCOMED or state is State.HELLO_SENT:
            if now - self.last_seen > self.expiry_s:
                self._silent(now)
                return Op.CLOSE, self.retry_at
            if now >= self.next_heartbeat:
                self.next_heartbeat = now + self.heartbeat_s
                self.outbox.append(_HEARTBEAT)
            return Op.NONE, self.next_heartbeat
        if state is State.GONE or (state is State.DETACHED and hold):
            return Op.NONE, math.inf
        if now < self.retry_at:
            return Op.NONE, self.retry_at
        self._dial(now)
        return Op.OPEN, self.next_heartbeat

    def beat(self, now: float) -> None:
        """HEARTBEAT if one is due; nothing else (no read happened, so no expiry)."""
        if self.connected and now >= self.next_heartbeat:
            self.next_heartbeat = now + self.heartbeat_s
            self.outbox.append(_HEARTBEAT)

    def _dial(self, now: float) -> None:
        self._go(Trigger.DIAL)
        s = self.settings
        self.drain_acked = False
        self.last_seen = now
        self.heartbeat_s = s.heartbeat_s
        self.expiry_s = s.heartbeat_s * s.liveness  # until a WELCOME tells the broker's
        self.next_heartbeat = now + self.heartbeat_s  # one interval after HELLO (section 5)
        self.outbox.append([VERSION, _HELLO, self.hello])

    def _silent(self, now: float) -> None:
        hint = (" (CURVE: is our key among its authorized keys, and --broker-key its key?)"
                if self.settings.curve and self.state is State.HELLO_SENT else "")
        log.warning("broker %s silent for %.1fs: reconnecting%s", self.endpoint,
                    now - self.last_seen, hint)
        self._go(Trigger.SILENCE)
        self.drain_acked = False
        self.retry_at = now + self.backoff.exited(now, 0.0)

    # ---- the worker's moves ----------------------------------------------------

    def drain(self) -> None:
        """The worker stops: DRAIN now if connected, and after every WELCOME."""
        self.draining = True
        if self.connected:
            self.outbox.append(_DRAIN)

    def detach(self) -> Op:
        """Leave for a while: BYE (even before WELCOME: the broker registered us
        at HELLO), then DETACHED until a tick that does not hold it."""
        if not self.connected:
            return Op.NONE
        self.outbox.append(_BYE)
        self._go(Trigger.DETACH)
        self.drain_acked = False
        self.retry_at = -math.inf
        return Op.CLOSE

    def close(self) -> Op:
        """Leave for good: BYE if welcomed. Idempotent."""
        if self.state is State.GONE:
            return Op.NONE
        connected = self.connected
        if self.state is State.WELCOMED:
            self.outbox.append(_BYE)
        self._go(Trigger.CLOSE)
        return Op.CLOSE if connected else Op.NONE

    # ---- messages from the broker ---------------------------------------------------

    def receive(self, frames: list[bytes], now: float) -> Inbound:
        """Take one message from the broker (module docstring)."""
        self.last_seen = now  # any message is a sign of life (docs/protocol.md 5)
        if len(frames) < 2 or frames[0] != VERSION or len(frames[1]) != 1:
            log.warning("malformed message from broker %s", self.endpoint)
            return Inbound.NONE
        command = frames[1][0]
        rule = _FOR_DRIVER.get(command)
        if rule is not None:
            event, counts, digits_at = rule
            if len(frames) in counts and (digits_at is None
                                          or count_of(frames[digits_at]) is not None):
                return event
        else:
            handle = _LINK_COMMANDS.get(command)
            if handle is not None:
                return handle(self, frames, now)
        log.warning("unexpected command %#x (%d frames) from broker %s", command, len(frames),
                    self.endpoint)
        return Inbound.NONE

    def _on_welcome(self, frames: list[bytes], now: float) -> Inbound:
        if not self.connected:  # not on an open session: nothing to welcome
            return Inbound.NONE
        self._go(Trigger.WELCOME)
        self.backoff.reset()
        heartbeat_ms = welcome_heartbeat_ms(frames[2] if len(frames) > 2 else b"")
        if heartbeat_ms is not None:
            # Expire the broker by its own announced interval; heartbeat it at
            # least that often too, so it keeps us whatever its liveness rule.
            broker_s = heartbeat_ms / 1000
            self.expiry_s = broker_s * self.settings.liveness
            self.heartbeat_s = min(self.settings.heartbeat_s, broker_s)
            self.next_heartbeat = min(self.next_heartbeat, now + self.heartbeat_s)
        if self.draining:  # reconnected while draining: say so again (section 3.7)
            self.outbox.append(_DRAIN)
        return Inbound.WELCOMED

    def _on_bye(self, frames: list[bytes], now: float) -> Inbound:
        """The broker does not know us (restarted, or expired us): HELLO again at once."""
        if not self.connected:
            return Inbound.NONE
        self._go(Trigger.BYE)
        self.drain_acked = False
        self.retry_at = now
        return Inbound.LOST

    def _on_drain(self, frames: list[bytes], now: float) -> Inbound:
        if self.draining:
            self.drain_acked = True  # our DRAIN's answer: every REQUEST before it is in
            return Inbound.NONE
        return Inbound.DRAIN_ASKED

    def _on_error(self, frames: list[bytes], now: float) -> Inbound:
        text = frames[3].decode("utf-8", "replace") if len(frames) > 3 else ""
        log.error("broker %s refused us: %s", self.endpoint, text)
        # A HELLO that is refused will be refused again (section 3.10); after
        # WELCOME an ERROR is only logged.
        return Inbound.NONE if self.state is State.WELCOMED else Inbound.REFUSED

    def _on_heartbeat(self, frames: list[bytes], now: float) -> Inbound:
        return Inbound.NONE  # its sign of life is taken already


# A request's commands: (what the driver gets, frame counts allowed, the
# index of a frame that must be decimal digits).
_FOR_DRIVER: dict[int, tuple[Inbound, tuple[int, ...], int | None]] = {
    Command.REQUEST: (Inbound.REQUEST, (6, 7), None),
    Command.CANCEL: (Inbound.CANCEL, (3,), None),
    Command.CREDIT: (Inbound.CREDIT, (4,), 3),
    Command.BODY: (Inbound.BODY, (5,), None),
    Command.FRAME: (Inbound.FRAME, (4,), None),
    Command.RECALL: (Inbound.RECALL, (3,), None),
}

# The link's own commands; extra frames are ignored (docs/protocol.md section 3).
_LINK_COMMANDS: dict[int, Callable[[BrokerLink, list[bytes], float], Inbound]] = {
    Command.WELCOME: BrokerLink._on_welcome,
    Command.BYE: BrokerLink._on_bye,
    Command.DRAIN: BrokerLink._on_drain,
    Command.ERROR: BrokerLink._on_error,
    Command.HEARTBEAT: BrokerLink._on_heartbeat,
}
