"""The broker's S0W1 state machine, per worker identity (protocol.md 4.2).

An identity's state is not stored: it follows from its Worker record
(`state_of`), so it can never disagree with what dispatch reads. The table
`TRANSITIONS` says, h11-style, for each command a worker sends (protocol.md
section 3, W -> B), which states take it and the states the identity may be
in afterwards. `WorkerEvents.on_worker` (core/worker_events.py) consults it
for every message: a command whose row lacks the identity's state is not
handled; an unregistered identity is answered BYE instead (section 3.6), a
registered one ERROR 400. With `Dispatcher.check_transitions` set (tests),
the state after each command is checked against its row.

The same table is written out in protocol.md section 4.2;
tests/unit/test_worker_states.py keeps the two equal.
"""

from __future__ import annotations

import enum

from scale0.core.records import Worker
from scale0.wire.s0w1 import Command


class WorkerState(enum.Enum):
    """protocol.md 4.2. REMOVED is also the state of an identity never registered."""

    READY = "ready"  # registered, not draining, fewer requests than its capacity
    BUSY = "busy"  # requests >= capacity (more wait with prefetch): in no ready queue
    DRAINING = "draining"  # its DRAIN, `ctl recycle`, or `ctl drain` (until undrain)
    EJECTED = "ejected"  # eject_after request timeouts in a row, for a while
    REMOVED = "removed"  # BYE, expiry, EHOSTUNREACH, a new HELLO; or unknown


READY, BUSY, DRAINING, EJECTED, REMOVED = WorkerState
REGISTERED = frozenset({READY, BUSY, DRAINING, EJECTED})


def state_of(w: Worker | None) -> WorkerState:
    """The state of an identity whose registration is `w` (None: none).
    Draining wins over ejected: neither takes requests, and only an ejection ends
    by itself."""
    if w is None:
        return REMOVED
    if w.draining:
        return DRAINING
    if w.ejected_until:
        return EJECTED
    return BUSY if len(w.in_flight) >= w.capacity else READY


# A command's row: the states that take it -> the states each may go to.
Row = dict[WorkerState, frozenset[WorkerState]]


def _each(states: frozenset[WorkerState], after: frozenset[WorkerState] | None = None) -> Row:
    """Each of `states` going to `after`, or staying as it is (None)."""
    return {s: after if after is not None else frozenset({s}) for s in states}


_SERVING = frozenset({READY, BUSY})
# HELLO registers the identity anew (a registered one's old record is removed
# first): ready, or busy at once with queued requests, or draining if the
# operator drained it; a refused HELLO leaves the identity as it was.
_HELLO_TO = frozenset({READY, BUSY, DRAINING})

TRANSITIONS: dict[Command, Row] = {
    Command.HELLO: {s: _HELLO_TO | {s} for s in WorkerState},
    # A LAST frees a slot, which a queued request may take again.
    Command.REPLY: {**_each(_SERVING, _SERVING), **_each(frozenset({DRAINING, EJECTED}))},
    # A RETURN gives back a request that waited (prefetch): a slot may free too.
    Command.RETURN: {**_each(_SERVING, _SERVING), **_each(frozenset({DRAINING, EJECTED}))},
    Command.HEARTBEAT: _each(REGISTERED),
    Command.READ: _each(REGISTERED),
    Command.DRAIN: _each(REGISTERED, frozenset({DRAINING})),
    # From REMOVED: ignored, so that BYEs never ping-pong (section 3.6).
    Command.BYE: _each(frozenset(WorkerState), frozenset({REMOVED})),
}
