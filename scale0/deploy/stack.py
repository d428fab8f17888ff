"""`scale0 up`: start and watch Mongrel2, brokers and worker pools from one TOML file.

Each process runs in its own session, so a Ctrl-C at the terminal reaches
only this supervisor, which then stops everything in order: worker pools
first (SIGTERM: they finish what they have while brokers and Mongrel2 still
deliver their replies), then brokers, then relays, then Mongrel2; SIGKILL
after the grace period. A second SIGINT/SIGTERM forces the stop: SIGKILL to
every process group (a pool's forked workers too), at once. If this
supervisor itself dies (even by SIGKILL), every child gets SIGTERM from the
kernel (pool/lifeline.py: PR_SET_PDEATHSIG; Mongrel2 as root through the lifeline
watcher) and stops. SIGHUP reloads every worker pool (forwarded to each
pool's arbiter, which starts new processes and then retires the old ones,
pool/supervise.py) and the authorized keys of every broker and relay (forwarded
to them); they and Mongrel2 keep running.

A process that dies is restarted on the crash-loop policy of the worker
pools (core/backoff.py): a delay that doubles per quick crash, with jitter,
up to a cap; quick crashes in a row are logged as a crash loop. The pid file
never outlives the stack. Signal handlers only count (pool/runloop.py); the
loop sleeps on the wake-up pipe, which SIGCHLD (a child exited) and the stop
and reload signals write to, or until the next restart is due.

READY: `scale0 up` prints its READY line once every process it started is
ready, each by its own signal: Mongrel2 accepts TCP on its HTTP address, and
each relay, broker and pool has printed its READY line (read from its stdout,
which is a pipe to us, at each turn of the loop; what else it prints there is
passed on to our stdout, and its READY line is logged instead). A pool's
READY means its processes are WELCOMEd by their brokers (pool/supervise.py),
so the stack's READY means requests are served. It is printed once; a
process that is never ready (an app that cannot boot) means no READY, and a
warning after NOT_READY_AFTER_S names what is waited for.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import subprocess
import sys
import time
import tomllib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from scale0.deploy.m2server import (
    Mongrel2Error,
    Mongrel2Server,
    raise_open_files_limit,
)
from scale0.deploy.stack_file import StackError, StackProc, read_stack
from scale0.pool import lifeline
from scale0.pool.runloop import RunLoop

log = logging.getLogger(__name__)

CHECK_EVERY_S = 1.0  # the loop's longest sleep (child exits and signals wake it sooner)
READY_POLL_S = 0.1  # until every process is ready: how often to look
NOT_READY_AFTER_S = 30.0  # then say which processes the READY line waits for


@dataclass(slots=True)
class Stack:
    mongrel2: Mongrel2Server
    http_addr: tuple[str, int]
    procs: list[StackProc] = field(default_factory=list)
    graceful_timeout_s: float = 30.0
    _loop: RunLoop | None = None  # made in run(): wake-up pipe, signal counts, stop

    @classmethod
    def from_file(cls, path: str | Path) -> Stack:
        path = Path(path)
        try:
            data = tomllib.loads(path.read_text())
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise StackError(f"{path}: {exc}") from exc
        base = path.resolve().parent
        return cls.from_dict(data, base, str(path))

    @classmethod
    def from_dict(cls, data: dict[str, Any], base: Path, source: str = "<config>") -> Stack:
        """The stack a parsed stack file describes (deploy/stack_file.py)."""
        plan = read_stack(data, base, source)
        return cls(plan.mongrel2, plan.http_addr, plan.procs,
                   graceful_timeout_s=plan.graceful_timeout_s)

    def run(self, ready: Callable[[str], None]) -> int:
        raise_open_files_limit()  # inherited by Mongrel2: one descriptor per client connection
        try:
            self.mongrel2.prepare()
        except Mongrel2Error as exc:
            log.error("%s", exc)
            return 2
        loop = self._loop = RunLoop()
        loop.install_signals(count=(signal.SIGHUP, signal.SIGCHLD))
        announced = False
        started = time.monotonic()
        waited_long = False
        try:
            while not loop.stop.stopping:
                now = time.monotonic()
                loop.take(signal.SIGCHLD)  # it only woke us: _watch polls every process
                if loop.take(signal.SIGHUP):
                    self._reload()
                for proc in self.procs:
                    self._read_stdout(proc)
                    self._watch(proc, now)
                if not announced:
                    waiting = self._not_ready()
                    if not waiting:
                        announced = True
                        ready(f"READY up http://{self.http_addr[0]}:{self.http_addr[1]}/")
                    elif not waited_long and now - started > NOT_READY_AFTER_S:
                        waited_long = True
                        log.warning("not ready after %.0fs: waiting for %s",
                                    NOT_READY_AFTER_S, ", ".join(waiting))
                wake = min((p.backoff.retry_at for p in self.procs if p.popen is None),
                           default=now + CHECK_EVERY_S)
                wake = min(wake, now + (CHECK_EVERY_S if announced else READY_POLL_S))
                loop.wait(wake - time.monotonic())
        finally:
            self._stop_all()
            self.mongrel2.remove_pid_file()
            loop.close()
        return 0

    def _not_ready(self) -> list[str]:
        """The processes not ready yet (Mongrel2: until it accepts TCP)."""
        for proc in self.procs:
            if not proc.ready_prefix and not proc.ready and proc.popen is not None:
                proc.ready = _accepts(self.http_addr)
        return [proc.name for proc in self.procs if not proc.ready]

    def _read_stdout(self, proc: StackProc) -> None:
        """Take the READY line out of what `proc` printed; pass the rest on."""
        pipe = proc.popen.stdout if proc.popen is not None else None
        if pipe is None:
            return
        while True:
            try:
                chunk = os.read(pipe.fileno(), 65536)
            except BlockingIOError:
                break
            except OSError:
                chunk = b""
            if not chunk:
                break
            proc.out += chunk
        *lines, proc.out = proc.out.split(b"\n")
        for line in lines:
            if proc.ready_prefix and line.startswith(proc.ready_prefix) and not proc.ready:
                proc.ready = True
                log.info("%s is ready: %s", proc.name, line.decode(errors="replace"))
            else:
                with contextlib.suppress(OSError, ValueError):  # our stdout is gone
                    sys.stdout.buffer.write(line + b"\n")
                    sys.stdout.flush()

    def _reload(self) -> None:
        """SIGHUP to each pool's arbiter (not its group: its workers ignore HUP,
        and a signal to the group would reach them too), and to each broker
        and relay: they re-read their authorized keys (auth/zap.py) and go on.
        Never to Mongrel2."""
        for proc in self.procs:
            if proc.name != "mongrel2" and proc.popen is not None \
                    and proc.popen.poll() is None:
                log.info("reloading %s (SIGHUP to pid %d)", proc.name, proc.popen.pid)
                proc.popen.send_signal(signal.SIGHUP)

    def _watch(self, proc: StackProc, now: float) -> None:
        if proc.popen is not None:
            code = proc.popen.poll()
            if code is None:
                return
            self._read_stdout(proc)  # what it printed before it exited
            if proc.popen.stdout is not None:
                proc.popen.stdout.close()
            proc.popen, proc.ready, proc.out = None, False, b""
            _kill_group(proc.pid)  # what it left behind, e.g. a dead pool's workers
            # Every exit here is unexpected (we stop nothing while running): a crash.
            backoff = proc.backoff
            delay = backoff.exited(now, now - proc.started_at)
            if backoff.crash_loop:
                log.error("%s: crash loop: exited with %s, crash %d in a row, each within "
                          "%.0fs of its start; restarting in %.1fs", proc.name, code,
                          backoff.crashes, backoff.policy.healthy_s, delay)
            else:
                log.error("%s exited with %s; restarting in %.1fs", proc.name, code, delay)
            if proc.name == "mongrel2":
                self.mongrel2.remove_pid_file()
            return
        if proc.backoff.due(now):
            # Its own session (a terminal's Ctrl-C reaches only us), and SIGTERM
            # when we die, even by SIGKILL (pool/lifeline.py).
            proc.popen = subprocess.Popen(proc.argv, cwd=proc.cwd, start_new_session=True,
                                          preexec_fn=lifeline.preexec(),
                                          stdout=subprocess.PIPE if proc.ready_prefix else None)
            if proc.popen.stdout is not None:
                os.set_blocking(proc.popen.stdout.fileno(), False)
            proc.pid = proc.popen.pid
            proc.started_at = now
            log.info("started %s (pid %d)", proc.name, proc.popen.pid)

    def _stop_all(self) -> None:
        # Pools first: they finish in-flight requests while brokers and Mongrel2
        # still carry the replies; then brokers (each hands its link back to
        # the relay); then relays; Mongrel2 last. Each process group is
        # SIGKILLed after the grace period, or at once on a second signal, so
        # nothing a process forked outlives the stack.
        loop = self._loop
        assert loop is not None
        if not loop.stop.stopping:  # an exception ended the loop: a signal from now on forces
            loop.stop.request(force=False)
        for order in (0, 1, 2, 3):
            group = [proc for proc in self.procs if proc.stop_order == order]
            for proc in group:
                if proc.popen is not None and proc.popen.poll() is None:
                    proc.popen.send_signal(proc.stop_signal)
            deadline = time.monotonic() + self.graceful_timeout_s
            while any(p.popen is not None and p.popen.poll() is None for p in group):
                now = time.monotonic()
                if loop.stop.forced or now >= deadline:
                    break
                for proc in self.procs:  # a full pipe would stall a stopping process
                    self._read_stdout(proc)
                # A child's exit (SIGCHLD) or a signal wakes us; its output at least each second.
                loop.wait(min(deadline - now, CHECK_EVERY_S))
            for proc in group:
                if proc.popen is None:
                    continue
                if proc.popen.poll() is None:
                    log.warning("%s: %s: killing it", proc.name, "forced stop"
                                if loop.stop.forced else "did not stop in time")
                _kill_group(proc.pid)
                proc.popen.wait()
                if proc.popen.stdout is not None:
                    proc.popen.stdout.close()
                proc.popen = None


def exit_with_parent() -> None:
    """Get SIGTERM when the parent dies (Linux PR_SET_PDEATHSIG), e.g. when the
    `make` that started us is killed: make does not forward signals."""
    if not lifeline.supported():
        log.warning("--exit-with-parent is not supported here")
        return
    parent = os.getppid()
    if parent == 1:  # the parent died before we could ask
        os.kill(os.getpid(), signal.SIGTERM)
        return
    lifeline.die_with_parent(parent)


def _kill_group(pgid: int) -> None:
    """SIGKILL a process group (each process runs in its own session: pgid = pid)."""
    if pgid > 0:
        try:
            os.killpg(pgid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass


def _accepts(addr: tuple[str, int]) -> bool:
    try:
        with socket.create_connection(addr, timeout=0.2):
            return True
    except OSError:
        return False
