"""scale0.pool.forkworker: real forks; each test reaps the child it forks."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable, Iterator

import pytest

from scale0.pool import childstate
from scale0.pool.childstate import ChildState
from scale0.pool.forkworker import fork_worker

WAIT_S = 10.0


def reap(pid: int) -> int:
    """The child's exit code (negative: killed by that signal), within WAIT_S."""
    deadline = time.monotonic() + WAIT_S
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        time.sleep(0.01)
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    raise AssertionError(f"child {pid} did not exit within {WAIT_S}s")


@pytest.fixture
def state() -> Iterator[ChildState]:
    made = ChildState(max_requests=7)
    yield made
    made.close()


def fork(target: Callable[[], int], state: ChildState, **kw: object) -> int:
    args: dict[str, object] = {"name": "test", "close_fds": (), "close_states": ()}
    args.update(kw)
    return fork_worker(target, state, **args)  # type: ignore[arg-type]


def test_the_child_exits_with_what_its_target_returns(state: ChildState) -> None:
    assert reap(fork(lambda: 7, state)) == 7


def test_system_exit_gives_its_code_and_a_crash_gives_1(state: ChildState) -> None:
    def exits() -> int:
        raise SystemExit(5)

    def crashes() -> int:
        raise RuntimeError("boom")

    def exits_with_text() -> int:
        raise SystemExit("bye")

    assert reap(fork(exits, state)) == 5
    assert reap(fork(crashes, state)) == 1
    assert reap(fork(exits_with_text, state)) == 1


def test_the_child_sees_its_own_state_as_current(state: ChildState) -> None:
    def target() -> int:
        current = childstate.current()
        return 0 if current is state and current.max_requests == 7 else 3

    assert childstate.current() is not state  # only in the child
    assert reap(fork(target, state)) == 0


def test_the_child_closes_what_it_is_told_to(state: ChildState) -> None:
    read_fd, write_fd = os.pipe()
    sibling = ChildState()
    try:
        def target() -> int:
            try:
                os.fstat(read_fd)
            except OSError:
                pass
            else:
                return 3  # the pipe's end is still open in the child
            try:
                sibling.beat(1.0, 0.0)
            except (ValueError, TypeError):
                return 0  # released: the child no longer maps the sibling's state
            return 4

        assert reap(fork(target, state, close_fds=(read_fd,), close_states=(sibling,))) == 0
        os.fstat(read_fd)  # the arbiter's stays open
    finally:
        os.close(read_fd)
        os.close(write_fd)
        sibling.close()


def test_the_arbiters_signal_handlers_do_not_run_in_the_child(state: ChildState) -> None:
    seen: list[int] = []
    old = signal.signal(signal.SIGTERM, lambda sig, _frame: seen.append(sig))
    ready_r, ready_w = os.pipe()
    try:
        def target() -> int:
            os.write(ready_w, b"x")
            time.sleep(WAIT_S)  # SIGTERM must end this, by its default action
            return 0

        pid = fork(target, state)
        assert os.read(ready_r, 1) == b"x"
        os.kill(pid, signal.SIGTERM)
        assert reap(pid) == -signal.SIGTERM
        assert seen == []  # and the arbiter's own handler saw nothing either
        assert signal.pthread_sigmask(signal.SIG_BLOCK, []) == set()  # mask restored
    finally:
        signal.signal(signal.SIGTERM, old)
        os.close(ready_r)
        os.close(ready_w)


def test_a_stop_sent_right_after_the_fork_stops_the_child(
        state: ChildState, monkeypatch: pytest.MonkeyPatch) -> None:
    """A SIGTERM that arrives while the child still has the arbiter's handlers
    (before its first step) waits, blocked, until they are reset: it then
    stops the child, instead of only setting a flag in its copy of the arbiter."""
    arbiter = os.getpid()
    seen: list[int] = []
    old = signal.signal(signal.SIGTERM, lambda sig, _frame: seen.append(sig))
    first_step = signal.set_wakeup_fd

    def term_then_step(fd: int, **kw: bool) -> int:
        if os.getpid() != arbiter:  # in the child: the stop comes before anything is reset
            os.kill(os.getpid(), signal.SIGTERM)
        return first_step(fd, **kw)

    monkeypatch.setattr(signal, "set_wakeup_fd", term_then_step)
    try:
        pid = fork(lambda: 0, state)  # would exit 0 if its handler had swallowed the stop
        assert reap(pid) == -signal.SIGTERM
        assert seen == []
    finally:
        signal.signal(signal.SIGTERM, old)

