"""What every Scale0 I/O loop shares: a wake-up fd, signals that only count,
and one meaning of stop.

Theory of operation (gunicorn's arbiter; pyzmq's "Poller takes raw fds"):

* `Wakeup` is a non-blocking pipe. Its read end is what the loop waits on
  next to its sockets: ``zmq.Poller().register(loop.fileno(), zmq.POLLIN)``
  (the poller then reports that fd number, an int), or `RunLoop.wait` for a
  loop with no sockets. Anything may write a byte to it: `wake()` from another thread, a
  forked child through `write_fd` (pool/childstate.py), and the C-level
  signal handler through ``signal.set_wakeup_fd``. The byte only ends the
  wait; what happened is in the counters. A full pipe already wakes the
  loop, so a failed write is dropped.
* Signal handlers only count (`take` reads and clears a count) and, for
  SIGTERM/SIGINT, call `Stop.request`. The loop acts on its next turn: a
  handler runs between two bytecodes, in the middle of anything.
* `Stop` is the stop every loop means: the first SIGTERM/SIGINT asks for a
  graceful stop (take nothing new, finish what is held, up to a grace
  period); a second one, or the grace period running out, forces it (end
  now; supervisors SIGKILL their children). A request made with an explicit
  `force` (`scale0 ctl shutdown [--force]`) is taken as asked: a repeated
  graceful shutdown stays graceful.
* SIGHUP means reload where the program has one (the pool: new processes;
  the broker and relay: their authorized keys); `install_signals(count=...)`
  names the signals a program counts besides the stop signals.

Use, in a loop that polls ZeroMQ sockets (the broker, the relay)::

    loop = RunLoop()                        # in __init__: no signal touched
    loop.install_signals(count=(signal.SIGHUP,))   # main thread only
    wake_fd = loop.fileno()
    poller.register(wake_fd, zmq.POLLIN)
    while True:
        now = time.monotonic()
        if loop.stop.begin(now, graceful_timeout_s):
            ...stop taking work...
        if loop.stop.stopping and (loop.stop.overdue(now) or finished()):
            break
        if loop.take(signal.SIGHUP):
            reload()
        for sock, _ in poller.poll(timeout_ms):
            if sock == wake_fd:
                loop.drain()
            ...
    loop.close()                            # restores the handlers, closes the pipe

and `loop.request_stop(force)` from another thread or a control command.
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import threading
from collections.abc import Iterable
from types import FrameType
from typing import Any

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class Stop:
    """Graceful, then forced. Signal-safe: `request` only sets fields; the
    other methods are for the loop. Pure: time is an argument."""

    __slots__ = ("deadline", "forced", "requests")

    def __init__(self) -> None:
        self.requests = 0  # stop requests so far
        self.forced = False  # end now: a second request, or asked so
        self.deadline = 0.0  # the end of the grace period (0.0: not begun)

    def request(self, force: bool | None = None) -> None:
        """Ask to stop. `force=None` (a signal): the second request forces.
        True or False (a control command): as asked, never un-forcing."""
        self.forced = self.forced or (self.requests > 0 if force is None else force)
        self.requests += 1

    @property
    def stopping(self) -> bool:
        return self.requests > 0

    def begin(self, now: float, grace_s: float) -> bool:
        """True once, at the first call after a request: the grace period
        starts now and lasts `grace_s`. The loop then stops taking work."""
        if not self.requests or self.deadline:
            return False
        self.deadline = now + grace_s
        return True

    def overdue(self, now: float) -> bool:
        """Forced, or past the grace period: end now."""
        return self.forced or (self.deadline > 0.0 and now >= self.deadline)


class Wakeup:
    """A non-blocking pipe; waiting on `fileno()` ends when anyone writes."""

    def __init__(self) -> None:
        self.read_fd, self.write_fd = os.pipe()
        os.set_blocking(self.read_fd, False)
        os.set_blocking(self.write_fd, False)

    def fileno(self) -> int:
        return self.read_fd

    def wake(self) -> None:
        """Signal-safe and thread-safe."""
        with contextlib.suppress(OSError):  # full (it wakes anyway) or closed
            os.write(self.write_fd, b"w")

    def drain(self) -> None:
        with contextlib.suppress(OSError):  # empty (BlockingIOError) or closed
            while os.read(self.read_fd, 4096):
                pass

    def wait(self, timeout_s: float) -> bool:
        """Wait until woken or `timeout_s` passed; True if woken (and drained)."""
        try:
            ready = select.select([self.read_fd], [], [], max(0.0, timeout_s))[0]
        except InterruptedError:  # pragma: no cover - PEP 475 retries select
            ready = [self.read_fd]
        if ready:
            self.drain()
        return bool(ready)

    def close(self) -> None:
        for fd in (self.read_fd, self.write_fd):
            with contextlib.suppress(OSError):
                os.close(fd)
        self.read_fd = self.write_fd = -1


class RunLoop:
    """A `Wakeup`, a `Stop` and signal counters, for one loop."""

    def __init__(self) -> None:
        self.wakeup = Wakeup()
        self.stop = Stop()
        self._counts: dict[int, int] = {}
        self._saved: dict[int, Any] = {}  # signal -> the handler before ours
        self._saved_fd: int | None = None

    def fileno(self) -> int:
        return self.wakeup.read_fd

    def request_stop(self, force: bool | None = None) -> None:
        """`Stop.request`, and wake the loop. Safe from a signal handler or a thread."""
        self.stop.request(force)
        self.wakeup.wake()

    def install_signals(self, *, count: Iterable[int] = (),
                        stop: Iterable[int] = STOP_SIGNALS) -> None:
        """Main thread only. `stop` signals call `request_stop()`; `count` signals
        are counted for `take`. Every one of them wakes the loop (the C handler
        writes the signal number to the wake-up fd before Python runs ours)."""
        if threading.current_thread() is not threading.main_thread():
            raise RuntimeError("signal handlers can only be installed in the main thread")
        self._saved_fd = signal.set_wakeup_fd(self.wakeup.write_fd, warn_on_full_buffer=False)
        for sig in stop:
            self._saved.setdefault(sig, signal.signal(sig, self._on_stop))
        for sig in count:
            self._saved.setdefault(sig, signal.signal(sig, self._on_count))

    def _on_stop(self, _sig: int, _frame: FrameType | None) -> None:
        self.request_stop()

    def _on_count(self, sig: int, _frame: FrameType | None) -> None:
        self._counts[sig] = self._counts.get(sig, 0) + 1
        self.wakeup.wake()  # set_wakeup_fd did too; this covers a caller's own handler

    def count(self, sig: int, n: int = 1) -> None:
        """Count `sig` as if delivered (a test, or a handler of the caller's)."""
        self._counts[sig] = self._counts.get(sig, 0) + n
        self.wakeup.wake()

    def take(self, sig: int) -> int:
        """How many `sig` arrived since the last take (0: none)."""
        return self._counts.pop(sig, 0)

    def drain(self) -> None:
        self.wakeup.drain()

    def wait(self, timeout_s: float) -> bool:
        return self.wakeup.wait(timeout_s)

    def restore_signals(self) -> None:
        """The handlers and wake-up fd from before `install_signals` (main thread)."""
        if self._saved_fd is not None:
            signal.set_wakeup_fd(self._saved_fd)
            self._saved_fd = None
        for sig, handler in self._saved.items():
            signal.signal(sig, handler if handler is not None else signal.SIG_DFL)
        self._saved.clear()

    def close(self) -> None:
        self.restore_signals()
        self.wakeup.close()
