"""ChildState: the shared-memory report a worker process gives its arbiter.
(The request age leaving out time blocked on credits: tests/unit/test_reply.py.)"""

from __future__ import annotations

import os

from scale0.pool.childstate import ChildState


def test_writes_in_a_forked_child_are_seen_by_the_parent() -> None:
    r, w = os.pipe()
    state = ChildState(max_requests=25, wake_fd=w)
    try:
        pid = os.fork()
        if pid == 0:  # the child: report, then leave without running any cleanup
            code = 0 if state.max_requests == 25 else 1
            state.beat(123.5, 100.25)
            state.set_ready()
            state.ask_retire()
            os._exit(code)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        assert (state.alive_s, state.oldest_s, state.ready, state.retire) == (
            123.5, 100.25, True, True)
        assert os.read(r, 16) == b"cc"  # one wake-up byte each for ready and retire
    finally:
        state.close()
        os.close(r)
        os.close(w)


def test_ready_and_retire_wake_the_arbiter_once() -> None:
    r, w = os.pipe()
    os.set_blocking(r, False)
    state = ChildState(wake_fd=w)
    try:
        for _ in range(3):
            state.set_ready()
            state.ask_retire()
        assert os.read(r, 16) == b"cc"
    finally:
        state.close()
        os.close(r)
        os.close(w)


def test_a_full_or_missing_wake_pipe_is_not_an_error() -> None:
    state = ChildState(wake_fd=-1)
    state.set_ready()
    assert state.ready
    state.close()


def test_stuck_for_counts_boot_silence_and_the_oldest_request() -> None:
    state = ChildState()
    try:
        assert state.stuck_for(now=105.0, started_at=100.0) == 5.0  # booting, no beat yet
        state.beat(110.0, 0.0)
        assert state.stuck_for(now=111.0, started_at=100.0) == 1.0  # idle, loop alive
        state.beat(120.0, 112.0)
        assert state.stuck_for(now=120.5, started_at=100.0) == 8.5  # request is older
        assert state.stuck_for(now=140.0, started_at=100.0) == 28.0  # both; the longer
    finally:
        state.close()
