"""Relay <-> broker wire protocol (S0R1), sans-IO. See docs/protocol.md Appendix B.

The relay binds a ROUTER, a broker connects a DEALER; every message is one
ZeroMQ multipart message (the ROUTER sees the broker's routing id in front,
which is not part of what this module reads or builds).

Broker to relay:

* a control message: one ASCII frame, ``HELLO S0R1 <window> [<heartbeat_ms>]``,
  ``CREDIT <n>``, ``HEARTBEAT``, ``DRAIN``, ``RELEASE <sender> <conn id> <n>``
  or ``LEAVE``;
* replies to publish: an empty frame, then one or more Mongrel2 replies.

Relay to broker:

* a batch: one or more frames, the first not empty, each one Mongrel2
  message byte for byte;
* a control message: two frames, an empty one and ``HEARTBEAT``, ``DRAINING``,
  ``BYE`` or ``WHO``.

Frames stay bytes and Mongrel2 messages are never copied or re-encoded: a
batch's frames are the list the socket gave. Anything else is one
`S0R1Error`, whose `command` is the first word of a bad control frame, so
the relay can tell a bad HELLO (counted) from an unknown peer's other
messages (answered WHO). Parsing is strict: ``HEARTBEAT x`` or a 13-digit
CREDIT is malformed.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from enum import Enum

from scale0.errors import ProtocolError
from scale0.wire.mongrel2 import MAX_ID_DIGITS, is_decimal

VERSION = b"S0R1"
MAX_NUMBER_DIGITS = 12  # window, credit, heartbeat_ms: what no sane value exceeds

# Broker -> relay command words.
HELLO = b"HELLO"
CREDIT = b"CREDIT"
HEARTBEAT = b"HEARTBEAT"
DRAIN = b"DRAIN"
RELEASE = b"RELEASE"
LEAVE = b"LEAVE"
MAX_SENDER_BYTES = 256


class S0R1Error(ProtocolError, ValueError):
    """A malformed S0R1 message; `command`: a control frame's first word, or
    b"". It never reaches a client; `status_hint` is 502, as for S0W1 (a bad
    message from the other side of the gateway)."""

    def __init__(self, msg: str, *, command: bytes = b"", status_hint: int = 502) -> None:
        super().__init__(msg, status_hint=status_hint)
        self.command = command


# ---- broker -> relay ---------------------------------------------------------

@dataclass(frozen=True, slots=True)
class Hello:
    """Join (or join again after WHO): the relay may send `window` messages
    ahead of our reading them; `heartbeat_ms` None: the relay's own."""

    window: int
    heartbeat_ms: int | None = None


@dataclass(frozen=True, slots=True)
class Credit:
    n: int


@dataclass(frozen=True, slots=True)
class Heartbeat:
    pass


@dataclass(frozen=True, slots=True)
class Drain:
    pass


@dataclass(frozen=True, slots=True)
class Release:
    """A draining broker holds nothing of connection `key` (b"SENDER CONN_ID",
    as the relay keys it) and has read `n` of its messages since DRAINING:
    if the relay sent it no more than that, it deals the connection's next
    message to another broker."""

    key: bytes
    n: int


@dataclass(frozen=True, slots=True)
class Leave:
    pass


BrokerCommand = Hello | Credit | Heartbeat | Drain | Release | Leave

# The argument-less commands: one instance each (they carry nothing).
_BARE: dict[bytes, BrokerCommand] = {HEARTBEAT: Heartbeat(), DRAIN: Drain(), LEAVE: Leave()}


@dataclass(frozen=True, slots=True)
class Replies:
    """Broker -> relay: Mongrel2 replies to publish, in order."""

    replies: Sequence[bytes]


def _number(text: bytes) -> int | None:
    """A decimal as the protocol writes it: ASCII digits (bytes.isdigit), no
    leading zero, at most MAX_NUMBER_DIGITS; None for anything else."""
    if (not text.isdigit() or len(text) > MAX_NUMBER_DIGITS
            or (text[:1] == b"0" and len(text) > 1)):
        return None
    return int(text)


def encode_hello(window: int, heartbeat_ms: int | None = None) -> bytes:
    frame = b"HELLO S0R1 %d" % window
    return frame if heartbeat_ms is None else frame + b" %d" % heartbeat_ms


def encode_credit(n: int) -> bytes:
    return b"CREDIT %d" % n


def encode_release(key: bytes, n: int) -> bytes:
    return b"RELEASE %s %d" % (key, n)


def connection_key(raw: bytes) -> bytes | None:
    """b"SENDER CONN_ID" of a Mongrel2 message (its first two words): how the
    relay keys its sticky connections and a draining broker its RELEASE
    counts (one function, so both always agree). None if it has no such
    words, or CONN_ID is not a decimal id as Mongrel2 writes them: no
    connection anybody could answer."""
    i = raw.find(b" ")
    j = raw.find(b" ", i + 1) if i > 0 else -1
    if j > i + 1 and is_decimal(raw[i + 1:j], MAX_ID_DIGITS):
        return raw[:j]
    return None


def encode_command(command: BrokerCommand) -> bytes:
    """The one frame of a control message."""
    if isinstance(command, Hello):
        return encode_hello(command.window, command.heartbeat_ms)
    if isinstance(command, Credit):
        return encode_credit(command.n)
    if isinstance(command, Release):
        return encode_release(command.key, command.n)
    return {Heartbeat: HEARTBEAT, Drain: DRAIN, Leave: LEAVE}[type(command)]


def replies_message(replies: Sequence[bytes]) -> list[bytes]:
    """The frames of a replies message (at least one reply)."""
    if not replies:
        raise ValueError("a replies message carries at least one reply")
    return [b"", *replies]


def parse_command(frame: bytes) -> BrokerCommand:
    """One control frame. A HELLO's heartbeat that is not a positive number of
    at most 12 digits means "the relay's own" (older brokers sent none)."""
    bare = _BARE.get(frame)
    if bare is not None:
        return bare
    command, _, arg = frame.partition(b" ")
    if command == CREDIT:
        n = _number(arg)
        if n is None:
            raise S0R1Error(f"CREDIT needs a number, got {arg[:24]!r}", command=CREDIT)
        return Credit(n)
    if command == RELEASE:
        return _release(arg)
    if command == HELLO:
        version, _, rest = arg.partition(b" ")
        window_text, _, heartbeat_text = rest.partition(b" ")
        if version != VERSION:
            raise S0R1Error(f"HELLO for version {version[:24]!r}, not S0R1", command=HELLO)
        window = _number(window_text)
        if window is None:
            raise S0R1Error(f"HELLO needs a window, got {window_text[:24]!r}", command=HELLO)
        heartbeat_ms = _number(heartbeat_text)
        return Hello(window, heartbeat_ms or None)
    raise S0R1Error(f"unknown command {frame[:24]!r}", command=command)


def _release(arg: bytes) -> Release:
    words = arg.split(b" ")
    n = _number(words[2]) if len(words) == 3 else None
    if (n is None or not 0 < len(words[0]) <= MAX_SENDER_BYTES
            or not is_decimal(words[1], MAX_ID_DIGITS)):
        raise S0R1Error(f"RELEASE needs SENDER CONN_ID N, got {arg[:64]!r}", command=RELEASE)
    return Release(words[0] + b" " + words[1], n)


def split_from_broker(frames: Sequence[bytes]) -> bytes | Replies:
    """A whole message from a broker, without the routing id: its one control
    frame (for `parse_command`), or the replies it carries."""
    if len(frames) == 1:
        return frames[0]
    if len(frames) > 1 and not frames[0]:
        return Replies(frames[1:])
    raise S0R1Error(f"a {len(frames)}-frame message that is neither a command nor replies")


# ---- relay -> broker ---------------------------------------------------------

class Control(Enum):
    """The relay's control messages: `[b"", value]`."""

    HEARTBEAT = b"HEARTBEAT"  # every heartbeat interval
    DRAINING = b"DRAINING"  # the answer to DRAIN: what follows counts for RELEASE
    BYE = b"BYE"  # the answer to LEAVE: nothing follows it
    WHO = b"WHO"  # the relay does not know this broker: say HELLO again


_CONTROL = {c.value: c for c in Control}


@dataclass(frozen=True, slots=True)
class Batch:
    """Relay -> broker: Mongrel2 messages, each counted against the window."""

    messages: Sequence[bytes]


def control_message(control: Control) -> list[bytes]:
    return [b"", control.value]


def parse_from_relay(frames: Sequence[bytes]) -> Batch | Control:
    """A whole message from the relay. A batch's frames are not looked into:
    each is a Mongrel2 message for the dispatcher to parse."""
    if frames and frames[0]:
        return Batch(frames)
    if len(frames) == 2:
        control = _CONTROL.get(frames[1])
        if control is not None:
            return control
        raise S0R1Error(f"unknown relay control message {frames[1][:24]!r}")
    raise S0R1Error(f"a {len(frames)}-frame message that is neither a batch nor control")
