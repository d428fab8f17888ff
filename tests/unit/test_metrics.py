"""Tests for scale0.ops.metrics and the pure parts of scale0.ops.status: the collector
over fake snapshots and Done batches (and over a real Dispatcher driven with
a fake clock), read back with prometheus-client's own parser."""

from __future__ import annotations

import json
from typing import Any

import pytest
from prometheus_client.exposition import generate_latest
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from scale0.core.dispatch import Done
from scale0.ops.metrics import LATENCY_BUCKETS_S, RequestStats, make_registry
from scale0.ops.status import parse_address, status_document
from tests.metrics_samples import Samples, samples_of

from .test_dispatch import SENDER, Harness, m2_disconnect, ok_reply


def done(service: str, status: int, elapsed_s: float = 0.001, bytes_in: int = 100,
         bytes_out: int = 50) -> Done:
    return Done(0, 1, "GET", "/x", service, "w1", status, bytes_in, bytes_out, 10.0,
                10.0 + elapsed_s, 1)


def scrape(stats: RequestStats, snapshot: dict[str, Any] | None = None) -> Samples:
    """Every sample of a scrape, parsed by prometheus-client, keyed by (name, labels)."""
    return samples_of(make_registry(stats, lambda: snapshot or {}, process=False))


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples[name, tuple(sorted(labels.items()))]


def families(stats: RequestStats, snapshot: dict[str, Any]) -> dict[str, tuple[str, list[Sample]]]:
    registry = make_registry(stats, lambda: snapshot, process=False)
    text = generate_latest(registry).decode()
    return {f.name: (f.type, f.samples) for f in text_string_to_metric_families(text)}


SNAPSHOT: dict[str, Any] = {
    "services": [
        {"name": "api", "routes": ["/api"], "queued": 3, "in_flight": 4, "workers": 3,
         "ready": 1, "capacity": 6, "timeout_s": 60.0},
        {"name": "web", "routes": ["/"], "queued": 0, "in_flight": 0, "workers": 0,
         "ready": 0, "capacity": 0, "timeout_s": 60.0},
    ],
    "workers": [
        {"id": "01", "label": "h:1", "services": ["api"], "capacity": 2, "in_flight": 1,
         "draining": False, "served": 7, "age_s": 3.0},
        {"id": "02", "label": "h:2", "services": ["api"], "capacity": 2, "in_flight": 2,
         "draining": False, "served": 9, "age_s": 3.0},
        {"id": "03", "label": "h:3", "services": ["api"], "capacity": 2, "in_flight": 1,
         "draining": True, "served": 1, "age_s": 9.0},
    ],
    "counters": {"requests": 40, "replies": 30, "no_route": 2, "no_worker": 5, "queue_full": 1,
                 "queue_timeouts": 6, "request_timeouts": 7, "retries": 8,
                 "worker_failures": 9, "late_replies": 10, "bad_mongrel2": 11,
                 "bad_worker": 12, "client_gone": 13, "too_large": 14, "forged_uploads": 15},
    "requests": 8, "connections": 9,
}


def test_requests_are_counted_by_service_and_status() -> None:
    stats = RequestStats()
    stats([done("api", 200), done("api", 200), done("api", 503)])
    stats([done("web", 200), done("", 404)])
    s = scrape(stats)
    assert value(s, "scale0_requests_total", service="api", status="200") == 2
    assert value(s, "scale0_requests_total", service="api", status="503") == 1
    assert value(s, "scale0_requests_total", service="web", status="200") == 1
    assert value(s, "scale0_requests_total", service="", status="404") == 1
    assert sum(v for (name, _), v in s.items() if name == "scale0_requests_total") == 5


def test_latency_histogram_buckets_are_cumulative_and_le_is_inclusive() -> None:
    stats = RequestStats(bounds_s=(0.01, 0.1, 1.0))
    stats([done("api", 200, 0.005), done("api", 200, 0.01), done("api", 200, 0.05),
           done("api", 200, 5.0)])
    s = scrape(stats)
    bucket = "scale0_request_duration_seconds_bucket"
    assert value(s, bucket, service="api", le="0.01") == 2  # 0.005 and exactly 0.01
    assert value(s, bucket, service="api", le="0.1") == 3
    assert value(s, bucket, service="api", le="1.0") == 3
    assert value(s, bucket, service="api", le="+Inf") == 4
    assert value(s, "scale0_request_duration_seconds_count", service="api") == 4
    assert value(s, "scale0_request_duration_seconds_sum", service="api") == pytest.approx(
        5.065)


def test_default_buckets_span_a_fast_hop_to_the_default_timeout() -> None:
    assert LATENCY_BUCKETS_S[0] <= 0.001 and LATENCY_BUCKETS_S[-1] >= 60.0
    assert list(LATENCY_BUCKETS_S) == sorted(LATENCY_BUCKETS_S)
    stats = RequestStats()
    stats([done("api", 200, 0.0004)])
    s = scrape(stats)
    assert value(s, "scale0_request_duration_seconds_bucket", service="api", le="0.001") == 1


def test_bytes_are_counted_by_service_and_direction() -> None:
    stats = RequestStats()
    stats([done("api", 200, bytes_in=300, bytes_out=1000),
           done("api", 200, bytes_in=200, bytes_out=24)])
    stats([done("web", 200, bytes_in=7, bytes_out=0)])
    s = scrape(stats)
    assert value(s, "scale0_bytes_total", service="api", direction="in") == 500
    assert value(s, "scale0_bytes_total", service="api", direction="out") == 1024
    assert value(s, "scale0_bytes_total", service="web", direction="in") == 7


def test_state_gauges_come_from_the_snapshot() -> None:
    s = scrape(RequestStats(), SNAPSHOT)
    assert value(s, "scale0_queue_depth", service="api") == 3
    assert value(s, "scale0_in_flight", service="api") == 4
    assert value(s, "scale0_worker_slots", service="api") == 6
    # api: 3 workers, 1 ready, 1 draining, so 1 busy; web has none.
    assert value(s, "scale0_workers", service="api", state="ready") == 1
    assert value(s, "scale0_workers", service="api", state="busy") == 1
    assert value(s, "scale0_workers", service="api", state="draining") == 1
    for state in ("ready", "busy", "draining"):
        assert value(s, "scale0_workers", service="web", state=state) == 0
    assert value(s, "scale0_workers_connected") == 3
    assert value(s, "scale0_requests_in_progress") == 8
    assert value(s, "scale0_client_connections") == 9


def test_dispatcher_counters_are_exported() -> None:
    s = scrape(RequestStats(), SNAPSHOT)
    assert value(s, "scale0_requests_received_total") == 40
    assert value(s, "scale0_retries_total") == 8
    assert value(s, "scale0_worker_failures_total") == 9
    assert value(s, "scale0_late_replies_total") == 10
    assert value(s, "scale0_client_gone_total") == 13
    assert value(s, "scale0_timeouts_total", kind="queue") == 6
    assert value(s, "scale0_timeouts_total", kind="request") == 7
    assert value(s, "scale0_malformed_total", source="mongrel2") == 11
    assert value(s, "scale0_malformed_total", source="worker") == 12
    assert value(s, "scale0_refused_total", reason="no_route") == 2
    assert value(s, "scale0_refused_total", reason="no_worker") == 5
    assert value(s, "scale0_refused_total", reason="queue_full") == 1
    assert value(s, "scale0_refused_total", reason="too_large") == 14
    assert value(s, "scale0_refused_total", reason="forged_upload") == 15


def test_metric_types_and_help() -> None:
    stats = RequestStats()
    stats([done("api", 200)])
    found = families(stats, SNAPSHOT)
    expected = {
        "scale0_requests": "counter", "scale0_request_duration_seconds": "histogram",
        "scale0_bytes": "counter", "scale0_queue_depth": "gauge", "scale0_in_flight": "gauge",
        "scale0_workers": "gauge", "scale0_worker_slots": "gauge",
        "scale0_workers_connected": "gauge", "scale0_requests_in_progress": "gauge",
        "scale0_client_connections": "gauge", "scale0_requests_received": "counter",
        "scale0_retries": "counter", "scale0_worker_failures": "counter",
        "scale0_late_replies": "counter", "scale0_client_gone": "counter",
        "scale0_timeouts": "counter", "scale0_malformed": "counter", "scale0_refused": "counter",
        "scale0_hellos_refused": "counter", "scale0_worker_ejections": "counter",
        "scale0_routes_forgotten": "counter", "scale0_prefetched": "counter",
        "scale0_recalls": "counter", "scale0_workers_ejected": "gauge",
        "scale0_state_limit": "gauge",
    }
    assert {name: kind for name, (kind, _) in found.items()} == expected
    text = generate_latest(make_registry(stats, lambda: SNAPSHOT, process=False)).decode()
    for name in expected:
        assert f"# HELP {name}" in text


def test_an_empty_snapshot_before_the_loop_runs_scrapes_zeros() -> None:
    s = scrape(RequestStats(), {})
    assert value(s, "scale0_retries_total") == 0
    assert value(s, "scale0_workers_connected") == 0
    assert value(s, "scale0_timeouts_total", kind="request") == 0
    assert not any(name == "scale0_requests_total" for name, _ in s)


def test_process_metrics_are_in_the_private_registry() -> None:
    registry = make_registry(RequestStats(), dict)
    names = {f.name for f in text_string_to_metric_families(generate_latest(registry).decode())}
    assert "process_cpu_seconds" in names and "scale0_retries" in names


def test_two_registries_do_not_collide() -> None:
    # The global registry would raise DuplicateTimeseries for a second broker.
    for _ in range(2):
        make_registry(RequestStats(), dict)


def test_a_real_dispatcher_feeds_the_metrics() -> None:
    """The Done records and the snapshot of a Dispatcher (fake clock), end to end."""
    h = Harness(request_timeout_s=10.0)
    h.d.record = True
    stats = RequestStats()
    h.hello(b"w1", capacity=2)
    h.now = 1.0
    h.request(1, b"/app/ok")
    ok = h.take_one_request()
    h.request(2, b"/app/slow")
    slow = h.take_one_request()
    h.now = 1.02
    h.serve(ok)
    h.request(3, b"/nowhere")  # 404
    h.request(4, b"/app/gone")
    h.take_one_request()
    h.m2(m2_disconnect(4))  # 499
    h.frames(b"junk", [b"garbage"])  # malformed worker message
    h.tick(11.0)  # /app/slow: 504
    h.reply(slow, ok_reply(SENDER, 2, b"late"))  # late: dropped
    stats(h.d.done)
    s = scrape(stats, h.d.snapshot(h.now))
    assert value(s, "scale0_requests_total", service="app", status="200") == 1
    assert value(s, "scale0_requests_total", service="app", status="499") == 1
    assert value(s, "scale0_requests_total", service="app", status="504") == 1
    assert value(s, "scale0_requests_total", service="", status="404") == 1
    assert value(s, "scale0_request_duration_seconds_count", service="app") == 3
    assert value(s, "scale0_request_duration_seconds_bucket", service="app", le="0.025") == 2
    assert value(s, "scale0_timeouts_total", kind="request") == 1
    assert value(s, "scale0_malformed_total", source="worker") == 1
    assert value(s, "scale0_refused_total", reason="no_route") == 1
    assert value(s, "scale0_client_gone_total") == 1
    assert value(s, "scale0_workers", service="app", state="ready") == 1
    assert value(s, "scale0_workers_connected") == 1
    assert value(s, "scale0_bytes_total", service="app", direction="out") > 0


def test_status_document_is_json_with_traffic_per_service() -> None:
    stats = RequestStats()
    stats([done("api", 200, 0.5, 10, 20), done("api", 502, 0.25, 1, 2)])
    doc = status_document(SNAPSHOT, stats.totals(), {"pid": 1})
    doc = json.loads(json.dumps(doc))
    assert doc["traffic"]["api"] == {"requests": 2, "statuses": {"200": 1, "502": 1},
                                     "latency_sum_s": 0.75, "bytes_in": 11, "bytes_out": 22}
    assert doc["services"] == SNAPSHOT["services"] and doc["workers"] == SNAPSHOT["workers"]
    assert doc["counters"]["retries"] == 8 and doc["broker"] == {"pid": 1}
    assert isinstance(doc["t"], float)


@pytest.mark.parametrize(("text", "address"), [
    ("127.0.0.1:6790", ("127.0.0.1", 6790)),
    ("6790", ("127.0.0.1", 6790)),
    ("0.0.0.0:0", ("0.0.0.0", 0)),
    ("[::1]:9100", ("::1", 9100)),
    ("localhost:9100", ("localhost", 9100)),
    ("", None),
    ("off", None),
    ("OFF", None),
])
def test_parse_address(text: str, address: tuple[str, int] | None) -> None:
    assert parse_address(text) == address


@pytest.mark.parametrize("text", ["127.0.0.1", "host:", ":80", "127.0.0.1:70000", "x:y"])
def test_parse_address_rejects(text: str) -> None:
    with pytest.raises(ValueError, match="PORT"):
        parse_address(text)


def test_refused_hellos_ejections_and_limits_from_a_real_dispatcher() -> None:
    from scale0.core.dispatch import Dispatcher, DispatchSettings
    from scale0.wire import s0w1 as p

    from .test_dispatch import m2_request

    d = Dispatcher(DispatchSettings(heartbeat_s=100.0, request_timeout_s=1.0, eject_after=1,
                                    max_workers=2))

    def hello(ident: bytes, service: str, route: str) -> None:
        d.on_worker(ident, [p.VERSION, p.CMD[p.Command.HELLO],
                            p.Hello((p.ServiceSpec(service, (route,)),), 2).encode()], 0.0)

    hello(b"w1", "api", "/api")
    hello(b"w2", "evil", "/api")  # 409
    hello(b"w2", "web", "/web")
    hello(b"w3", "api", "/api")  # 429
    d.on_mongrel2(0, m2_request(1, b"/api"), 0.0)
    d.on_tick(1.0)  # the request to w1 times out: w1 ejected
    s = scrape(RequestStats(), d.snapshot(1.0))
    assert value(s, "scale0_hellos_refused_total", reason="route_owned") == 1
    assert value(s, "scale0_hellos_refused_total", reason="limit") == 1
    assert value(s, "scale0_worker_ejections_total") == 1
    assert value(s, "scale0_workers_ejected") == 1
    assert value(s, "scale0_workers", service="api", state="ejected") == 1
    assert value(s, "scale0_workers", service="api", state="busy") == 0
    assert value(s, "scale0_worker_slots", service="api") == 0
    assert value(s, "scale0_state_limit", kind="workers", bound="used") == 2
    assert value(s, "scale0_state_limit", kind="workers", bound="max") == 2
    assert value(s, "scale0_state_limit", kind="routes", bound="used") == 2


def test_request_stats_keep_a_bounded_number_of_services() -> None:
    stats = RequestStats(max_services=3)
    stats([done(f"s{i}", 200) for i in range(6)] + [done("s0", 200)])
    s = scrape(stats)
    assert value(s, "scale0_requests_total", service="s0", status="200") == 2
    assert value(s, "scale0_requests_total", service="s1", status="200") == 1
    assert value(s, "scale0_requests_total", service="_other", status="200") == 4
    assert sorted(stats.totals()) == ["_other", "s0", "s1"]


def test_curve_counters_only_when_curve_is_on() -> None:
    keys = {"curve": True, "authorized_keys": "/k", "keys": 3, "accepted": 5, "refused": 2,
            "reloads": 1, "hellos_refused": 4, "revoked_messages": 6}
    s = scrape(RequestStats(), {**SNAPSHOT, "keys": keys})
    assert value(s, "scale0_curve_authorized_keys") == 3
    assert value(s, "scale0_curve_handshakes_total", result="accepted") == 5
    assert value(s, "scale0_curve_handshakes_total", result="refused") == 2
    assert value(s, "scale0_curve_hellos_refused_total") == 4
    assert value(s, "scale0_curve_revoked_messages_total") == 6
    off = scrape(RequestStats(), {**SNAPSHOT, "keys": {"curve": False}})
    assert not any(name.startswith("scale0_curve") for name, _ in off)
