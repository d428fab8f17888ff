"""The relay's `/metrics` and `/status.json` (`scale0 relay --metrics`).

The relay loop replaces `Relay.snapshot` whole every 0.5 s while
`publish_snapshots` is on (net/relay.py); this module only reads it, from
the status server's threads (ops/status.py), so a scrape never touches the
loop's state and costs the loop nothing but the snapshot itself: O(brokers),
twice a second.

Labels stay bounded: broker states and small fixed sets. A broker's identity
(its ZeroMQ routing id, new at each restart) is in `/status.json` only.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from typing import Any, Protocol

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.registry import Collector, CollectorRegistry

from scale0.ops.status import StatusServer

# The relay's counters (`RelayCore.snapshot` and `Relay._take_snapshot`):
# (metric, help, snapshot key).
COUNTERS = (
    ("scale0_relay_mongrel2_messages", "Messages read from Mongrel2: requests, upload "
     "pieces, credits and disconnects.", "mongrel2_messages"),
    ("scale0_relay_malformed", "Malformed messages dropped: from Mongrel2 (no connection "
     "id a reply could name) or from brokers.", "malformed"),
    ("scale0_relay_dropped", "Mongrel2 messages of a connection no broker holds (credits, "
     "disconnects), dropped.", "dropped"),
    ("scale0_relay_released", "Connections a draining broker released, dealt to another "
     "broker at their next request.", "released"),
    ("scale0_relay_brokers_lost", "Brokers given up: silent past their heartbeat x "
     "liveness, or unreachable (a LEAVE does not count).", "brokers_lost"),
    ("scale0_relay_lost_connections", "Client connections of lost brokers, closed (with "
     "--mongrel2-recv) or forgotten.", "lost_connections"),
    ("scale0_relay_replies_published", "Replies published to Mongrel2: for brokers linked "
     "through the relay alone, and closes.", "replies_published"),
    ("scale0_relay_replies_dropped", "Replies dropped past the limit held while Mongrel2 "
     "took none.", "replies_dropped"),
    ("scale0_relay_stray_replies", "Replies brokers sent a relay with no --mongrel2-recv, "
     "dropped.", "stray_replies"),
    ("scale0_relay_wakeups", "Wake-ups of the relay loop (messages per wake-up is the "
     "batching achieved).", "wakeups"),
)


class RelayLike(Protocol):
    """What the status server needs of a `net.relay.Relay`."""

    publish_snapshots: bool
    snapshot: dict[str, Any]
    endpoint: str
    send_spec: str


class RelayCollector(Collector):
    """Renders the relay's latest snapshot as metric families when scraped."""

    def __init__(self, snapshot: Callable[[], dict[str, Any]]) -> None:
        self.snapshot = snapshot

    def collect(self) -> Iterator[Metric]:
        snap = self.snapshot()  # one reference: the loop replaces it whole
        brokers = GaugeMetricFamily(
            "scale0_relay_brokers", "Brokers connected: ready (takes new connections), full "
            "(no credit left) or draining (takes none; keeps its own).", labels=["state"])
        states = {"ready": 0, "full": 0, "draining": 0}
        for b in snap.get("brokers", ()):
            states["draining" if b["draining"] else "ready" if b["credit"] > 0 else "full"] += 1
        for state, n in states.items():
            brokers.add_metric([state], n)
        yield brokers
        yield GaugeMetricFamily(
            "scale0_relay_sticky_connections", "Client connections the relay sends to one "
            "broker: seen and not seen to end (Mongrel2 reports no end of a connection it "
            "closes itself).", value=snap.get("sticky", 0))
        yield GaugeMetricFamily("scale0_relay_pending",
                                "New connections' messages waiting for a broker with credit.",
                                value=snap.get("pending", 0))
        yield GaugeMetricFamily("scale0_relay_replies_held",
                                "Replies held while Mongrel2 takes none (intake paused).",
                                value=snap.get("replies_held", 0))
        counters = snap.get("counters", {})
        for name, text, key in COUNTERS:
            yield CounterMetricFamily(name, text, value=counters.get(key, 0))


def for_relay(relay: RelayLike, address: tuple[str, int]) -> StatusServer:
    """A StatusServer for `relay` (turns on snapshot publishing); `start()` it yourself."""
    relay.publish_snapshots = True
    registry = CollectorRegistry(auto_describe=False)
    registry.register(RelayCollector(lambda: relay.snapshot))
    ProcessCollector(registry=registry)
    started = time.monotonic()
    pid = os.getpid()

    def status() -> dict[str, Any]:
        info = {"pid": pid, "endpoint": relay.endpoint, "mongrel2": relay.send_spec,
                "uptime_s": round(time.monotonic() - started, 1)}
        return {"t": time.monotonic(), "relay": info, **relay.snapshot}

    return StatusServer(address, registry, status, page=False)
