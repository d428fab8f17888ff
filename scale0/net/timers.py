"""A loop's timers as a table: each says when it is next due and what to do then.

The loop asks `plan(now)` for the poll deadline before it polls, and calls
`fire(now)` after: every timer whose planned time has come runs, in table
order. A timer's due time is computed once per wake-up (some are O(n), like
the dispatcher's), and one that comes due while others fire runs on the next
wake-up, at once (the poll timeout is then 0). A timer with no action only
bounds the poll: "while X, wake at least every Y".
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

NEVER = math.inf


@dataclass(slots=True)
class Timer:
    name: str
    due: Callable[[float], float]  # given now: when next, NEVER if not armed
    fire: Callable[[float], None] | None = None  # None: only wakes the loop
    planned: float = NEVER


class Timers:
    def __init__(self, timers: Sequence[Timer]) -> None:
        self.timers = list(timers)

    def plan(self, now: float) -> float:
        """The earliest due time; each timer's is kept for `fire`."""
        deadline = NEVER
        for timer in self.timers:
            timer.planned = at = timer.due(now)
            if at < deadline:
                deadline = at
        return deadline

    def fire(self, now: float) -> None:
        for timer in self.timers:
            if timer.fire is not None and timer.planned <= now:
                timer.planned = NEVER
                timer.fire(now)


def poll_timeout_ms(deadline: float, now: float) -> int | None:
    """ZeroMQ's poll timeout for `deadline`: rounded up, or the loop would
    wake just before it and spin; None (no timeout) for NEVER."""
    if deadline == NEVER:
        return None
    return max(0, math.ceil((deadline - now) * 1000))
