"""/metrics and /status.json of a real broker (`--metrics`), after real traffic
through Mongrel2, parsed with prometheus-client's own parser."""

from __future__ import annotations

import sys
import threading
from collections.abc import Iterator

import pytest
import requests
import zmq

from tests.metrics_samples import Samples

from .conftest import Proc, Stack, wait_for
from .metrics_scrape import assert_a_taken_metrics_port_stops_it, metrics_url, scrape, value


def settled(url: str) -> Samples:
    """A scrape once nothing is in progress and the request counts stay put
    for longer than the snapshot period: the broker's startup grace (3 s)
    can leave a request of wait_ok's that timed out at the client to be
    answered after the one that succeeded."""
    seen: list[Samples] = []

    def still() -> Samples | None:
        now = scrape(url)
        counts = {k: v for k, v in now.items() if k[0] == "scale0_requests_total"}
        quiet = value(now, "scale0_requests_in_progress") == 0
        same = bool(seen) and counts == {k: v for k, v in seen[-1].items()
                                         if k[0] == "scale0_requests_total"}
        seen.append(now)
        return now if quiet and same else None

    return wait_for(still, 15, "the broker to be idle", interval_s=0.6)  # type: ignore[no-any-return]


@pytest.fixture(scope="module")
def web(stack: Stack) -> Iterator[tuple[Stack, Proc]]:
    stack.start_mongrel2()
    broker = stack.start_broker("--metrics", "127.0.0.1:0", "--route", "/nobody=nobody")
    # Two single-slot workers: one can be busy while the other is ready.
    stack.start_pool("e2e_apps:app", service="app", routes=("/app",), processes=2, threads=1)
    stack.start_pool("e2e_apps:app", service="other", routes=("/other",))  # 2 loops: 2 workers
    stack.wait_ok("/app/")
    stack.wait_ok("/other/")
    yield stack, broker


def test_requests_latency_bytes_and_errors_after_real_traffic(
        web: tuple[Stack, Proc]) -> None:
    stack, broker = web
    url = metrics_url(broker)
    before = settled(url)  # the fixture's requests are counted: count deltas from here

    def count(samples: Samples, service: str, status: str) -> float:
        return value(samples, "scale0_requests_total", service=service, status=status)

    body = b"x" * 5000
    session = requests.Session()
    for _ in range(5):
        assert session.get(stack.url("/app/hello"), timeout=10).status_code == 200
    assert session.post(stack.url("/app/echo"), data=body, timeout=10).json()["length"] == 5000
    for _ in range(3):
        assert session.get(stack.url("/other/x"), timeout=10).status_code == 200
    for _ in range(2):
        assert session.get(stack.url("/missing"), timeout=10).status_code == 404
    assert session.get(stack.url("/nobody/"), timeout=10).status_code == 503
    expected = {("app", "200"): 6, ("other", "200"): 3, ("", "404"): 2, ("nobody", "503"): 1}

    deltas: dict[tuple[str, str], float] = {}

    def counted() -> Samples | None:
        now = scrape(url)
        deltas.update({key: count(now, *key) - count(before, *key) for key in expected})
        # The snapshot counters lag the Done records by up to 0.5 s.
        lagging = (value(now, "scale0_refused_total", reason="no_worker")
                   - value(before, "scale0_refused_total", reason="no_worker")) < 1
        return now if deltas == expected and not lagging else None

    try:
        after = wait_for(counted, 10, "the requests to be counted")
    except AssertionError as exc:
        raise AssertionError(f"{exc}: counted {deltas}, expected {expected}") from None
    assert value(after, "scale0_refused_total", reason="no_route") >= 2
    # The histogram counts every answered request of a service once.
    for service in ("app", "other", "nobody"):
        answered = sum(v for (name, labels), v in after.items()
                       if name == "scale0_requests_total" and ("service", service) in labels)
        assert value(after, "scale0_request_duration_seconds_count", service=service) == answered
        assert value(after, "scale0_request_duration_seconds_bucket", service=service,
                     le="+Inf") == answered
    assert value(after, "scale0_request_duration_seconds_sum", service="app") > 0
    grown = {d: value(after, "scale0_bytes_total", service="app", direction=d)
             - value(before, "scale0_bytes_total", service="app", direction=d)
             for d in ("in", "out")}
    assert grown["in"] > len(body)  # the POST body, plus every request's headers
    assert grown["out"] > 6 * len("HTTP/1.1 200 OK\r\n")
    assert value(after, "scale0_requests_received_total") >= 12
    assert value(after, "scale0_workers_connected") == 4
    assert value(after, "scale0_worker_slots", service="app") == 2
    assert ("process_resident_memory_bytes", ()) in after


def test_busy_and_ready_workers_and_in_flight(web: tuple[Stack, Proc]) -> None:
    stack, broker = web
    url = metrics_url(broker)
    idle = wait_for(lambda: (s := scrape(url))
                    and value(s, "scale0_workers", service="app", state="ready") == 2 and s,
                    10, "both app workers ready")
    assert value(idle, "scale0_workers", service="app", state="busy") == 0
    assert value(idle, "scale0_in_flight", service="app") == 0
    answers: list[int] = []
    sleeper = threading.Thread(target=lambda: answers.append(
        requests.get(stack.url("/app/sleep?3"), timeout=20).status_code))
    sleeper.start()
    try:
        busy = wait_for(lambda: (s := scrape(url))
                        and value(s, "scale0_workers", service="app", state="busy") == 1 and s,
                        10, "one app worker busy")
        assert value(busy, "scale0_workers", service="app", state="ready") == 1
        assert value(busy, "scale0_workers", service="app", state="draining") == 0
        assert value(busy, "scale0_in_flight", service="app") == 1
        assert value(busy, "scale0_requests_in_progress") >= 1
        assert value(busy, "scale0_queue_depth", service="app") == 0
    finally:
        sleeper.join(25)
    assert answers == [200]


def test_malformed_worker_message_is_counted(web: tuple[Stack, Proc]) -> None:
    stack, broker = web
    url = metrics_url(broker)
    before = value(scrape(url), "scale0_malformed_total", source="worker")
    ctx = zmq.Context()
    try:
        dealer = ctx.socket(zmq.DEALER)
        dealer.setsockopt(zmq.LINGER, 0)
        dealer.connect(stack.broker_endpoints[0])
        dealer.send(b"not S0W1")
        wait_for(lambda: value(scrape(url), "scale0_malformed_total", source="worker")
                 == before + 1, 10, "the malformed message to be counted")
        dealer.close(0)
    finally:
        ctx.term()


def test_status_json_and_page(web: tuple[Stack, Proc]) -> None:
    _, broker = web
    base = metrics_url(broker).removesuffix("/metrics")
    doc = requests.get(base + "/status.json", timeout=5).json()
    assert {sv["name"] for sv in doc["services"]} >= {"app", "other", "nobody"}
    assert sorted(w["services"] for w in doc["workers"]) == [["app"], ["app"], ["other"],
                                                             ["other"]]
    assert doc["traffic"]["app"]["statuses"]["200"] >= 1
    assert doc["broker"]["endpoint"] == web[0].broker_endpoints[0]
    page = requests.get(base + "/", timeout=5)
    assert page.status_code == 200 and page.headers["Content-Type"].startswith("text/html")
    assert '<table id="workers">' in page.text and "status.json" in page.text
    assert "http://" not in page.text.replace("http://www.w3.org", "")  # no external assets
    assert requests.get(base + "/nope", timeout=5).status_code == 404


def test_openmetrics_on_request(web: tuple[Stack, Proc]) -> None:
    _, broker = web
    response = requests.get(metrics_url(broker), timeout=5,
                            headers={"Accept": "application/openmetrics-text"})
    assert response.headers["Content-Type"].startswith("application/openmetrics-text")
    assert response.text.rstrip().endswith("# EOF")


def test_metrics_are_off_by_default_and_the_port_is_free_after_a_stop(
        fresh_stack: Stack) -> None:
    fresh_stack.start_mongrel2()
    plain = fresh_stack.start_broker()
    assert " metrics=" not in plain.ready_line
    with_metrics = fresh_stack.start_broker("--metrics", "127.0.0.1:0")
    url = metrics_url(with_metrics)
    assert scrape(url)
    port = int(url.rsplit(":", 1)[1].split("/")[0])
    assert with_metrics.stop() == 0
    # A broker started again gets the same port (the server reuses the address
    # of connections in TIME_WAIT, like any restarted server).
    again = fresh_stack.start_broker("--metrics", f"127.0.0.1:{port}")
    assert metrics_url(again) == url
    assert scrape(url)


def test_a_bad_metrics_address_is_a_usage_error(fresh_stack: Stack) -> None:
    proc = Proc("badbroker", [sys.executable, "-m", "scale0.cli", "broker", "--mongrel2",
                              fresh_stack.link, "--metrics", "nowhere:"], fresh_stack.tmp)
    try:
        assert proc.popen.wait(20) == 2
        assert "--metrics" in proc.log_tail()
    finally:
        proc.stop()


def test_a_metrics_port_in_use_stops_the_broker_with_a_clear_error(fresh_stack: Stack) -> None:
    assert_a_taken_metrics_port_stops_it(
        fresh_stack, ["broker", "--mongrel2", fresh_stack.link, "--bind", "tcp://127.0.0.1:0"],
        "metrics and status page")
