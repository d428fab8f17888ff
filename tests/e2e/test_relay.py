"""Several brokers behind one relay: per-connection messages stay together and
a broker can leave under load without losing a request."""

from __future__ import annotations

import os

import requests

from .conftest import Load, Stack, wait_for


def _two_brokers_behind_a_relay(stack: Stack, *args: str) -> list[int]:
    stack.start_mongrel2()
    stack.start_relay()
    stack.start_broker("--heartbeat", "0.5", *args)
    stack.start_broker("--heartbeat", "0.5", *args)
    stack.start_pool("e2e_apps:app", "--heartbeat", "0.5", service="app", routes=("/",),
                     processes=2, threads=2)
    stack.wait_ok("/")
    return [int(e.rsplit(":", 1)[1]) for e in stack.broker_endpoints]


def test_uploads_and_flow_controlled_downloads_work_across_two_brokers(
        fresh_stack: Stack) -> None:
    # Direct to Mongrel2, its PUSH deals an upload's start and done, and a big
    # reply's credits, to different brokers. Through the relay they stay with
    # the broker that has the connection.
    _two_brokers_behind_a_relay(fresh_stack)
    for i in range(6):
        body = os.urandom(100_000 + i)  # over limits.content_length: a temp_store upload
        r = requests.post(fresh_stack.url("/echo"), data=body, timeout=20)
        assert r.status_code == 200 and r.json()["length"] == len(body)
        r = requests.get(fresh_stack.url("/big"), timeout=20)  # needs Mongrel2's credits
        assert r.status_code == 200 and len(r.content) == 10 * 1024 * 1024
        assert r.content == bytes(range(256)) * 256 * 160


def test_brokers_behind_a_relay_taken_out_in_turn_under_load_lose_nothing(
        fresh_stack: Stack) -> None:
    ports = _two_brokers_behind_a_relay(fresh_stack)
    brokers = [p for p in fresh_stack.procs if p.name.startswith("broker")]
    with Load(lambda n: fresh_stack.url(f"/echo?{n}"), clients=6) as load:
        load.wait_more(60)
        for i in (0, 1):
            brokers[i].stop()
            fresh_stack.procs.remove(brokers[i])
            load.wait_more(60)  # the other broker alone
            brokers[i] = fresh_stack.start_broker("--heartbeat", "0.5", port=ports[i])
            wait_for(lambda: "taking requests" in brokers[i].log_tail(),  # noqa: B023
                     what="the restarted broker to take requests")
            load.wait_more(60)
    counts = dict(load.outcomes)
    assert set(counts) == {"2xx"}, counts
