"""`scale0 wsgi --threads T`: T loops per process, each a worker of capacity 1
that runs the app on its own thread (scale0/worker/loop.py), on the real stack."""

from __future__ import annotations

import concurrent.futures
import socket

import requests

from .conftest import Stack, wait_for
from .e2e_apps import BIG, HUGE
from .test_control import status


def _labels(control: str) -> set[str]:
    return {w["label"] for w in status(control)["workers"]}


def test_each_thread_is_a_worker_of_capacity_one(fresh_stack: Stack, control: str) -> None:
    s = fresh_stack
    s.start_mongrel2()
    s.start_broker("--control", control)
    s.start_pool("e2e_apps:app", service="app", routes=("/",), processes=1, threads=3)
    s.wait_ok("/")
    workers = wait_for(lambda: (ws := status(control)["workers"]) and len(ws) == 3 and ws,
                       what="three workers")
    pid = requests.get(s.url("/pid"), timeout=10).json()["pid"]
    host = socket.gethostname()
    assert sorted(w["label"] for w in workers) == [f"{host}:{pid}/{k}" for k in range(3)]
    assert {w["capacity"] for w in workers} == {1}


def test_a_long_request_is_not_expired_and_the_other_loops_serve(
        fresh_stack: Stack, control: str) -> None:
    """Broker and workers at 0.2 s x 3: a silent loop is expired after 0.6 s;
    the request sleeps 4 s in the app of a loop of capacity 1, whose
    heartbeats the process's heartbeat thread sends meanwhile."""
    s = fresh_stack
    marks = s.marks
    s.start_mongrel2()
    s.start_broker("--control", control, "--heartbeat", "0.2")
    s.start_pool("e2e_apps:app", "--heartbeat", "0.2", service="app", routes=("/",),
                 processes=1, threads=2, env={"E2E_MARK_DIR": str(marks)})
    s.wait_ok("/")
    labels = wait_for(lambda: len(ls := _labels(control)) == 2 and ls, what="two workers")
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        slow = pool.submit(requests.get, s.url("/sleep?4"), timeout=30)
        wait_for(lambda: list(marks.iterdir()), what="the slow request at the app")
        served = 0
        while not slow.done():  # bounded by the request's own 4 s (and its timeout)
            r = requests.get(s.url("/"), timeout=10)
            assert (r.status_code, r.text) == (200, "e2e hello\n")
            served += 1
            assert _labels(control) == labels  # neither loop expired or re-registered
        r = slow.result()
    assert r.status_code == 200 and r.json() == {"slept": 4.0}
    assert served > 0
    assert _labels(control) == labels


def test_threads_run_slow_requests_at_once(fresh_stack: Stack) -> None:
    s = fresh_stack
    marks = s.marks
    s.start_mongrel2()
    s.start_broker()
    s.start_pool("e2e_apps:app", service="app", routes=("/",), processes=1, threads=3,
                 env={"E2E_MARK_DIR": str(marks)})
    s.wait_ok("/")
    with concurrent.futures.ThreadPoolExecutor(3) as pool:
        slow = [pool.submit(requests.get, s.url("/sleep?5"), timeout=30) for _ in range(3)]
        # One after the other, the third would reach the app only after 10 s,
        # when the first two have answered.
        wait_for(lambda: len(list(marks.iterdir())) == 3, 15, "three requests at the app")
        assert not any(f.done() for f in slow)
        assert [f.result().json() for f in slow] == [{"slept": 5.0}] * 3
    assert len({mark.name.split("-")[1] for mark in marks.iterdir()}) == 1  # one process


def test_concurrent_downloads_over_the_credit_window_complete(fresh_stack: Stack) -> None:
    """Mongrel2 runs with download.flow_control (tests/mongrel2_helpers.py config_text): each
    loop waits for its own request's credits on its own socket."""
    s = fresh_stack
    s.start_mongrel2()
    s.start_broker()
    s.start_pool("e2e_apps:app", service="app", routes=("/",), processes=1, threads=2)
    s.wait_ok("/")
    with concurrent.futures.ThreadPoolExecutor(3) as pool:
        downloads = [pool.submit(requests.get, s.url("/big"), timeout=60) for _ in range(3)]
        got = [f.result() for f in downloads]
    block = bytes(range(256)) * 256
    for r in got:
        assert r.status_code == 200 and len(r.content) == BIG
        assert r.content == block * (BIG // len(block))


def test_cancel_reaches_a_request_waiting_for_credits(fresh_stack: Stack) -> None:
    """A client that reads nothing of a 256 MiB response leaves the app's
    request waiting for credits; its disconnect must free the only loop, long
    before the broker's 60 s request timeout would."""
    s = fresh_stack
    marks = s.marks
    s.start_mongrel2()
    s.start_broker()
    s.start_pool("e2e_apps:app", service="app", routes=("/",), processes=1, threads=1,
                 env={"E2E_MARK_DIR": str(marks)})
    s.wait_ok("/")
    client = socket.create_connection(("127.0.0.1", s.http_port), timeout=10)
    try:
        client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
        client.sendall(b"GET /huge HTTP/1.1\r\nHost: localhost\r\n\r\n")
        assert client.recv(4096).startswith(b"HTTP/1.1 200 OK")
    finally:
        client.close()
    # The app's iterable is closed early, having produced far less than HUGE.
    mark = wait_for(lambda: [m for m in marks.iterdir() if m.name.startswith("huge-")], 20,
                    "the cancelled download to end at the app")[0]
    assert int(mark.name.rsplit("-", 1)[1]) < HUGE // 2
    r = requests.get(s.url("/pid"), timeout=10)  # the loop serves again
    assert r.status_code == 200 and r.json()["pid"] == int(mark.name.split("-")[1])
