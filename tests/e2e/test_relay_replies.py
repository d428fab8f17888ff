"""Replies through the relay: brokers linked as `relay+ENDPOINT` alone send
their replies to the relay, which publishes them to Mongrel2 (issue 12: a
broker on another host reaches Mongrel2 only through the relay next to it)."""

from __future__ import annotations

import os

import requests

from .conftest import Load, Stack, wait_for


def _brokers_behind_a_relay_that_carries_replies(stack: Stack, brokers: int = 2) -> list[int]:
    stack.start_mongrel2()
    relay = stack.start_relay(replies=True)
    assert f"replies={stack.recv_spec}" in relay.ready_line
    for _ in range(brokers):
        broker = stack.start_broker("--heartbeat", "0.5")
        # The broker has no address of Mongrel2's at all: only the relay's.
        assert stack.recv_spec not in broker.ready_line and stack.send_spec not in \
            broker.ready_line
    stack.start_pool("e2e_apps:app", "--heartbeat", "0.5", service="app", routes=("/",),
                     processes=2, threads=2)
    stack.wait_ok("/")
    return [int(e.rsplit(":", 1)[1]) for e in stack.broker_endpoints]


def test_uploads_and_flow_controlled_downloads_with_replies_through_the_relay(
        fresh_stack: Stack) -> None:
    _brokers_behind_a_relay_that_carries_replies(fresh_stack)
    for i in range(4):
        body = os.urandom(100_000 + i)  # over limits.content_length: a temp_store upload
        r = requests.post(fresh_stack.url("/echo"), data=body, timeout=20)
        assert r.status_code == 200 and r.json()["length"] == len(body)
        r = requests.get(fresh_stack.url("/big"), timeout=30)  # needs Mongrel2's credits
        assert r.status_code == 200 and r.content == bytes(range(256)) * 256 * 160
    r = requests.get(fresh_stack.url("/echo?x=1"), timeout=10)
    assert r.status_code == 200


def test_brokers_taken_out_in_turn_with_replies_through_the_relay_lose_nothing(
        fresh_stack: Stack) -> None:
    ports = _brokers_behind_a_relay_that_carries_replies(fresh_stack)
    brokers = [p for p in fresh_stack.procs if p.name.startswith("broker")]
    with Load(lambda n: fresh_stack.url(f"/echo?{n}"), clients=6) as load:
        load.wait_more(60)
        for i in (0, 1):
            assert brokers[i].stop() == 0
            fresh_stack.procs.remove(brokers[i])
            load.wait_more(60)  # the other broker alone
            brokers[i] = fresh_stack.start_broker("--heartbeat", "0.5", port=ports[i])
            wait_for(lambda: brokers[i].status()["links"][0]["connected"],  # noqa: B023
                     what="the restarted broker to join the relay")
            load.wait_more(60)
    counts = dict(load.outcomes)
    assert set(counts) == {"2xx"}, counts


def test_relay_restarted_under_load_with_replies_through_it(fresh_stack: Stack) -> None:
    # Replies a broker cannot hand to the relay while it is away are held
    # by the broker (its DEALER has IMMEDIATE) and go out through the next
    # relay: the same narrow window as a relay that carries no replies.
    fresh_stack.start_mongrel2()
    relay = fresh_stack.start_relay(replies=True)
    port = int(fresh_stack.link.rsplit(":", 1)[1])
    fresh_stack.start_broker("--heartbeat", "0.5")
    fresh_stack.start_pool("e2e_apps:app", "--heartbeat", "0.5", service="app", routes=("/",),
                           processes=2, threads=2)
    fresh_stack.wait_ok("/")
    with Load(lambda n: fresh_stack.url(f"/echo?{n}"), clients=6) as load:
        for _ in range(2):
            load.wait_more(60)
            assert relay.stop() == 0
            fresh_stack.procs.remove(relay)
            relay = fresh_stack.start_relay(port, replies=True)
        load.wait_more(60)
    counts = dict(load.outcomes)
    assert set(counts) <= {"2xx", "hanging"}, counts
    assert counts.get("hanging", 0) <= 2 * load.clients and counts["2xx"] >= 180, counts
