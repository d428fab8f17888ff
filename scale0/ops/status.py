"""The HTTP side door: `/metrics`, `/status.json` and (the broker's) status page `/`.

A `ThreadingHTTPServer` on a daemon thread, bound to loopback unless told
otherwise. It reads only what the broker loop publishes for other threads
(`Broker.snapshot`, replaced whole, and `RequestStats` under its own short
lock), so a slow or stuck client never slows the loop; each connection has
its own thread and a socket timeout.

`/status.json` is what the page renders: the broker's snapshot plus the
cumulative traffic per service. Rates are computed by the page from two
successive documents (`t` is the broker's monotonic clock), so the server
keeps no history and any number of pages agree.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import socket
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib.resources import files
from typing import Any, Protocol

from prometheus_client.exposition import choose_encoder
from prometheus_client.registry import CollectorRegistry

from scale0.core.dispatch import Done
from scale0.ops.metrics import RequestStats, ServiceTotals, make_registry

log = logging.getLogger(__name__)

DEFAULT_HOST = "127.0.0.1"
CLIENT_TIMEOUT_S = 10.0  # a client that sends nothing for this long is dropped


class BrokerLike(Protocol):
    """What the status server needs of a `broker.Broker`."""

    publish_snapshots: bool
    snapshot: dict[str, Any]
    endpoint: str

    def add_done_sink(self, sink: Callable[[list[Done]], None], *,
                      wanted: Callable[[], bool] | None = None) -> None: ...


def parse_address(text: str) -> tuple[str, int] | None:
    """'[HOST:]PORT' (HOST defaults to 127.0.0.1; '[::1]:PORT' for IPv6);
    '' or 'off' means disabled (None). Port 0 picks a free port."""
    text = text.strip()
    if text.lower() in ("", "off"):
        return None
    host, sep, port = text.rpartition(":")
    host = host.strip("[]") if sep else DEFAULT_HOST
    if not host or not port.isdigit() or int(port) > 65535:
        raise ValueError(f"expected [HOST:]PORT or 'off', got {text!r}")
    return host, int(port)


def status_document(snapshot: dict[str, Any], totals: dict[str, ServiceTotals],
                    broker: dict[str, Any]) -> dict[str, Any]:
    """The JSON the status page renders (and a human can curl)."""
    traffic = {
        name: {"requests": t.count, "statuses": {str(k): v for k, v in t.statuses.items()},
               "latency_sum_s": t.latency_sum_s, "bytes_in": t.bytes_in,
               "bytes_out": t.bytes_out}
        for name, t in totals.items()}
    return {"t": time.monotonic(), "broker": broker, "traffic": traffic,
            "services": snapshot.get("services", []), "workers": snapshot.get("workers", []),
            "counters": snapshot.get("counters", {}), "requests": snapshot.get("requests", 0),
            "connections": snapshot.get("connections", 0)}


class _Server(ThreadingHTTPServer):
    daemon_threads = True  # a hung client never keeps the process alive
    registry: CollectorRegistry
    status: Callable[[], dict[str, Any]]
    page: bool  # serve the status page at /


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    timeout = CLIENT_TIMEOUT_S
    server_version = "scale0-status"

    def do_GET(self) -> None:
        path = self.path.partition("?")[0]
        if path == "/metrics":
            encode, content_type = choose_encoder(self.headers.get("Accept", ""))
            self._send(200, content_type, encode(self.server.registry))
        elif path == "/status.json":
            body = json.dumps(self.server.status(), separators=(",", ":")).encode()
            self._send(200, "application/json", body)
        elif path in ("/", "/index.html") and self.server.page:
            self._send(200, "text/html; charset=utf-8", _page())
        else:
            self._send(404, "text/plain; charset=utf-8", b"not found: try "
                       + (b"/, " if self.server.page else b"") + b"/metrics or /status.json\n")

    def _send(self, status: int, content_type: str, body: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("%s " + format, self.client_address[0], *args)


class StatusServer:
    """Serves one registry and one status document (and, with `page`, the
    broker's status page). The constructor does no I/O: `start()` binds
    (raising OSError if it cannot) and starts the thread; `close()` stops it
    and releases the port."""

    def __init__(self, address: tuple[str, int], registry: CollectorRegistry,
                 status: Callable[[], dict[str, Any]], *, page: bool = True) -> None:
        self.address = address
        self.registry = registry
        self.status = status
        self.page = page
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    @property
    def _what(self) -> str:
        return "metrics and status page" if self.page else "metrics and status"

    @property
    def url(self) -> str:
        """The bound address, e.g. 'http://127.0.0.1:6790' (the port, once started)."""
        host, port = self.address
        return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"

    def start(self) -> None:
        family = socket.AF_INET6 if ":" in self.address[0] else socket.AF_INET
        server_class = type("_Server", (_Server,), {"address_family": family})
        try:
            server: _Server = server_class(self.address, _Handler)
        except OSError as exc:
            raise OSError(exc.errno, f"{self._what} at {self.url}: {exc.strerror}") from exc
        server.registry = self.registry
        server.status = self.status
        server.page = self.page
        self.address = (self.address[0], int(server.server_address[1]))
        self._server = server
        self._thread = threading.Thread(target=server.serve_forever, args=(0.1,),
                                        name="scale0-status", daemon=True)
        self._thread.start()
        if not _is_loopback(self.address[0]):
            log.warning("%s open to the network at %s", self._what, self.url)
        log.info("metrics at %s/metrics, status at %s/%s", self.url, self.url,
                 "" if self.page else "status.json")

    def close(self) -> None:
        if self._server is None:
            return
        self._server.shutdown()  # returns once serve_forever has (within its 0.1 s poll)
        self._server.server_close()
        if self._thread is not None:
            self._thread.join(5)
        self._server = None


def for_broker(broker: BrokerLike, address: tuple[str, int]) -> StatusServer:
    """A StatusServer for `broker`: registers the stats sink and turns on
    snapshot publishing. Call before `broker.run()`; `start()` it yourself."""
    stats = RequestStats()
    broker.add_done_sink(stats)
    broker.publish_snapshots = True
    registry = make_registry(stats, lambda: broker.snapshot)
    started = time.monotonic()
    pid = os.getpid()

    def status() -> dict[str, Any]:
        info = {"pid": pid, "endpoint": broker.endpoint,
                "uptime_s": round(time.monotonic() - started, 1)}
        return status_document(broker.snapshot, stats.totals(), info)

    return StatusServer(address, registry, status)


def _is_loopback(host: str) -> bool:
    return host in ("localhost", "::1") or host.startswith("127.")


@functools.cache
def _page() -> bytes:
    """The status page: one HTML file with inline CSS and JS, no external assets."""
    return files(__package__).joinpath("status.html").read_bytes()
