"""Rate-limited warnings: a count and a sample per interval, not a line per message.

A peer that sends garbage as fast as it can must not turn the log into the
bottleneck (one probe wrote 116,000 warnings in 20 s). `RateLimitedLog`
keeps one slot per kind of warning (a short key such as ``"bad worker"``):
the first warning of a kind in an interval is logged at once, as a sample;
the others of that interval are only counted, and the next warning of that
kind after the interval (or `flush`) logs one summary line, "N more like
this", with the last one seen as its sample. So a steady flood costs one or
two lines per kind per interval, and a single bad message is still logged
the moment it arrives.

Pure: the caller passes `now` (monotonic seconds); nothing here reads a
clock. The number of kinds is bounded by the caller's keys, which are fixed
strings, never peer input.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

__all__ = ["RateLimitedLog"]

DEFAULT_INTERVAL_S = 10.0


@dataclass(slots=True)
class _Slot:
    window_ends: float
    suppressed: int = 0
    sample: str = ""


class RateLimitedLog:
    """One per component (dispatcher, relay core), each with its logger."""

    def __init__(self, logger: logging.Logger, interval_s: float = DEFAULT_INTERVAL_S,
                 level: int = logging.WARNING) -> None:
        self.logger = logger
        self.interval_s = interval_s
        self.level = level
        self._slots: dict[str, _Slot] = {}
        self.logged = 0  # lines written (samples and summaries), for tests
        self.suppressed = 0  # warnings only counted, over the whole life

    def warning(self, key: str, now: float, msg: str, *args: object) -> None:
        """Log `msg % args` now if `key` is quiet this interval, else count it.

        The message is only formatted when it will be, or may become, the
        sample: a suppressed warning costs one dict lookup and a format.
        """
        slot = self._slots.get(key)
        if slot is not None and now < slot.window_ends:
            slot.suppressed += 1
            self.suppressed += 1
            slot.sample = msg % args if args else msg
            return
        if slot is not None and slot.suppressed:
            self._summary(key, slot)
        self._slots[key] = _Slot(now + self.interval_s)
        self.logged += 1
        self.logger.log(self.level, msg, *args, stacklevel=2)

    def flush(self, now: float) -> None:
        """Log the summary of every interval that has ended (call it on a timer,
        so the count of a flood that stopped is still reported)."""
        for key, slot in list(self._slots.items()):
            if now >= slot.window_ends:
                if slot.suppressed:
                    self._summary(key, slot)
                del self._slots[key]

    def _summary(self, key: str, slot: _Slot) -> None:
        self.logged += 1
        self.logger.log(self.level, "%d more %s warnings in %.0f s (last: %s)",
                        slot.suppressed, key, self.interval_s, slot.sample)
        slot.suppressed = 0
