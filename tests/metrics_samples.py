"""Prometheus exposition text read back with prometheus-client's own parser,
for the metrics tests (unit ones over a registry, e2e ones over a scrape)."""

from __future__ import annotations

from prometheus_client.exposition import generate_latest
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import CollectorRegistry

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def parse_samples(text: str) -> Samples:
    """Every sample of `text`, keyed by (name, sorted labels); each exactly once."""
    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            key = (s.name, tuple(sorted(s.labels.items())))
            assert key not in samples, f"duplicate sample {key}"
            samples[key] = s.value
    return samples


def samples_of(registry: CollectorRegistry) -> Samples:
    """Every sample `registry` exposes, parsed back as a scraper would."""
    return parse_samples(generate_latest(registry).decode())
