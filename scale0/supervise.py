"""Pre-forked worker processes: spawn, respawn with backoff, graceful stop.

The arbiter (gunicorn's shape, not its size): signal handlers only set flags
and write to a wake-up pipe; the loop reaps with ``waitpid(-1, WNOHANG)`` until
none are left, respawns what died, and on SIGTERM/SIGINT forwards SIGTERM,
waits `graceful_timeout_s`, then SIGKILLs what is left. A second signal forces
the stop at once. A child that exits with BOOT_FAILED (it cannot import its
app, or its HELLO was refused) halts the pool instead of being respawned
forever; children that keep crashing are respawned with growing delays.
"""

from __future__ import annotations

import logging
import os
import select
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass

log = logging.getLogger(__name__)

BOOT_FAILED = 3
MAX_BACKOFF_S = 10.0
STABLE_AFTER_S = 5.0  # a child that lived this long resets its crash count


@dataclass(slots=True)
class _Slot:
    pid: int = 0
    started_at: float = 0.0
    crashes: int = 0
    respawn_at: float = 0.0


class Pool:
    """Runs `target()` in `size` forked children; `run()` returns the pool's exit code."""

    def __init__(self, target: Callable[[], int], size: int, *,
                 graceful_timeout_s: float = 30.0, name: str = "scale0") -> None:
        if size < 1:
            raise ValueError("a pool needs at least one process")
        self.target = target
        self.size = size
        self.graceful_timeout_s = graceful_timeout_s
        self.name = name
        self._slots = [_Slot() for _ in range(size)]
        self._stop_signals = 0
        self._wake_r = self._wake_w = -1

    def _on_stop(self, *_: object) -> None:
        self._stop_signals += 1

    def run(self) -> int:
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        signal.set_wakeup_fd(self._wake_w)
        signal.signal(signal.SIGTERM, self._on_stop)
        signal.signal(signal.SIGINT, self._on_stop)
        signal.signal(signal.SIGCHLD, lambda *_: None)  # only to wake select()
        code = 0
        try:
            while not self._stop_signals:
                now = time.monotonic()
                for index, slot in enumerate(self._slots):
                    if not slot.pid and now >= slot.respawn_at:
                        self._spawn(index, slot)
                halted = self._reap()
                if halted is not None:
                    code = halted
                    break
                self._wait(1.0)
        finally:
            self._stop_all()
            signal.set_wakeup_fd(-1)
            os.close(self._wake_r)
            os.close(self._wake_w)
        return code

    def _spawn(self, index: int, slot: _Slot) -> None:
        pid = os.fork()
        if pid == 0:  # child: default signals, run, never return into the arbiter
            code = 1
            try:
                signal.set_wakeup_fd(-1)
                for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGCHLD):
                    signal.signal(sig, signal.SIG_DFL)
                os.close(self._wake_r)
                os.close(self._wake_w)
                code = self.target()
            except SystemExit as exc:
                code = exc.code if isinstance(exc.code, int) else 1
            except BaseException:
                log.exception("%s worker process crashed", self.name)
            finally:
                os._exit(code)
        slot.pid, slot.started_at = pid, time.monotonic()
        log.info("%s: started process %d (slot %d)", self.name, pid, index)

    def _reap(self) -> int | None:
        """Collect dead children; schedule respawns. Returns an exit code to halt."""
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return None
            if pid == 0:
                return None
            code = os.waitstatus_to_exitcode(status)
            for slot in self._slots:
                if slot.pid == pid:
                    break
            else:
                continue
            slot.pid = 0
            now = time.monotonic()
            if code == BOOT_FAILED:
                log.error("%s: process %d failed to boot; stopping the pool", self.name, pid)
                return BOOT_FAILED
            if now - slot.started_at >= STABLE_AFTER_S:
                slot.crashes = 0
            slot.crashes += 1
            delay = min(MAX_BACKOFF_S, 0.1 * 2 ** (slot.crashes - 1)) if code else 0.0
            slot.respawn_at = now + delay
            level = logging.INFO if code == 0 else logging.ERROR
            log.log(level, "%s: process %d exited with %d; respawn in %.1fs%s", self.name, pid,
                    code, delay, " (crash loop)" if slot.crashes >= 5 else "")

    def _wait(self, timeout_s: float) -> None:
        try:
            select.select([self._wake_r], [], [], timeout_s)
            os.read(self._wake_r, 512)
        except (BlockingIOError, InterruptedError):
            pass

    def _stop_all(self) -> None:
        live = {s.pid for s in self._slots if s.pid}
        for pid in live:
            _kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + self.graceful_timeout_s
        forced = self._stop_signals > 1
        while live:
            if time.monotonic() >= deadline or self._stop_signals > 1:
                for pid in live:
                    _kill(pid, signal.SIGKILL)
                forced = True
            try:
                pid, _ = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                break
            if pid:
                live.discard(pid)
            else:
                self._wait(0.05 if forced else 0.2)
        for slot in self._slots:
            slot.pid = 0


def _kill(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass
