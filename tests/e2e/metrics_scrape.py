"""Reading a real broker's or relay's metrics in e2e tests: where they are
served, a scrape parsed back, and a metrics port already taken."""

from __future__ import annotations

import re
import socket
import sys

import requests

from tests.metrics_samples import Samples, parse_samples

from .conftest import Proc, Stack


def metrics_url(broker: Proc) -> str:
    """The broker announces where it serves metrics in its READY line."""
    match = re.search(r" metrics=(\S+)", broker.ready_line)
    assert match, broker.ready_line
    return match.group(1)


def scrape(url: str) -> Samples:
    """The samples of a /metrics page, each exactly once."""
    response = requests.get(url, timeout=5)
    assert response.status_code == 200
    assert response.headers["Content-Type"].startswith("text/plain")
    return parse_samples(response.text)


def value(samples: Samples, name: str, **labels: str) -> float:
    """A sample's value; 0 for one not exposed yet (a counter never incremented)."""
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def assert_a_taken_metrics_port_stops_it(stack: Stack, command: list[str], what: str) -> None:
    """`scale0 COMMAND... --metrics PORT` with PORT in use exits 2, naming `what` at it."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        proc = Proc(f"busy-{command[0]}", [sys.executable, "-m", "scale0.cli", *command,
                                           "--metrics", f"127.0.0.1:{port}"], stack.tmp)
        try:
            assert proc.popen.wait(20) == 2  # not serving without the metrics asked for
            assert f"{what} at http://127.0.0.1:{port}" in proc.log_tail()
        finally:
            proc.stop()
