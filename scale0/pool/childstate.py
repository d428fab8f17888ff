"""What a pre-forked worker process tells its arbiter, through shared memory.

The arbiter (supervise.Pool) makes one `ChildState` per process before it
forks: a small anonymous ``MAP_SHARED`` mmap, so after the fork both sides see
the same bytes. Each field has exactly one writer:

=============  =======  ==================================================
field          writer   meaning
=============  =======  ==================================================
alive_s        child    monotonic time the worker's main loop last ran
oldest_s       child    monotonic start of its oldest in-flight request,
                        not counting time blocked on flow-control credits
                        (0.0: no request in flight)
ready          child    1 once it is announced to its brokers (WELCOMEd)
retire         child    1 once it reached its request limit
max_requests   arbiter  this process's request limit (0: no limit), set
                        before the fork, jitter included
=============  =======  ==================================================

Every field is one aligned 8-byte word, written with a single store (a
memoryview of format 'd' or 'q'), so a reader never sees half a value on
the 64-bit machines we run on. ``time.monotonic()`` is CLOCK_MONOTONIC,
one clock for every process on the host, so the arbiter compares the
child's times with its own `now`. Writing costs no system call: the worker
updates these from its loop a few times a second, never per request.

A child also writes one byte to the arbiter's wake-up pipe when it becomes
ready or asks to retire (`wake_fd`), so the arbiter reacts at once instead
of at its next one-second check.
"""

from __future__ import annotations

import mmap
import os

_SIZE = 40  # 2 doubles + 3 int64


class ChildState:
    """One process's report to its arbiter; made by the arbiter before the fork."""

    def __init__(self, max_requests: int = 0, wake_fd: int = -1) -> None:
        self._map = mmap.mmap(-1, _SIZE)  # anonymous; MAP_SHARED survives fork()
        view = memoryview(self._map)
        self._times = view[0:16].cast("d")  # alive_s, oldest_s
        self._flags = view[16:40].cast("q")  # ready, retire, max_requests
        view.release()
        self._flags[2] = max_requests
        self.wake_fd = wake_fd

    # ---- child side ----------------------------------------------------

    def beat(self, now: float, oldest_s: float) -> None:
        """The loop is alive at `now`; `oldest_s` as in the table (0.0: idle)."""
        self._times[0] = now
        self._times[1] = oldest_s

    def set_ready(self) -> None:
        if not self._flags[0]:
            self._flags[0] = 1
            self._wake()

    def ask_retire(self) -> None:
        if not self._flags[1]:
            self._flags[1] = 1
            self._wake()

    def _wake(self) -> None:
        if self.wake_fd >= 0:
            try:
                os.write(self.wake_fd, b"c")
            except OSError:  # full (the arbiter wakes anyway) or closed
                pass

    # ---- both sides ----------------------------------------------------

    @property
    def alive_s(self) -> float:
        return self._times[0]

    @property
    def oldest_s(self) -> float:
        return self._times[1]

    @property
    def ready(self) -> bool:
        return bool(self._flags[0])

    @property
    def retire(self) -> bool:
        return bool(self._flags[1])

    @property
    def max_requests(self) -> int:
        return self._flags[2]

    def stuck_for(self, now: float, started_at: float) -> float:
        """How long the process has shown no progress: the longer of the time
        since its loop last ran (or since `started_at`, while it boots) and
        the age of its oldest request."""
        silent = now - max(self.alive_s, started_at)
        oldest = self.oldest_s
        return max(silent, now - oldest if oldest else 0.0)

    def close(self) -> None:
        self._times.release()
        self._flags.release()
        self._map.close()


_current: ChildState | None = None


def current() -> ChildState | None:
    """This process's ChildState when it runs under a Pool, else None."""
    return _current


def set_current(state: ChildState | None) -> None:
    global _current
    _current = state
