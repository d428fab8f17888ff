"""The loop helper (scale0/pool/runloop.py): wake-up fd, counted signals, stop/force."""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Iterator

import pytest
import zmq

from scale0.pool.runloop import RunLoop, Stop, Wakeup


@pytest.fixture
def loop() -> Iterator[RunLoop]:
    loop = RunLoop()
    try:
        yield loop
    finally:
        loop.close()


# ---- Stop: pure ------------------------------------------------------------

def test_the_first_request_is_graceful_the_second_forces() -> None:
    stop = Stop()
    assert not stop.stopping and not stop.overdue(0.0) and not stop.begin(0.0, 5.0)
    stop.request()
    assert stop.stopping and not stop.forced
    stop.request()
    assert stop.forced and stop.overdue(0.0)


def test_the_grace_period_begins_once_and_then_forces() -> None:
    stop = Stop()
    stop.request()
    assert stop.begin(10.0, 5.0)
    assert not stop.begin(11.0, 5.0)  # once: the deadline stays
    assert stop.deadline == 15.0
    assert not stop.overdue(14.9) and stop.overdue(15.0)
    assert not stop.forced  # overdue by time, not forced by a request


def test_an_explicit_force_is_taken_as_asked() -> None:
    stop = Stop()
    stop.request(force=False)
    stop.request(force=False)  # a repeated graceful shutdown stays graceful
    assert stop.stopping and not stop.forced
    stop.request(force=True)
    assert stop.forced
    stop.request(force=False)  # never un-forced
    assert stop.forced
    first = Stop()
    first.request(force=True)
    assert first.forced


# ---- Wakeup and RunLoop: fds and signals ------------------------------------

def test_a_wake_ends_the_wait_and_is_drained() -> None:
    wakeup = Wakeup()
    try:
        assert not wakeup.wait(0.0)
        for _ in range(100_000):  # far past the pipe's buffer: never blocks, never raises
            wakeup.wake()
        assert wakeup.wait(5.0)
        assert not wakeup.wait(0.0)  # drained
        os.write(wakeup.write_fd, b"x")  # e.g. a forked child's byte
        assert wakeup.wait(5.0)
    finally:
        wakeup.close()
    wakeup.wake()  # closed: dropped, not raised
    wakeup.drain()


def test_request_stop_from_a_thread_wakes_a_zmq_poller(loop: RunLoop) -> None:
    poller = zmq.Poller()
    poller.register(loop.fileno(), zmq.POLLIN)
    assert poller.poll(0) == []
    threading.Thread(target=loop.request_stop).start()
    events = poller.poll(10_000)
    assert events == [(loop.fileno(), zmq.POLLIN)]
    assert loop.stop.stopping and not loop.stop.forced
    loop.drain()
    assert poller.poll(0) == []


def test_signals_count_and_wake_and_stop(loop: RunLoop) -> None:
    before = signal.getsignal(signal.SIGHUP), signal.getsignal(signal.SIGTERM)
    loop.install_signals(count=(signal.SIGHUP, signal.SIGUSR1))
    try:
        os.kill(os.getpid(), signal.SIGHUP)
        os.kill(os.getpid(), signal.SIGHUP)
        assert loop.wait(10.0)
        assert loop.take(signal.SIGHUP) == 2
        assert loop.take(signal.SIGHUP) == 0  # taken
        assert loop.take(signal.SIGUSR1) == 0
        assert not loop.stop.stopping
        os.kill(os.getpid(), signal.SIGTERM)  # graceful
        assert loop.wait(10.0)
        assert loop.stop.stopping and not loop.stop.forced
        os.kill(os.getpid(), signal.SIGINT)  # a second stop signal forces
        assert loop.wait(10.0)
        assert loop.stop.forced
    finally:
        loop.restore_signals()
    assert (signal.getsignal(signal.SIGHUP), signal.getsignal(signal.SIGTERM)) == before
    assert signal.set_wakeup_fd(-1) == -1  # the previous wake-up fd (none) is back


def test_count_stands_in_for_a_signal(loop: RunLoop) -> None:
    loop.count(signal.SIGTTIN, 3)
    assert loop.wait(10.0)
    assert loop.take(signal.SIGTTIN) == 3


def test_signals_are_installed_from_the_main_thread_only(loop: RunLoop) -> None:
    errors: list[BaseException] = []

    def install() -> None:
        try:
            loop.install_signals()
        except RuntimeError as exc:
            errors.append(exc)

    thread = threading.Thread(target=install)
    thread.start()
    thread.join(10)
    assert len(errors) == 1
    assert signal.getsignal(signal.SIGTERM) != loop._on_stop  # nothing was installed
