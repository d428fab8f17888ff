"""The relay's metrics: RelayCollector renders RelayCore's snapshot."""

from __future__ import annotations

from typing import Any

from prometheus_client.registry import CollectorRegistry

from scale0.core.relaycore import RelayCore
from scale0.ops.relay_status import COUNTERS, RelayCollector
from tests.metrics_samples import Samples, samples_of

S = b"5ca1e000-0000-4000-8000-000000000001"


def scrape(snapshot: dict[str, Any]) -> Samples:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(RelayCollector(lambda: snapshot))
    return samples_of(registry)


def test_a_relays_state_scrapes_as_gauges_and_counters() -> None:
    core = RelayCore(heartbeat_s=1.0, liveness=3, max_peer_heartbeat_s=30.0)
    for ident, window in ((b"A", 2), (b"B", 2), (b"C", 5)):
        core.on_broker(ident, b"HELLO S0R1 %d" % window, 0.0)
    core.on_broker(b"C", b"DRAIN", 0.0)
    for conn in range(1, 6):  # A and B take two each; the fifth waits: no credit left
        core.on_mongrel2(S + b" %d / 2:{},0:," % conn)
    core.on_mongrel2(b"no-connection-id")  # no SENDER CONN_ID: nobody could answer it
    snap = core.snapshot(0.0)
    snap["counters"]["mongrel2_messages"] = 6
    snap["replies_held"] = 3
    samples = scrape(snap)
    assert samples["scale0_relay_brokers", (("state", "ready"),)] == 0
    assert samples["scale0_relay_brokers", (("state", "full"),)] == 2
    assert samples["scale0_relay_brokers", (("state", "draining"),)] == 1
    assert samples["scale0_relay_sticky_connections", ()] == 4
    assert samples["scale0_relay_pending", ()] == 1
    assert samples["scale0_relay_replies_held", ()] == 3
    assert samples["scale0_relay_malformed_total", ()] == 1
    assert samples["scale0_relay_mongrel2_messages_total", ()] == 6
    for name, _, _key in COUNTERS:  # every counter is there, 0 if the snapshot lacks it
        assert (f"{name}_total", ()) in samples


def test_before_the_first_snapshot_a_scrape_is_all_zeros() -> None:
    samples = scrape({})
    assert samples["scale0_relay_sticky_connections", ()] == 0
    assert sum(v for (name, _), v in samples.items() if name == "scale0_relay_brokers") == 0
