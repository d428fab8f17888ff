"""Children that die with their supervisor (Linux PR_SET_PDEATHSIG).

Every process `scale0 up` starts, and every process a worker pool forks,
asks the kernel for a signal (SIGTERM: the graceful stop) when its parent
dies, so a supervisor killed with SIGKILL leaves no orphan holding a port.

Two facts of prctl(2) shape this module:

* The request is made in the child, after fork and before exec, and the
  parent may already be gone by then: `die_with_parent` checks
  ``os.getppid()`` against the parent's pid (read before the fork) right
  after the prctl and exits if it changed.
* The kernel clears the death signal when the process changes its effective
  or filesystem uid or gid, or execs a set-uid binary. Mongrel2 started as
  root chroots and drops to the owner of its directory, so it cannot keep
  one: as root it runs under `python -m scale0.pool.lifeline -- ARGV`, a small
  watcher that keeps root's death signal, forks and execs ARGV, forwards
  SIGINT, SIGTERM and SIGHUP to it, exits with its status, and when its own
  parent dies sends ARGV SIGTERM, then SIGKILL after KILL_AFTER_S.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
from collections.abc import Callable
from functools import partial

PR_SET_PDEATHSIG = 1
KILL_AFTER_S = 5  # the watcher's grace for its child once the supervisor is gone


def _prctl() -> Callable[..., int] | None:
    try:
        fn: Callable[..., int] = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):  # not Linux
        return None
    return fn


_PRCTL = _prctl()  # resolved once, in the parent: the child between fork and exec only calls it


def supported() -> bool:
    return _PRCTL is not None


def die_with_parent(parent: int, sig: int = signal.SIGTERM) -> None:
    """In a child of `parent` (its pid, read before the fork): get `sig` when
    the parent dies; exit at once if it already has. A no-op where prctl is
    missing (not Linux)."""
    if _PRCTL is None:
        return
    _PRCTL(PR_SET_PDEATHSIG, int(sig), 0, 0, 0)
    if os.getppid() != parent:  # it died before the prctl: the signal will never come
        os._exit(1)


def preexec(sig: int = signal.SIGTERM) -> Callable[[], None]:
    """A `subprocess.Popen(preexec_fn=...)` making the child die with this process."""
    return partial(die_with_parent, os.getpid(), sig)


def watcher_argv(argv: list[str]) -> list[str]:
    """`argv` run under the watcher (for a program that changes its uid)."""
    return [sys.executable, "-m", "scale0.pool.lifeline", "--", *argv]


def watch(argv: list[str]) -> int:
    """The watcher: run `argv` as a child, forward signals, exit with its
    status; once our parent is gone, stop the child (TERM, then KILL)."""
    parent = os.getppid()
    die_with_parent(parent)
    orphaned = False
    child = 0

    def on_signal(sig: int, _frame: object) -> None:
        nonlocal orphaned
        if sig == signal.SIGALRM:
            os.kill(child, signal.SIGKILL)
            return
        if not orphaned and os.getppid() != parent:
            orphaned = True
            signal.alarm(KILL_AFTER_S)
        os.kill(child, sig)

    signals = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGALRM)
    # Blocked until the handlers are in: a signal in between waits, is not lost.
    signal.pthread_sigmask(signal.SIG_BLOCK, signals)
    child = os.fork()
    if child == 0:
        try:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, signals)  # exec keeps the mask
            os.execvp(argv[0], argv)
        except OSError as exc:
            print(f"scale0.pool.lifeline: cannot run {argv[0]}: {exc}", file=sys.stderr)
        finally:
            os._exit(127)
    for sig in signals:
        signal.signal(sig, on_signal)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, signals)
    while True:
        try:
            _, status = os.waitpid(child, 0)
        except InterruptedError:  # pragma: no cover - PEP 475 retries
            continue
        code = os.waitstatus_to_exitcode(status)
        return code if code >= 0 else 128 - code  # killed by a signal: 128 + its number


if __name__ == "__main__":
    args = sys.argv[1:]
    if args[:1] == ["--"]:
        args = args[1:]
    if not args:
        sys.exit("usage: python -m scale0.pool.lifeline -- PROGRAM [ARG...]")
    sys.exit(watch(args))
