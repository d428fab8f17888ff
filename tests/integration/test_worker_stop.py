"""Stopping the WSGI worker through the loop helper (pool/runloop.py): the
first stop drains, a second one (a second SIGTERM) forces, against the fake
broker of test_worker."""

from __future__ import annotations

import threading

from scale0.wire import s0w1 as p
from scale0.worker.process import ReplyStream, Worker, WorkerSettings
from tests.integration.test_worker import RESPONSE, Cmd, FakeBroker, broker, request_message

__all__ = ["broker"]  # the fixture


def test_a_second_stop_forces_while_the_app_still_runs(broker: FakeBroker) -> None:
    entered, release = threading.Event(), threading.Event()
    cancelled: list[bool] = []

    def slow(event: object, script_name: str, path_info: str, stream: ReplyStream) -> bool:
        entered.set()
        release.wait(30)
        cancelled.append(stream.cancelled)
        stream.last(RESPONSE, False)  # raises Cancelled: the loop was closed under it
        return False

    # A graceful stop would wait 60 s for the app: only a forced one ends first.
    settings = WorkerSettings(connect=(broker.endpoint,), services=(p.ServiceSpec("svc"),),
                              capacity=1, graceful_timeout_s=60.0, label="test")
    worker = Worker(slow, settings)
    code: list[int] = []
    thread = threading.Thread(target=lambda: code.append(worker.run()))
    thread.start()
    try:
        ident = broker.recv_command(Cmd.HELLO)[0]
        broker.welcome(ident)
        broker.send(ident, Cmd.REQUEST, p.encode_request_id(3), b"svc", b"",
                    request_message(3))
        assert entered.wait(10)
        worker.stop(None)  # as the first SIGTERM: drain (the loop's DRAIN waits for the app)
        assert worker.stopping and not worker.runloop.stop.forced and thread.is_alive()
        worker.stop(None)  # the second: forced
        assert broker.recv_command(Cmd.BYE)[0] == ident
        thread.join(10)
        assert not thread.is_alive() and code == [0]
        assert not release.is_set()  # it left while the app was still inside
    finally:
        release.set()
        thread.join(10)
        for loop in worker.loops:
            loop.thread.join(10)
    assert cancelled == [True]
    worker.ctx.term()  # the loop is out of the app now: every socket is closed


def test_repeated_programmatic_stops_stay_graceful(broker: FakeBroker) -> None:
    """stop() (a broker's DRAIN without an arbiter, twice) never forces."""
    settings = WorkerSettings(connect=(broker.endpoint,), services=(p.ServiceSpec("svc"),),
                              label="test")
    worker = Worker(lambda *_: False, settings)
    thread = threading.Thread(target=worker.run)
    thread.start()
    try:
        broker.welcome(broker.recv_command(Cmd.HELLO)[0])
        worker.stop()
        worker.stop()
        assert worker.stopping and not worker.runloop.stop.forced
    finally:
        worker.stop(True)
        thread.join(10)
    assert not thread.is_alive()
