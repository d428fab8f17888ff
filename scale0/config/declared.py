"""The settings of every command, declared once: one frozen dataclass per
command, each field made by `setting()` (config/kinds.py). Field order is
help order (a command's own settings first); shared settings by inheritance.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from scale0.config.kinds import (
    ACCESS_FORMAT,
    BOOL,
    CAPACITY,
    FORWARDED_ALLOW,
    HEADER_NAME,
    HEARTBEAT_S,
    KEY_DIR,
    LINK,
    METRICS_ADDRESS,
    NON_NEGATIVE_FLOAT,
    NON_NEGATIVE_INT,
    POSITIVE_FLOAT,
    POSITIVE_INT,
    PREFETCH,
    PUBLIC_KEY,
    RECV_SPEC,
    ROUTE,
    ROUTE_TO_SERVICE,
    SECRET_KEY,
    SERVICE_PAGE,
    SERVICE_SECONDS,
    LinkSpec,
    setting,
)
from scale0.core.dispatch import DispatchSettings
from scale0.errors import ConfigError
from scale0.ops.accesslog import DEFAULT_FORMAT as ACCESS_LOG_FORMAT
from scale0.ops.accesslog import FIELDS as ACCESS_LOG_FIELDS

LOG_LEVELS = ("debug", "info", "warning", "error")

# The broker's dispatch settings keep their defaults in core/dispatch.py:
# core/ may import nothing outside wire/ and core/ (tests/integration/test_purity.py),
# so it cannot read them from here; these declarations read them from there
# instead, and each default is still written once.
_D = DispatchSettings()

# Shared by the broker and the relay: each expires its peers by their own
# announced heartbeat x liveness, that heartbeat clamped to this.
def _max_peer_heartbeat() -> Any:
    """One declaration for the broker and the relay (a fresh field for each)."""
    return setting(
        _D.max_peer_heartbeat_s, "honour a peer's announced heartbeat (HELLO) up to this "
        "when expiring it (or our own heartbeat, if longer), so a peer announcing a huge one "
        "still expires", HEARTBEAT_S, metavar="SECONDS", to="max_peer_heartbeat_s")


@dataclass(frozen=True, slots=True)
class CommonConfig:
    log_level: str = setting("info", "logging threshold", choices=LOG_LEVELS)

    def check(self) -> None:
        """Rules across settings; raises ConfigError (message names the keys)."""


@dataclass(frozen=True, slots=True)
class PeerConfig(CommonConfig):
    heartbeat: float = setting(_D.heartbeat_s, "heartbeat interval (0.01 to 600)",
                               HEARTBEAT_S, metavar="SECONDS", to="heartbeat_s")
    liveness: int = setting(_D.liveness, "heartbeats missed before a peer is dead",
                            POSITIVE_INT, metavar="N")


@dataclass(frozen=True, slots=True)
class CurveServerConfig(PeerConfig):
    """A process whose --bind port may face other hosts (broker, relay)."""

    curve_secret: str | None = setting(
        None, "this process's own key (a .key_secret from `scale0 keygen`): CURVE on its "
        "--bind port", SECRET_KEY, metavar="FILE")
    authorized_keys: str | None = setting(
        None, "with curve_secret: folder of the public .key files of the peers that may "
        "connect, re-read on SIGHUP (none: no key may)", KEY_DIR, metavar="DIR")
    insecure: bool = setting(
        False, "allow --bind on an address other hosts reach without CURVE", BOOL)

    def check(self) -> None:
        bind = getattr(self, "bind", "")
        if self.curve_secret is None and self.authorized_keys is not None:
            raise ConfigError("authorized_keys (--authorized-keys) needs curve_secret "
                              "(--curve-secret)")
        if self.curve_secret is None and not self.insecure:
            from scale0.auth.keys import insecure_bind_error

            error = insecure_bind_error("bind", bind, "--curve-secret")
            if error:
                raise ConfigError(error)


@dataclass(frozen=True, slots=True)
class BrokerConfig(CurveServerConfig):
    mongrel2: tuple[LinkSpec, ...] = setting(
        (), "a Mongrel2 handler to serve; relay+ENDPOINT alone: through a relay that "
        "also carries the replies (docs/protocol.md Appendix B)", LINK, repeat=True,
        metavar="SEND_SPEC,RECV_SPEC[,RECV_IDENT]")
    mongrel2_db: str | None = setting(
        None, "serve the handlers of this Mongrel2 config.sqlite (added to --mongrel2)",
        metavar="PATH")
    handler: str | None = setting(
        None, "with --mongrel2-db: only the handler with this send_ident, or the one the "
        "route PATH or HOST/PATH leads to", metavar="NAME")
    bind: str = setting("tcp://127.0.0.1:6780", "ROUTER endpoint for workers",
                        metavar="ENDPOINT")
    route: tuple[tuple[str, str], ...] = setting(
        _D.routes, "a route-table entry", ROUTE_TO_SERVICE, repeat=True,
        metavar="[HOST]/PATH=SERVICE", to="routes")
    queue_size: int = setting(_D.queue_size, "requests waiting per service", POSITIVE_INT,
                              metavar="N")
    queue_timeout: float = setting(_D.queue_timeout_s, "longest wait for a free worker "
                                   "before 503", POSITIVE_FLOAT, metavar="SECONDS",
                                   to="queue_timeout_s")
    request_timeout: float = setting(_D.request_timeout_s, "longest wait for a worker's reply "
                                     "before 504", POSITIVE_FLOAT, metavar="SECONDS",
                                     to="request_timeout_s")
    retry_after: int = setting(_D.retry_after_s, "Retry-After sent with 503", POSITIVE_INT,
                               metavar="SECONDS", to="retry_after_s")
    max_body: int = setting(_D.max_body_bytes, "larger request bodies get 413", POSITIVE_INT,
                            metavar="BYTES", default_text="1073741824 (1 GiB)",
                            to="max_body_bytes")
    service_timeout: tuple[tuple[str, float], ...] = setting(
        _D.service_timeouts, "request timeout of one service", SERVICE_SECONDS, repeat=True,
        metavar="SERVICE=SECONDS", to="service_timeouts")
    maintenance_page: tuple[tuple[str, bytes], ...] = setting(
        _D.maintenance_pages, "HTML sent with the 503 while no worker of SERVICE is "
        "connected", SERVICE_PAGE, repeat=True, metavar="SERVICE=FILE", to="maintenance_pages")
    graceful_timeout: float = setting(30.0, "on SIGTERM, time to finish requests in progress",
                                      POSITIVE_FLOAT, metavar="SECONDS", to="graceful_timeout_s")
    control: str = setting(
        "auto", "control socket for `scale0 ctl`: ipc://PATH, 'auto' for "
        "RUNTIME_DIR/broker-PORT.ctl (docs/operating.md), 'off' for none", metavar="ENDPOINT")
    metrics: tuple[str, int] | None = setting(
        None, "serve Prometheus /metrics, /status.json and the status page / at "
        "[HOST:]PORT (HOST defaults to 127.0.0.1; 'off' for none)", METRICS_ADDRESS,
        metavar="[HOST:]PORT")
    access_log: str | None = setting(
        None, "write one line per finished request here: a file path (reopened when "
        "moved, for logrotate) or '-' for stderr", metavar="PATH")
    access_log_format: str = setting(
        ACCESS_LOG_FORMAT, "access log line, a Python str.format template over: "
        + ", ".join(ACCESS_LOG_FIELDS), ACCESS_FORMAT, metavar="TEMPLATE")
    upload_dir: str | None = setting(
        _D.upload_dir, "Mongrel2's upload.temp_store folder as seen here: each spooled request "
        "body is removed once its request is over (refused, answered, abandoned)",
        metavar="DIR")
    inline_body_max: int = setting(
        8 << 20, "with upload_dir: spooled request bodies up to this size are read here "
        "and sent inside the request, so workers need no shared disk for them (at most "
        "128 MiB of them held at once); larger ones reach only workers given --upload-dir "
        "(0: never)", NON_NEGATIVE_INT, metavar="BYTES", default_text="8388608 (8 MiB)")
    keepalive: float = setting(
        _D.keepalive_s, "send Mongrel2 a ctl keep-alive for requests waiting this long, and "
        "again as often, so its idle killer (min_ping) spares them", POSITIVE_FLOAT,
        metavar="SECONDS", to="keepalive_s")
    route_grace: float = setting(
        _D.route_grace_s, "keep a route whose last worker crashed or expired this long (503 with "
        "Retry-After meanwhile), then forget it; a route whose last worker left with BYE "
        "goes at once (0: always at once)", NON_NEGATIVE_FLOAT, metavar="SECONDS",
        to="route_grace_s")
    max_workers: int = setting(_D.max_workers, "workers registered at once; a HELLO past it "
                               "gets ERROR 429", POSITIVE_INT, metavar="N")
    max_services: int = setting(_D.max_services, "services known at once (configured and "
                                "announced); a HELLO past it gets ERROR 429", POSITIVE_INT,
                                metavar="N")
    max_routes: int = setting(_D.max_routes, "routes announced by workers (configured ones "
                              "not counted); a HELLO past it gets ERROR 429", POSITIVE_INT,
                              metavar="N")
    eject_after: int = setting(
        _D.eject_after, "eject a worker after this many request timeouts (504) in a row: no new "
        "requests, its slots not counted, until the ejection ends (0: never)",
        NON_NEGATIVE_INT, metavar="N")
    eject_time: float = setting(
        _D.eject_s, "how long an ejection lasts, times the worker's ejections since its last "
        "reply in time (at most 10x)", POSITIVE_FLOAT, metavar="SECONDS", to="eject_s")
    recall_after: float = setting(
        _D.recall_after_s, "a worker holding prefetched requests (a worker's --prefetch) that "
        "has finished nothing for this long is stalled: what waits there is recalled and "
        "sent to a free worker, and nothing more is sent to wait there", POSITIVE_FLOAT,
        metavar="SECONDS", to="recall_after_s")
    max_peer_heartbeat: float = _max_peer_heartbeat()
    websocket_idle_timeout: float = setting(
        _D.websocket_idle_timeout_s, "close a WebSocket (1001) with no frame either way for "
        "this long; its handshake waits as long for the app's accept", POSITIVE_FLOAT,
        metavar="SECONDS", to="websocket_idle_timeout_s")
    relay_key: str | None = setting(
        None, "the relay's public .key: CURVE on relay+tcp:// links, with curve_secret as "
        "this broker's key", PUBLIC_KEY, metavar="FILE")

    def check(self) -> None:
        CurveServerConfig.check(self)
        if self.relay_key is not None and self.curve_secret is None:
            raise ConfigError("relay_key (--relay-key) needs curve_secret (--curve-secret): "
                              "this broker's own key")
        if not self.mongrel2 and self.mongrel2_db is None:
            raise ConfigError("no Mongrel2 to serve: set mongrel2 (--mongrel2, "
                              "SCALE0_MONGREL2) or mongrel2_db (--mongrel2-db)")
        if self.handler is not None and self.mongrel2_db is None:
            raise ConfigError("handler: needs mongrel2_db (--mongrel2-db)")


@dataclass(frozen=True, slots=True)
class WorkerCurveConfig(PeerConfig):
    """Every worker command (`scale0 wsgi`, an ASGI one): CURVE to its brokers."""

    curve_secret: str | None = setting(
        None, "this worker's own key (a .key_secret from `scale0 keygen`): CURVE to the "
        "brokers", SECRET_KEY, metavar="FILE")
    broker_key: str | None = setting(
        None, "the brokers' public .key; needed with curve_secret", PUBLIC_KEY,
        metavar="FILE")

    def check(self) -> None:
        if (self.curve_secret is None) != (self.broker_key is None):
            raise ConfigError("curve_secret (--curve-secret) and broker_key (--broker-key) "
                              "go together")


@dataclass(frozen=True, slots=True)
class PoolConfig(WorkerCurveConfig):
    """The settings `scale0 wsgi` and `scale0 asgi` share."""

    connect: tuple[str, ...] = setting((), "broker endpoint", repeat=True,
                                       required=True, metavar="ENDPOINT")
    service: str | None = setting(None, "service name", metavar="NAME",
                                  default_text="the app's module name")
    route: tuple[str, ...] = setting(
        (), "a route this service serves ('/api' means any host)", ROUTE,
        repeat=True, metavar="[HOST]/PATH")
    processes: int = setting(1, "pre-forked worker processes", POSITIVE_INT, metavar="N")
    upload_dir: str | None = setting(
        None, "Mongrel2's upload.temp_store folder, for large request bodies", metavar="DIR")
    graceful_timeout: float = setting(30.0, "time to finish in-flight requests on SIGTERM",
                                      POSITIVE_FLOAT, metavar="SECONDS", to="graceful_timeout_s")
    chdir: str | None = setting(None, "change to DIR before loading the app", metavar="DIR")
    max_requests: int = setting(
        0, "replace a process after about N requests: its replacement starts and "
        "announces, then it drains (0: never)", NON_NEGATIVE_INT, metavar="N")
    max_requests_jitter: int = setting(
        0, "add random(0..J) to each process's max_requests, so they do not all recycle "
        "at once", NON_NEGATIVE_INT, metavar="J")
    timeout: float = setting(
        0.0, "kill and replace a process stuck this long in one request, or whose loop "
        "stalls this long (0: off; set it above the broker's request_timeout)",
        NON_NEGATIVE_FLOAT, metavar="SECONDS", to="timeout_s")
    forwarded_allow_ips: str = setting(
        "127.0.0.1,::1", "Mongrel2 peers (a load balancer, a TLS front) whose "
        "X-Forwarded-Proto and client-address header are believed: addresses or "
        "networks, comma-separated, or * for any", FORWARDED_ALLOW, metavar="ADDRESSES")
    client_address_header: str = setting(
        "X-Real-IP", "from those peers, the header whose address becomes REMOTE_ADDR "
        "(Mongrel2 overwrites X-Forwarded-For unless no_clobber_xff)", HEADER_NAME,
        metavar="HEADER")


def default_service(app: str) -> str:
    """The service name of a pool given none: the app's module, last part
    ('pkg.web:app' -> 'web')."""
    return app.partition(":")[0].rsplit(".", 1)[-1]


@dataclass(frozen=True, slots=True)
class WsgiConfig(PoolConfig):
    app: str = setting("", "the WSGI app: module:attr, module:factory() or module "
                       "(its `application` or `app`)", positional=True, required=True,
                       metavar="MODULE:APP")
    threads: int = setting(1, "requests handled at once per process", POSITIVE_INT,
                           metavar="N", to="capacity")
    prefetch: int = setting(
        8, "GET, HEAD and OPTIONS requests that may wait at each thread behind the one it "
        "runs, sent by a broker only while every thread of the service is busy, and "
        "recalled to a free one if this thread stalls (0: none; docs/operating.md)",
        PREFETCH, metavar="N")


@dataclass(frozen=True, slots=True)
class AsgiConfig(PoolConfig):
    app: str = setting("", "the ASGI app: module:attr, module:factory() or module "
                       "(its `application` or `app`)", positional=True, required=True,
                       metavar="MODULE:APP")
    concurrency: int = setting(
        100, "requests and WebSockets in flight at once per process (the capacity "
        "announced to brokers)", CAPACITY, metavar="N")
    lifespan: str = setting("auto", "ASGI lifespan: 'auto' runs it if the app supports it, "
                            "'on' requires it, 'off' skips it", choices=("auto", "on", "off"))
    websocket_max_size: int = setting(
        16 << 20, "largest WebSocket message taken from a client, in bytes (a bigger one "
        "closes the WebSocket with 1009)", POSITIVE_INT, metavar="BYTES")


@dataclass(frozen=True, slots=True)
class RelayConfig(CurveServerConfig):
    mongrel2: str = setting("", "the Mongrel2 handler's send_spec to PULL from", required=True,
                            metavar="SEND_SPEC", to="send_spec")
    bind: str = setting("tcp://127.0.0.1:6781", "ROUTER endpoint brokers connect to, as "
                        "--mongrel2 relay+ENDPOINT,RECV_SPEC", metavar="ENDPOINT")
    mongrel2_recv: tuple[str, bytes] | None = setting(
        None, "the handler's recv_spec (and recv_ident, if it has one): the relay PUBlishes "
        "there to close the client connections of a broker that died, so their clients "
        "do not wait for a reply that cannot come, and the replies of brokers linked as "
        "relay+ENDPOINT alone", RECV_SPEC,
        metavar="RECV_SPEC[,RECV_IDENT]")
    max_peer_heartbeat: float = _max_peer_heartbeat()
    metrics: tuple[str, int] | None = setting(
        None, "serve Prometheus /metrics and /status.json (brokers, connections, held "
        "replies, counters) at [HOST:]PORT (HOST defaults to 127.0.0.1; 'off' for none)",
        METRICS_ADDRESS, metavar="[HOST:]PORT")


@dataclass(frozen=True, slots=True)
class UpConfig(CommonConfig):
    exit_with_parent: bool = setting(
        False, "stop the stack when the parent process dies (as under `make run`)", BOOL)



COMMANDS: dict[str, type[CommonConfig]] = {
    "broker": BrokerConfig, "wsgi": WsgiConfig, "asgi": AsgiConfig, "relay": RelayConfig,
    "up": UpConfig}
