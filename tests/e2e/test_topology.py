"""Several Mongrel2 servers, several brokers, host routing and the bounded queue."""

from __future__ import annotations

import concurrent.futures
from pathlib import Path

import requests

from .conftest import Proc, Stack, service_status, wait_for


def test_one_broker_serves_two_mongrel2_and_replies_go_back_where_they_came_from(
        fresh_stack: Stack) -> None:
    # Both Mongrel2s use the same sender uuid and number connections from 1:
    # only the link a request came in on tells the broker where to reply.
    (fresh_stack.tmp / "second").mkdir()
    other = Stack(fresh_stack.tmp / "second", recv_ident="5ca1e000-0000-4000-8000-0000000e2e99")
    try:
        fresh_stack.start_mongrel2()
        other.start_mongrel2()
        fresh_stack.start_broker(also=(other,))
        fresh_stack.start_pool("e2e_apps:app", service="app", routes=("/",), threads=4)
        fresh_stack.wait_ok("/")
        other.wait_ok("/")  # recv_ident set: replies are re-addressed to pass its filter

        def hit(stack: Stack, i: int) -> tuple[Stack, int, str]:
            r = requests.get(stack.url(f"/echo?from={stack.http_port}&i={i}"), timeout=10)
            return stack, r.status_code, r.json()["query"]

        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            jobs = [pool.submit(hit, s, i) for i in range(40) for s in (fresh_stack, other)]
            for job in jobs:
                stack, status, query = job.result()
                assert status == 200
                assert query.startswith(f"from={stack.http_port}&")
    finally:
        other.stop()


def test_two_brokers_share_one_mongrel2_and_workers_follow_both(fresh_stack: Stack) -> None:
    fresh_stack.start_mongrel2()
    first = fresh_stack.start_broker()
    second = fresh_stack.start_broker()
    fresh_stack.start_pool("e2e_apps:app", service="app", routes=("/",), threads=2)
    fresh_stack.wait_ok("/")
    # Mongrel2 PUSHes round-robin to both brokers; every request is answered.
    for i in range(30):
        r = requests.get(fresh_stack.url(f"/echo?{i}"), timeout=10)
        assert r.status_code == 200 and r.json()["query"] == str(i)
    for broker in (first, second):  # the workers are registered with both
        assert service_status(broker.status(), "app")["workers"] >= 2


def test_routing_by_host(fresh_stack: Stack) -> None:
    fresh_stack.start_mongrel2()
    fresh_stack.start_broker()
    fresh_stack.start_pool("e2e_apps:app", service="api", routes=("api.example.test/",))
    fresh_stack.start_pool("examples.hello:app", service="www", routes=("/",))
    fresh_stack.wait_ok("/")

    def service_of(host: str) -> str:
        r = requests.get(fresh_stack.url("/echo"), headers={"Host": host}, timeout=10)
        assert r.status_code == 200
        return "api" if r.headers["Content-Type"] == "application/json" else "www"

    wait_for(lambda: service_of("api.example.test") == "api", what="the api pool")
    assert service_of("API.Example.Test:6767") == "api"  # case and port do not matter
    assert service_of("v2.api.example.test") == "api"  # subdomains
    assert service_of("badapi.example.test") == "www"  # not on a label boundary
    assert service_of("localhost") == "www"


def _slow_pool(stack: Stack, marks: Path) -> None:
    marks.mkdir()
    stack.start_pool("e2e_apps:app", service="app", routes=("/",), threads=1,
                     env={"E2E_MARK_DIR": str(marks)})
    stack.wait_ok("/")


def _queued(broker: Proc, n: int) -> bool:
    return bool(service_status(broker.status(), "app").get("queued", 0) >= n)


def test_busy_service_queues_then_503_with_retry_after(fresh_stack: Stack) -> None:
    fresh_stack.start_mongrel2()
    broker = fresh_stack.start_broker("--queue-size", "1", "--queue-timeout", "1",
                                      "--retry-after", "7")
    marks = fresh_stack.tmp / "marks"
    _slow_pool(fresh_stack, marks)
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        busy = pool.submit(requests.get, fresh_stack.url("/sleep?3"), timeout=15)
        wait_for(lambda: list(marks.iterdir()), what="the slow request at the worker")
        queued = pool.submit(requests.get, fresh_stack.url("/"), timeout=15)
        wait_for(lambda: _queued(broker, 1), what="a request in the queue")
        full = requests.get(fresh_stack.url("/"), timeout=15)  # the queue of 1 is full
        assert full.status_code == 503 and full.headers["Retry-After"] == "7"
        timed_out = queued.result()  # waited its 1 s in the queue
        assert timed_out.status_code == 503 and timed_out.headers["Retry-After"] == "7"
        assert busy.result().status_code == 200
    assert requests.get(fresh_stack.url("/"), timeout=10).status_code == 200


def test_queued_request_is_served_when_a_worker_frees_up(fresh_stack: Stack) -> None:
    fresh_stack.start_mongrel2()
    broker = fresh_stack.start_broker("--queue-timeout", "30")
    marks = fresh_stack.tmp / "marks"
    _slow_pool(fresh_stack, marks)
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        busy = pool.submit(requests.get, fresh_stack.url("/sleep?1"), timeout=15)
        wait_for(lambda: list(marks.iterdir()), what="the slow request at the worker")
        queued = pool.submit(requests.get, fresh_stack.url("/echo?queued"), timeout=15)
        wait_for(lambda: _queued(broker, 1), what="a request in the queue")
        assert queued.result().status_code == 200
        assert queued.result().json()["query"] == "queued"
        assert busy.result().status_code == 200
