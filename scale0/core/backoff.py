"""The crash-loop policy: how long to wait before restarting what died.

One policy for every supervisor (the pool's slots, pool/supervise.py, and
the processes of `scale0 up`, deploy/stack.py), so a crashing worker and a
crashing broker are retried on the same schedule:

* Each restart after a crash waits twice as long as the one before, from
  `first_s` up to `max_s` (the cap): a process that dies at once does not
  spin the CPU, and one that recovers is back within `max_s`.
* Each delay is cut by a random fraction up to `jitter` ("equal jitter"
  below the cap): processes that crashed together (a broker went away)
  do not come back in lock-step. The cap is never exceeded.
* A process that ran `healthy_s` or longer before it died starts the count
  over: it was healthy, its crash is a first crash.
* `loop_after` crashes in a row, each within `healthy_s` of its start, are
  a crash loop: the supervisor logs it as such (ERROR, once per crash).
* A clean exit (`crashed=False`: exit status 0, not killed) is counted but
  restarted at once.

Pure: no clock, no sleeping. The caller passes `now` and how long the
process ran, and reads `retry_at`; the random source is a parameter, so a
test fixes it and asserts exact delays.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class CrashPolicy:
    first_s: float = 0.1  # the delay after a first crash
    max_s: float = 10.0  # the cap
    healthy_s: float = 5.0  # a run this long resets the crash count
    loop_after: int = 5  # crashes in a row that make a crash loop
    jitter: float = 0.2  # each delay is cut by up to this fraction, at random

    def __post_init__(self) -> None:
        if not 0 < self.first_s <= self.max_s:
            raise ValueError("CrashPolicy needs 0 < first_s <= max_s")
        if not 0.0 <= self.jitter < 1.0:
            raise ValueError("CrashPolicy needs 0 <= jitter < 1")
        if self.healthy_s < 0 or self.loop_after < 1:
            raise ValueError("CrashPolicy needs healthy_s >= 0 and loop_after >= 1")

    def delay_s(self, crashes: int, rand: float = 0.0) -> float:
        """The delay before restart number `crashes` (1: the first), `rand` in [0, 1)."""
        if crashes < 1:
            return 0.0
        # 2 ** 64 is far past any cap; the exponent is bounded so it never overflows.
        base = min(self.max_s, self.first_s * 2.0 ** min(crashes - 1, 64))
        return base * (1.0 - self.jitter * rand)


CRASH_POLICY = CrashPolicy()


class Backoff:
    """The restart schedule of one restartable thing (a pool slot, a stack process)."""

    __slots__ = ("_rand", "crashes", "policy", "retry_at")

    def __init__(self, policy: CrashPolicy = CRASH_POLICY,
                 rand: Callable[[], float] = random.random) -> None:
        self.policy = policy
        self.crashes = 0  # in a row, each within healthy_s of its start
        self.retry_at = 0.0  # when the next start is due (0.0: now)
        self._rand = rand

    def exited(self, now: float, ran_s: float, *, crashed: bool = True) -> float:
        """It stopped at `now` after running `ran_s`; schedules the restart and
        returns its delay."""
        if ran_s >= self.policy.healthy_s:
            self.crashes = 0
        self.crashes += 1
        delay = self.policy.delay_s(self.crashes, self._rand()) if crashed else 0.0
        self.retry_at = now + delay
        return delay

    def due(self, now: float) -> bool:
        return now >= self.retry_at

    @property
    def crash_loop(self) -> bool:
        return self.crashes >= self.policy.loop_after

    def reset(self) -> None:
        """Forget the history (a deliberate reload starts clean)."""
        self.crashes = 0
        self.retry_at = 0.0
