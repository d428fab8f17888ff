"""Pre-forked worker processes: spawn, respawn, reload, recycle, time out, stop.

Theory of operation (gunicorn's arbiter, in the shape of our workers):

Signal handlers only count signals; they and the children (pool/childstate.py)
write a byte to the wake-up pipe (pool/runloop.py). The loop wakes at least once a second,
reaps with ``waitpid(-1, WNOHANG)`` until none are left, then brings the
processes back in line with these rules:

* Every live process is either *current* or *superseded*, and either serving
  or *stopping* (it was sent SIGTERM: it drains, finishes its requests, says
  BYE and exits; SIGKILL if it is still there `graceful_timeout_s` later).
* Current serving processes hold the slots 0..size-1, one each. An empty slot
  is filled by a fork (after its crash backoff). The app is imported in the
  child, so a fork always loads the code on disk now.
* Superseded serving processes keep serving until replaced: while (current
  ready processes) + (superseded serving processes) > size, the oldest
  superseded one is sent SIGTERM. So a replacement is announced to the
  brokers (ready) before the process it replaces drains, and no request fails.
* SIGHUP (reload) supersedes every serving process: `size` new ones start and
  each ready one retires one old one. Current processes that were not ready
  yet are stopped at once: a HUP during a reload starts the reload over.
* A process that reached its request limit (`max_requests` + a random
  0..`max_requests_jitter`, fixed per process) asks to retire and is
  superseded the same way, alone; but while `size` processes are already
  on their way out (superseded, stopping or killed) it waits and keeps
  serving, so however slowly processes drain, a pool never holds more than
  2 x size of them through recycling.
* `timeout_s`: a process whose oldest request (time blocked on flow-control
  credits not counted) or whose silent main loop is older than that gets
  SIGKILL, an ERROR log line, and a replacement. Boot time counts as silence,
  as in gunicorn.
* A child exiting with BOOT_FAILED (cannot import its app; HELLO refused):
  if other processes are serving (a reload to broken code) the reload is
  abandoned, the old processes stay and serve, and nothing is forked again
  until the next SIGHUP. With nothing serving the pool halts: respawning a
  process that cannot boot would only spin.
* Other exits are respawned in their slot on the crash-loop policy of
  core/backoff.py (the one `scale0 up` uses): a delay that doubles per crash,
  with jitter, up to a cap; crashes in a row, each soon after its start, are
  logged as a crash loop; a clean exit (0) is respawned at once.
* `on_ready` is called once, in the arbiter, the first time every slot is
  held by a ready process (each child says so through its ChildState: the
  worker sets it once WELCOMEd, worker/process.py): that is the pool's READY
  line. A pool whose first processes cannot boot halts before it, so a
  broken app never prints READY.
* SIGTTIN / SIGTTOU add / remove a slot (the process in a removed slot is
  stopped gracefully).
* SIGTERM/SIGINT: SIGTERM to all, wait `graceful_timeout_s`, SIGKILL the rest.
  A second SIGTERM/SIGINT sends SIGKILL at once.
* Every child asks for SIGTERM when the arbiter dies (pool/lifeline.py), so an
  arbiter killed with SIGKILL leaves no worker process behind.
"""

from __future__ import annotations

import logging
import os
import random
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass

from scale0.config import PoolConfig, default
from scale0.core.backoff import Backoff
from scale0.pool.childstate import ChildState
from scale0.pool.forkworker import fork_worker
from scale0.pool.runloop import RunLoop

log = logging.getLogger(__name__)

BOOT_FAILED = 3
CHECK_EVERY_S = 1.0


# Counted by the loop (besides the stop signals); SIGCHLD only wakes it to reap.
_COUNTED = (signal.SIGHUP, signal.SIGTTIN, signal.SIGTTOU, signal.SIGCHLD)


@dataclass(slots=True, eq=False)
class _Child:
    pid: int
    slot: int
    state: ChildState
    started_at: float
    superseded: bool = False
    stopping_at: float = 0.0  # when it was sent SIGTERM (0.0: serving)
    killed: str = ""  # why it was sent SIGKILL
    seen_ready: bool = False
    retire_ignored: bool = False


class Pool:
    """Runs `target()` in `size` forked children; `run()` returns the pool's exit code."""

    def __init__(self, target: Callable[[], int], size: int, *,
                 graceful_timeout_s: float = default(PoolConfig, "graceful_timeout"),
                 name: str = "scale0",
                 max_requests: int = default(PoolConfig, "max_requests"),
                 max_requests_jitter: int = default(PoolConfig, "max_requests_jitter"),
                 timeout_s: float = default(PoolConfig, "timeout"),
                 on_ready: Callable[[], None] | None = None) -> None:
        # Defaults as declared (config/declared.py); cli.py builds it with config.build.
        if size < 1:
            raise ValueError("a pool needs at least one process")
        if max_requests < 0 or max_requests_jitter < 0 or timeout_s < 0:
            raise ValueError("max_requests, max_requests_jitter and timeout_s must be >= 0")
        self.target = target
        self.size = size
        self.graceful_timeout_s = graceful_timeout_s
        self.name = name
        self.max_requests = max_requests
        self.max_requests_jitter = max_requests_jitter
        self.timeout_s = timeout_s
        self.on_ready = on_ready  # called once: every slot first held by a ready process
        self._slots = [Backoff() for _ in range(size)]  # each slot's crash history
        self._children: dict[int, _Child] = {}
        self._boot_failed = False  # a reload failed: fork nothing until the next HUP
        self._loop: RunLoop | None = None  # made in run(): the wake-up pipe, signal counts

    # ---- the loop (signal handlers only count: pool/runloop.py) ----------

    def run(self) -> int:
        loop = self._loop = RunLoop()
        loop.install_signals(count=_COUNTED)
        code = 0
        try:
            while not loop.stop.stopping:
                now = time.monotonic()
                loop.take(signal.SIGCHLD)  # it only woke us: _reap looks anyway
                halted = self._reap(now)
                if halted is not None:
                    code = halted
                    break
                if loop.take(signal.SIGHUP):
                    self._reload()
                resizes = loop.take(signal.SIGTTIN) - loop.take(signal.SIGTTOU)
                if resizes:
                    self._resize(resizes)
                self._check(now)
                self._fill_slots(now)
                self._retire_superseded(now)
                loop.wait(self._next_wake(now) - now)
        finally:
            self._stop_all()
            loop.close()
        return code

    def _serving(self) -> list[_Child]:
        return [c for c in self._children.values() if not c.stopping_at]

    def _current(self) -> list[_Child]:
        return [c for c in self._children.values() if not c.stopping_at and not c.superseded]

    def _spawn(self, slot: int) -> None:
        limit = self.max_requests
        if limit:
            limit += random.randint(0, self.max_requests_jitter)
        assert self._loop is not None
        state = ChildState(limit, self._loop.wakeup.write_fd)
        pid = fork_worker(self.target, state, name=self.name,
                          close_fds=(self._loop.wakeup.read_fd,),
                          close_states=[c.state for c in self._children.values()])
        now = time.monotonic()
        self._children[pid] = _Child(pid, slot, state, now)
        log.info("%s: started process %d (slot %d%s)", self.name, pid, slot,
                 f", max {limit} requests" if limit else "")

    def _reap(self, now: float) -> int | None:
        """Collect dead children, schedule respawns. Returns an exit code to halt."""
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return None
            if pid == 0:
                return None
            child = self._children.pop(pid, None)
            if child is None:
                continue
            child.state.close()
            code = os.waitstatus_to_exitcode(status)
            if child.stopping_at and not child.killed:
                log.info("%s: process %d exited with %d (stopped)", self.name, pid, code)
                continue
            if code == BOOT_FAILED:
                if not any(c.superseded or c.state.ready for c in self._serving()):
                    log.error("%s: process %d failed to boot and no process serves; "
                              "stopping the pool", self.name, pid)
                    return BOOT_FAILED
                if self._boot_failed:  # another of the same reload
                    log.error("%s: process %d failed to boot too", self.name, pid)
                else:
                    self._abandon_reload(pid)
                continue
            if child.superseded and not child.killed:
                log.warning("%s: superseded process %d exited with %d", self.name, pid, code)
                continue  # its replacement holds the slot already
            self._crashed(child, code, now)

    def _crashed(self, child: _Child, code: int, now: float) -> None:
        if child.superseded or child.stopping_at or child.slot >= self.size:
            return  # killed while leaving: its replacement holds the slot, or none is due
        if any(c.slot == child.slot for c in self._current()):
            return
        slot = self._slots[child.slot]
        delay = slot.exited(now, now - child.started_at, crashed=bool(code or child.killed))
        why = child.killed or f"exited with {code}"
        if slot.crash_loop:
            log.error("%s: crash loop in slot %d: process %d %s, crash %d in a row; "
                      "next try in %.1fs", self.name, child.slot, child.pid, why,
                      slot.crashes, delay)
        else:
            log.log(logging.INFO if code == 0 and not child.killed else logging.ERROR,
                    "%s: process %d (slot %d) %s; respawn in %.1fs", self.name, child.pid,
                    child.slot, why, delay)

    def _abandon_reload(self, pid: int) -> None:
        """A new process cannot boot while others serve: keep those."""
        self._boot_failed = True
        now = time.monotonic()
        for child in self._current():
            if not child.state.ready:  # new ones, still booting: they would fail too
                self._terminate(child, now, "its reload was abandoned")
        keep = sorted(self._serving(), key=lambda c: c.started_at)
        log.error("%s: process %d failed to boot (broken app code?); keeping %d serving "
                  "processes and forking no more until the next SIGHUP", self.name, pid,
                  min(len(keep), self.size))
        for child in keep[self.size:]:  # more than size serving: keep the oldest
            self._terminate(child, now, "the pool has enough processes")
        taken: set[int] = set()
        for child in keep[:self.size]:  # the old ones are current again
            child.superseded = False
            if child.slot in taken or child.slot >= self.size:
                child.slot = min(set(range(self.size)) - taken)
            taken.add(child.slot)

    def _reload(self) -> None:
        serving = self._serving()
        log.info("%s: reloading: starting %d new processes, then stopping %d old ones",
                 self.name, self.size, len([c for c in serving if c.state.ready]))
        self._boot_failed = False
        now = time.monotonic()
        for child in serving:
            if not child.state.ready and not child.superseded:
                self._terminate(child, now, "a new reload started")  # not serving yet
            else:
                child.superseded = True
        for slot in self._slots:  # a deliberate reload starts without crash history
            slot.reset()

    def _resize(self, by: int) -> None:
        """`by`: +1 per SIGTTIN, -1 per SIGTTOU."""
        size = max(1, self.size + by)
        if size == self.size:
            return
        log.info("%s: %d processes -> %d", self.name, self.size, size)
        self.size = size
        self._slots = (self._slots + [Backoff() for _ in range(size)])[:size]
        now = time.monotonic()
        for child in self._current():
            if child.slot >= size:
                self._terminate(child, now, "the pool shrank")

    def _check(self, now: float) -> None:
        """Readiness, retire requests, timeouts and overdue stops."""
        for child in list(self._children.values()):
            state = child.state
            if child.killed:
                continue
            if child.stopping_at and now - child.stopping_at > self.graceful_timeout_s:
                self._kill(child, f"did not stop within {self.graceful_timeout_s:g}s")
                continue
            if self.timeout_s:
                stuck_s = state.stuck_for(now, child.started_at)
                if stuck_s > self.timeout_s:
                    what = "request" if state.oldest_s and now - state.oldest_s >= stuck_s \
                        else "main loop"
                    self._kill(child, f"timed out: {what} stuck for {stuck_s:.1f}s "
                                      f"(--timeout {self.timeout_s:g})")
                    continue
            if state.ready and not child.seen_ready:
                child.seen_ready = True
                log.info("%s: process %d (slot %d) is ready", self.name, child.pid, child.slot)
                self._announce_ready()
            if state.retire and not child.superseded and not child.stopping_at:
                if self._boot_failed:
                    if not child.retire_ignored:
                        child.retire_ignored = True
                        log.warning("%s: process %d reached its request limit; not replaced "
                                    "while new processes cannot boot", self.name, child.pid)
                    continue
                if self._leaving() >= self.size:
                    continue  # asked again at the next check; it serves meanwhile
                child.superseded = True
                log.info("%s: process %d (slot %d) asks to be replaced (its request limit "
                         "of %d, or a broker's drain): replacing it",
                         self.name, child.pid, child.slot, state.max_requests)

    def _leaving(self) -> int:
        """Processes on their way out: superseded, stopping, or killed."""
        return sum(1 for c in self._children.values()
                   if c.superseded or c.stopping_at or c.killed)

    def _announce_ready(self) -> None:
        if self.on_ready is not None and sum(c.seen_ready for c in self._current()) >= self.size:
            on_ready, self.on_ready = self.on_ready, None
            on_ready()

    def _fill_slots(self, now: float) -> None:
        if self._boot_failed:
            return
        taken = {c.slot for c in self._current()}
        for index, slot in enumerate(self._slots):
            if index not in taken and slot.due(now):
                self._spawn(index)

    def _retire_superseded(self, now: float) -> None:
        ready = sum(1 for c in self._current() if c.seen_ready)  # as _check logged it
        old = sorted((c for c in self._serving() if c.superseded), key=lambda c: c.started_at)
        for child in old[:max(0, ready + len(old) - self.size)]:
            self._terminate(child, now, "its replacement is ready")

    def _next_wake(self, now: float) -> float:
        wake = now + CHECK_EVERY_S
        if not self._boot_failed:
            taken = {c.slot for c in self._current()}
            for index, slot in enumerate(self._slots):
                if index not in taken:
                    wake = min(wake, slot.retry_at)
        return max(wake, now + 0.01)

    def _terminate(self, child: _Child, now: float, why: str) -> None:
        child.stopping_at = now
        log.info("%s: stopping process %d (slot %d): %s", self.name, child.pid, child.slot, why)
        _kill(child.pid, signal.SIGTERM)

    def _kill(self, child: _Child, why: str) -> None:
        child.killed = why
        log.error("%s: killing process %d (slot %d): %s", self.name, child.pid, child.slot, why)
        _kill(child.pid, signal.SIGKILL)

    def _stop_all(self) -> None:
        loop = self._loop
        assert loop is not None
        live = set(self._children)
        log.info("%s: stopping %d processes (graceful timeout %gs)", self.name, len(live),
                 self.graceful_timeout_s)
        for pid in live:
            _kill(pid, signal.SIGTERM)
        if not loop.stop.stopping:  # halted: a SIGTERM from now on forces
            loop.stop.request(force=False)
        loop.stop.begin(time.monotonic(), self.graceful_timeout_s)
        forced = False
        while live:
            if not forced and loop.stop.overdue(time.monotonic()):
                log.warning("%s: %s: killing %d processes", self.name,
                            "forced stop" if loop.stop.forced else "graceful timeout",
                            len(live))
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
                loop.wait(0.05 if forced else 0.2)
        for child in self._children.values():
            child.state.close()
        self._children.clear()


def _kill(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass
