"""Several brokers behind one relay: per-connection messages stay together and
a broker can leave under load without losing a request."""

from __future__ import annotations

import os
import re
import signal
from typing import Any, cast

import requests

from .conftest import Load, Stack, service_status, wait_for
from .metrics_scrape import assert_a_taken_metrics_port_stops_it, scrape, value


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
            wait_for(lambda: brokers[i].status()["links"][0]["connected"],  # noqa: B023
                     what="the restarted broker to join the relay")
            load.wait_more(60)
    counts = dict(load.outcomes)
    assert set(counts) == {"2xx"}, counts


def test_a_broker_outlives_a_relay_that_is_not_there() -> None:
    # Mongrel2 is there (it subscribed to the replies), the relay is not. The
    # broker tries to join every heartbeat; nothing may pile up in its DEALER
    # until a send raises (it once did after 1000: ZMQ's default SNDHWM).
    import threading

    from scale0.core.dispatch import DispatchSettings
    from scale0.net.broker import Broker, LinkSpec

    from .conftest import FakeMongrel2, free_port, wait_for

    with FakeMongrel2() as m2:
        recv_spec = m2.link.split(",")[1]
        link = LinkSpec.parse(f"relay+tcp://127.0.0.1:{free_port()},{recv_spec}")
        broker = Broker([link], "tcp://127.0.0.1:0", DispatchSettings(heartbeat_s=0.001),
                        startup_grace_s=0.0, graceful_timeout_s=1.0)
        errors: list[BaseException] = []

        def run() -> None:
            try:
                broker.run()
            except BaseException as exc:  # the point: nothing escapes the loop
                errors.append(exc)

        broker.start()
        thread = threading.Thread(target=run)
        thread.start()
        try:
            wait_for(lambda: m2.sub.poll(10) == 0 and broker.link_status()[0]["subscribed"],
                     what="the broker to see Mongrel2's subscription")
            # 3 s is some 3000 heartbeat intervals: the loop must still be running.
            thread.join(3.0)
            assert thread.is_alive() and not errors, errors
        finally:
            broker.stop(force=True)
            thread.join(10)
            broker.close()
        assert not errors and not thread.is_alive()


def test_a_download_finishes_while_its_lone_broker_drains(fresh_stack: Stack) -> None:
    # The only broker behind the relay is stopped mid-download. Its reply
    # needs Mongrel2's credits all the way: the relay keeps reading for the
    # connections a draining broker holds, so the download completes.
    fresh_stack.start_mongrel2()
    fresh_stack.start_relay()
    broker = fresh_stack.start_broker("--heartbeat", "0.5", "--graceful-timeout", "20")
    fresh_stack.start_pool("e2e_apps:app", "--heartbeat", "0.5", service="app", routes=("/",))
    fresh_stack.wait_ok("/")
    with requests.get(fresh_stack.url("/big"), stream=True, timeout=30) as r:
        body = r.raw.read(1 << 20)  # 1 MiB in: the rest needs credits
        broker.popen.send_signal(signal.SIGTERM)
        wait_for(lambda: broker.status()["broker"]["state"] == "stopping",
                 what="the broker to drain")
        while chunk := r.raw.read(1 << 16):
            body += chunk
    assert len(body) == 10 * 1024 * 1024
    assert body == bytes(range(256)) * 256 * 160
    assert broker.popen.wait(20) == 0


def test_relay_restarted_under_load_answers_everything_else(fresh_stack: Stack) -> None:
    # A stopping relay leaves Mongrel2 the way a direct broker does (half-close,
    # read until Mongrel2 closes) and hands what it read to the brokers, which
    # join the next relay (WHO, HELLO). So it has the same narrow window inside
    # Mongrel2 (docs/reliability.md): never a 5xx or a connection error, at
    # most one lost request per client per restart, usually none.
    fresh_stack.start_mongrel2()
    relay = fresh_stack.start_relay()
    port = int(fresh_stack.link.split(",")[0].rsplit(":", 1)[1])
    fresh_stack.start_broker("--heartbeat", "0.5")
    fresh_stack.start_pool("e2e_apps:app", "--heartbeat", "0.5", service="app", routes=("/",),
                           processes=2, threads=2)
    fresh_stack.wait_ok("/")
    with Load(lambda n: fresh_stack.url(f"/echo?{n}"), clients=6) as load:
        for _ in range(2):
            load.wait_more(60)
            assert relay.stop() == 0
            fresh_stack.procs.remove(relay)
            relay = fresh_stack.start_relay(port)
        load.wait_more(60)
    counts = dict(load.outcomes)
    assert set(counts) <= {"2xx", "hanging"}, counts
    assert counts.get("hanging", 0) <= 2 * load.clients and counts["2xx"] >= 180, counts


def _relay_status(url: str) -> dict[str, Any]:
    response = requests.get(url + "/status.json", timeout=5)
    assert response.status_code == 200
    return cast(dict[str, Any], response.json())


def test_relay_metrics_show_brokers_and_their_connections_as_they_drain_and_die(
        fresh_stack: Stack) -> None:
    fresh_stack.start_mongrel2()
    relay = fresh_stack.start_relay(args=("--metrics", "127.0.0.1:0"))
    match = re.search(r" metrics=(http://\S+)/metrics", relay.ready_line)
    assert match, relay.ready_line
    url = match.group(1)
    assert requests.get(url + "/", timeout=5).status_code == 404  # no page: JSON and metrics
    first = fresh_stack.start_broker("--heartbeat", "0.5")
    fresh_stack.start_pool("e2e_apps:app", "--heartbeat", "0.5", service="app")
    with requests.Session() as client:  # one keep-alive connection, held by `first`
        for _ in range(5):
            assert client.get(fresh_stack.url("/"), timeout=10).status_code == 200
        wait_for(lambda: [b["sticky"] for b in _relay_status(url)["brokers"]] == [1],
                 what="the relay to show one broker holding the client's connection")
        samples = scrape(url + "/metrics")
        assert value(samples, "scale0_relay_brokers", state="ready") == 1
        assert value(samples, "scale0_relay_mongrel2_messages_total") >= 5
        assert value(samples, "scale0_relay_sticky_connections") == 1

        first.stop()  # graceful: it drains, then leaves (LEAVE), which is no loss
        fresh_stack.procs.remove(first)
        wait_for(lambda: _relay_status(url)["brokers"] == [], what="the broker to leave")
        status = _relay_status(url)
        assert status["sticky"] == 0 and status["counters"]["brokers_lost"] == 0

        port = int(fresh_stack.broker_endpoints[0].rsplit(":", 1)[1])
        second = fresh_stack.start_broker("--heartbeat", "0.5", port=port)  # the pool's
        wait_for(lambda: service_status(second.status(), "app").get("ready", 0) >= 1,
                 what="the pool to reconnect to the restarted broker")
        assert client.get(fresh_stack.url("/"), timeout=10).status_code == 200  # same connection
        wait_for(lambda: [b["sticky"] for b in _relay_status(url)["brokers"]] == [1],
                 what="the second broker to hold the connection")
        second.popen.send_signal(signal.SIGKILL)  # dies holding it: the relay gives it up
        second.popen.wait(10)
        wait_for(lambda: _relay_status(url)["counters"]["brokers_lost"] == 1, 15,
                 "the relay to give up the killed broker")
        samples = scrape(url + "/metrics")
        assert value(samples, "scale0_relay_lost_connections_total") == 1
        assert value(samples, "scale0_relay_sticky_connections") == 0
        assert sum(v for (name, _), v in samples.items() if name == "scale0_relay_brokers") == 0


def test_a_relay_whose_metrics_port_is_taken_exits_2_naming_it(fresh_stack: Stack) -> None:
    assert_a_taken_metrics_port_stops_it(
        fresh_stack, ["relay", "--mongrel2", fresh_stack.send_spec, "--bind",
                      "tcp://127.0.0.1:0"], "metrics and status")
