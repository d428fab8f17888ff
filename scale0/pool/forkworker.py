"""Forking one worker process of a pool (pool/supervise.py): the arbiter's
side returns the child's pid; the child's side resets what it inherited from
the arbiter, runs the target and exits with its code, never returning.

Invariants: a signal meant for the arbiter never runs the arbiter's handlers
in the child (they are blocked across the fork and reset before the child
unblocks them); the child gets SIGTERM when the arbiter dies, even by
SIGKILL; and, given the caller's lists, the child keeps no descriptor or
sibling ChildState it was told to close (supervise.Pool passes its wake-up
pipe's read end and every other child's state).
"""

from __future__ import annotations

import logging
import os
import signal
from collections.abc import Callable, Iterable

from scale0.pool.childstate import ChildState, set_current
from scale0.pool.lifeline import die_with_parent

log = logging.getLogger(__name__)

# What the arbiter handles itself; a forked child resets them before anything else.
ARBITER_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGCHLD,
                   signal.SIGTTIN, signal.SIGTTOU)


def fork_worker(target: Callable[[], int], state: ChildState, *, name: str,
                close_fds: Iterable[int], close_states: Iterable[ChildState]) -> int:
    """Fork a child that runs `target()` with `state` as its ChildState; the
    child closes `close_fds` and `close_states` (those of the arbiter's other
    children). Returns the child's pid (in the arbiter)."""
    arbiter = os.getpid()
    # Blocked across the fork: a SIGTERM sent to a child that has just been
    # forked (a second SIGHUP stops the processes of the reload it cuts
    # short) must not reach the arbiter's handlers, still installed in the
    # child until it resets them; it would only set a flag in the child's
    # copy of the arbiter, and the child would run on, deaf to that stop.
    mask = signal.pthread_sigmask(signal.SIG_BLOCK, ARBITER_SIGNALS)
    pid = os.fork()
    if pid == 0:  # child: default signals, run, never return into the arbiter
        code = 1
        try:
            signal.set_wakeup_fd(-1)
            for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGCHLD, signal.SIGTTIN,
                        signal.SIGTTOU):
                signal.signal(sig, signal.SIG_DFL)
            signal.signal(signal.SIGHUP, signal.SIG_IGN)  # HUP is the arbiter's
            signal.pthread_sigmask(signal.SIG_SETMASK, mask)  # a pending TERM acts now
            # After the defaults: SIGTERM (the graceful stop) if the arbiter
            # dies, even by SIGKILL, or exit now if it already has.
            die_with_parent(arbiter)
            for fd in close_fds:
                os.close(fd)
            for other in close_states:
                other.close()
            set_current(state)
            code = target()
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 1
        except BaseException:
            log.exception("%s worker process crashed", name)
        finally:
            os._exit(code)
    signal.pthread_sigmask(signal.SIG_SETMASK, mask)
    return pid
