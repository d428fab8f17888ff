"""One declared settings source for `scale0 broker`, `scale0 wsgi` and `scale0 up`.

Theory of operation: each command's settings are one frozen dataclass whose
fields are made by `setting()`: a default, a help text and a `Kind` (how a
value is read from text and from TOML, and what it must be). Everything else
is generated from those fields, with the field name as the one name:

    field queue_size  ->  flag --queue-size, TOML key queue_size,
                          environment variable SCALE0_QUEUE_SIZE

`resolve()` merges defaults < file (`--config FILE`, TOML, top-level keys)
< environment < command line, and builds the dataclass. A repeatable setting
is a list in TOML, whitespace-separated in the environment, a repeated flag on
the command line; a source that sets it replaces the whole list of the lower
ones. Flags default to argparse.SUPPRESS so that only what the command line
really set is in the namespace; the help text carries the real default.

Every bad input is a `ConfigError` naming where it came from and the key
(`broker.toml: queue_size: expected an integer > 0, got 'abc'`), raised before
anything starts. Relative paths mean the same in every source: relative to the
working directory.

Adding a setting is one declaration in the dataclass; `cli.py` then reads it
from the resolved object. `python -m scale0.config --markdown` prints the
settings tables.
"""

from __future__ import annotations

import argparse
import difflib
import math
import sys
import tomllib
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import Field, dataclass, field, fields
from pathlib import Path
from typing import Any, TypeVar

from scale0.core.routing import parse_route
from scale0.errors import ConfigError as ConfigError  # re-exported: callers import it here
from scale0.net.broker import LinkSpec
from scale0.ops.accesslog import DEFAULT_FORMAT as ACCESS_LOG_FORMAT
from scale0.ops.accesslog import FIELDS as ACCESS_LOG_FIELDS
from scale0.ops.accesslog import AccessLogError, check_format

ENV_PREFIX = "SCALE0_"
LOG_LEVELS = ("debug", "info", "warning", "error")
_META = "scale0"


class Invalid(ConfigError):
    """Raised by a Kind with a reason of its own, used as is in the error."""


@dataclass(frozen=True, slots=True)
class Kind:
    """How one value (one item of a repeatable setting) is read.

    Text (command line, environment) goes through `from_text`; a TOML value
    must be one of `toml` (a bool is never taken for an int). `check` then
    validates and converts. A plain ValueError from either becomes
    "expected <expected>, got <value>"; an `Invalid` keeps its own reason.
    """

    expected: str
    toml: tuple[type, ...]
    from_text: Callable[[str], Any]
    check: Callable[[Any], Any] = lambda value: value

    def read(self, value: Any) -> Any:
        if isinstance(value, str) and str not in self.toml:
            value = self.from_text(value)
        elif not isinstance(value, self.toml) or (isinstance(value, bool)
                                                  and bool not in self.toml):
            raise ValueError(value)
        return self.check(value)


def _positive(value: int | float) -> int | float:
    if not value > 0 or not math.isfinite(value):
        raise ValueError(value)
    return value


def _non_negative(value: int | float) -> int | float:
    if not value >= 0 or not math.isfinite(value):
        raise ValueError(value)
    return value


def _capacity(value: int) -> int:
    if not 1 <= value <= 10_000:  # protocol.MAX_CAPACITY: what a HELLO may announce
        raise ValueError(value)
    return value


def _text(value: str) -> str:
    if not value:
        raise ValueError(value)
    return value


_BOOL_WORDS = {"1": True, "true": True, "yes": True, "on": True,
               "0": False, "false": False, "no": False, "off": False}


def _bool(text: str) -> bool:
    try:
        return _BOOL_WORDS[text.strip().lower()]
    except KeyError:
        raise ValueError(text) from None


def _route_to_service(text: str) -> tuple[str, str]:
    spec, sep, service = text.rpartition("=")
    if not sep or not spec or not service:
        raise ValueError(text)
    try:
        parse_route(spec)
    except ValueError as exc:
        raise Invalid(f"{text!r}: {exc}") from exc
    return spec, service


def _route(text: str) -> str:
    try:
        parse_route(text)
    except ValueError as exc:
        raise Invalid(f"{text!r}: {exc}") from exc
    return text


def _service_seconds(text: str) -> tuple[str, float]:
    name, sep, value = text.partition("=")
    seconds = float(value)  # ValueError: the generic message
    if not sep or not name or not seconds > 0 or not math.isfinite(seconds):
        raise ValueError(text)
    return name, seconds


def _service_page(text: str) -> tuple[str, bytes]:
    """SERVICE=FILE, read now so that a missing page stops the start."""
    name, sep, path = text.partition("=")
    if not sep or not name or not path:
        raise ValueError(text)
    try:
        with open(path, "rb") as page:
            return name, page.read()
    except OSError as exc:
        raise Invalid(f"maintenance page of {name}: {path}: {exc.strerror}") from exc


def _metrics_address(text: str) -> tuple[str, int] | None:
    from scale0.ops.status import parse_address  # prometheus_client only when asked for

    try:
        return parse_address(text)
    except ValueError as exc:
        raise Invalid(str(exc)) from exc


def _forwarded_allow(text: str) -> str:
    from scale0.core.forwarded import parse_allow

    try:
        parse_allow(text)
    except ValueError as exc:
        raise Invalid(f"forwarded_allow_ips: {exc}") from exc
    return text


def _header_name(text: str) -> str:
    from scale0.core.forwarded import trust

    try:
        trust(client_header=text)
    except ValueError as exc:
        raise Invalid(str(exc)) from exc
    return text


def _access_format(text: str) -> str:
    try:
        check_format(text)
    except AccessLogError as exc:
        raise Invalid(str(exc)) from exc
    return text


POSITIVE_INT = Kind("an integer > 0", (int,), int, _positive)
POSITIVE_FLOAT = Kind("a number > 0", (int, float), float, lambda v: float(_positive(v)))
NON_NEGATIVE_INT = Kind("an integer >= 0", (int,), int, _non_negative)
CAPACITY = Kind("an integer from 1 to 10000", (int,), int, _capacity)
NON_NEGATIVE_FLOAT = Kind("a number >= 0", (int, float), float,
                          lambda v: float(_non_negative(v)))
def _heartbeat_s(value: int | float) -> float:
    # wire/s0w1.py: HELLO and WELCOME carry it in ms, 10 to 600000.
    if not 0.01 <= float(value) <= 600:
        raise ValueError(value)
    return float(value)


HEARTBEAT_S = Kind("a number of seconds from 0.01 to 600", (int, float), float, _heartbeat_s)


def _recv_spec(text: str) -> tuple[str, bytes]:
    spec, _, ident = text.partition(",")
    if not spec.strip() or "," in ident:
        raise ValueError(text)
    return spec.strip(), ident.strip().encode()


RECV_SPEC = Kind("RECV_SPEC[,RECV_IDENT]", (), _recv_spec)
TEXT = Kind("a non-empty string", (str,), _text, _text)
BOOL = Kind("true or false", (bool,), _bool)
LINK = Kind("SEND_SPEC,RECV_SPEC[,RECV_IDENT]", (), LinkSpec.parse)
ROUTE_TO_SERVICE = Kind("[HOST]/PATH=SERVICE", (), _route_to_service)
ROUTE = Kind("[HOST]/PATH", (), _route)
SERVICE_SECONDS = Kind("SERVICE=SECONDS (seconds > 0)", (), _service_seconds)
SERVICE_PAGE = Kind("SERVICE=FILE", (), _service_page)
METRICS_ADDRESS = Kind("[HOST:]PORT or off", (str, int), lambda text: _metrics_address(text),
                       lambda value: _metrics_address(str(value)))
ACCESS_FORMAT = Kind("a str.format template", (str,), _access_format, _access_format)
FORWARDED_ALLOW = Kind("IP addresses or networks, comma-separated, or *", (str,),
                       _forwarded_allow, _forwarded_allow)
HEADER_NAME = Kind("a header name", (str,), _header_name, _header_name)


def _key_file(secret: bool) -> Callable[[str], str]:
    """A certificate path, checked now so that a bad key stops the start."""
    def check(path: str) -> str:
        from scale0.auth.keys import KeyFileError, load_public, load_secret

        try:
            load_secret(path) if secret else load_public(path)
        except KeyFileError as exc:
            raise Invalid(str(exc)) from exc
        return path
    return check


def _key_dir(path: str) -> str:
    from scale0.auth.keys import KeyFileError
    from scale0.auth.zap import Authorizer

    try:
        Authorizer(path).load()
    except KeyFileError as exc:
        raise Invalid(str(exc)) from exc
    return path


SECRET_KEY = Kind("a .key_secret file (scale0 keygen)", (str,), _key_file(True),
                  _key_file(True))
PUBLIC_KEY = Kind("a .key file (scale0 keygen)", (str,), _key_file(False), _key_file(False))
KEY_DIR = Kind("a folder of .key files", (str,), _key_dir, _key_dir)


@dataclass(frozen=True, slots=True)
class Spec:
    """The metadata `setting()` stores on a dataclass field."""

    help: str
    kind: Kind
    metavar: str | None = None
    repeat: bool = False  # a list: repeated flag, TOML array, whitespace-separated env
    choices: tuple[str, ...] = ()
    required: bool = False  # must come from some source (the default is a placeholder)
    positional: bool = False  # a positional argument on the command line
    default_text: str | None = None  # for the help, when str(default) does not say it


def setting(default: Any, help: str, kind: Kind = TEXT, **spec: Any) -> Any:
    """A settings field: `queue_size: int = setting(1024, "...", POSITIVE_INT)`."""
    return field(default=default, metadata={_META: Spec(help, kind, **spec)})


# Settings: one frozen dataclass per command; shared ones by inheritance.
# Field order is help order (a command's own settings first).

# Shared by the broker and the relay: each expires its peers by their own
# announced heartbeat x liveness, that heartbeat clamped to this.
def _max_peer_heartbeat() -> Any:
    """One declaration for the broker and the relay (a fresh field for each)."""
    return setting(
        30.0, "honour a peer's announced heartbeat (HELLO) up to this when expiring it "
        "(or our own heartbeat, if longer), so a peer announcing a huge one still expires",
        HEARTBEAT_S, metavar="SECONDS")


@dataclass(frozen=True, slots=True)
class CommonConfig:
    log_level: str = setting("info", "logging threshold", choices=LOG_LEVELS)

    def check(self) -> None:
        """Rules across settings; raises ConfigError (message names the keys)."""


@dataclass(frozen=True, slots=True)
class PeerConfig(CommonConfig):
    heartbeat: float = setting(1.0, "heartbeat interval (0.01 to 600)", HEARTBEAT_S,
                               metavar="SECONDS")
    liveness: int = setting(3, "heartbeats missed before a peer is dead", POSITIVE_INT,
                            metavar="N")


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
        (), "a route-table entry", ROUTE_TO_SERVICE, repeat=True,
        metavar="[HOST]/PATH=SERVICE")
    queue_size: int = setting(1024, "requests waiting per service", POSITIVE_INT, metavar="N")
    queue_timeout: float = setting(10.0, "longest wait for a free worker before 503",
                                   POSITIVE_FLOAT, metavar="SECONDS")
    request_timeout: float = setting(60.0, "longest wait for a worker's reply before 504",
                                     POSITIVE_FLOAT, metavar="SECONDS")
    retry_after: int = setting(5, "Retry-After sent with 503", POSITIVE_INT, metavar="SECONDS")
    max_body: int = setting(1 << 30, "larger request bodies get 413", POSITIVE_INT,
                            metavar="BYTES", default_text="1073741824 (1 GiB)")
    service_timeout: tuple[tuple[str, float], ...] = setting(
        (), "request timeout of one service", SERVICE_SECONDS, repeat=True,
        metavar="SERVICE=SECONDS")
    maintenance_page: tuple[tuple[str, bytes], ...] = setting(
        (), "HTML sent with the 503 while no worker of SERVICE is connected",
        SERVICE_PAGE, repeat=True, metavar="SERVICE=FILE")
    graceful_timeout: float = setting(30.0, "on SIGTERM, time to finish requests in progress",
                                      POSITIVE_FLOAT, metavar="SECONDS")
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
        None, "Mongrel2's upload.temp_store folder as seen here: each spooled request "
        "body is removed once its request is over (refused, answered, abandoned)",
        metavar="DIR")
    inline_body_max: int = setting(
        8 << 20, "with upload_dir: spooled request bodies up to this size are read here "
        "and sent inside the request, so workers need no shared disk for them (at most "
        "128 MiB of them held at once); larger ones reach only workers given --upload-dir "
        "(0: never)", NON_NEGATIVE_INT, metavar="BYTES", default_text="8388608 (8 MiB)")
    keepalive: float = setting(
        30.0, "send Mongrel2 a ctl keep-alive for requests waiting this long, and again as "
        "often, so its idle killer (min_ping) spares them", POSITIVE_FLOAT, metavar="SECONDS")
    route_grace: float = setting(
        30.0, "keep a route whose last worker crashed or expired this long (503 with "
        "Retry-After meanwhile), then forget it; a route whose last worker left with BYE "
        "goes at once (0: always at once)", NON_NEGATIVE_FLOAT, metavar="SECONDS")
    max_workers: int = setting(4096, "workers registered at once; a HELLO past it gets "
                               "ERROR 429", POSITIVE_INT, metavar="N")
    max_services: int = setting(256, "services known at once (configured and announced); "
                                "a HELLO past it gets ERROR 429", POSITIVE_INT, metavar="N")
    max_routes: int = setting(4096, "routes announced by workers (configured ones not "
                              "counted); a HELLO past it gets ERROR 429", POSITIVE_INT,
                              metavar="N")
    eject_after: int = setting(
        3, "eject a worker after this many request timeouts (504) in a row: no new "
        "requests, its slots not counted, until the ejection ends (0: never)",
        NON_NEGATIVE_INT, metavar="N")
    eject_time: float = setting(
        30.0, "how long an ejection lasts, times the worker's ejections since its last "
        "reply in time (at most 10x)", POSITIVE_FLOAT, metavar="SECONDS")
    max_peer_heartbeat: float = _max_peer_heartbeat()
    websocket_idle_timeout: float = setting(
        300.0, "close a WebSocket (1001) with no frame either way for this long; its "
        "handshake waits as long for the app's accept", POSITIVE_FLOAT, metavar="SECONDS")
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
                                      POSITIVE_FLOAT, metavar="SECONDS")
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
        NON_NEGATIVE_FLOAT, metavar="SECONDS")
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
                           metavar="N")


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
                            metavar="SEND_SPEC")
    bind: str = setting("tcp://127.0.0.1:6781", "ROUTER endpoint brokers connect to, as "
                        "--mongrel2 relay+ENDPOINT,RECV_SPEC", metavar="ENDPOINT")
    mongrel2_recv: tuple[str, bytes] | None = setting(
        None, "the handler's recv_spec (and recv_ident, if it has one): the relay PUBlishes "
        "there to close the client connections of a broker that died, so their clients "
        "do not wait for a reply that cannot come, and the replies of brokers linked as "
        "relay+ENDPOINT alone", RECV_SPEC,
        metavar="RECV_SPEC[,RECV_IDENT]")
    max_peer_heartbeat: float = _max_peer_heartbeat()


@dataclass(frozen=True, slots=True)
class UpConfig(CommonConfig):
    exit_with_parent: bool = setting(
        False, "stop the stack when the parent process dies (as under `make run`)", BOOL)


C = TypeVar("C", bound=CommonConfig)


def specs(cls: type[CommonConfig]) -> Iterator[tuple[Field[Any], Spec]]:
    """The settings of `cls`, in help order: its own first, then inherited ones."""
    all_fields = [f for f in fields(cls) if _META in f.metadata]
    order = {name: depth for depth, klass in enumerate(cls.__mro__)
             for name in vars(klass).get("__annotations__", {})}
    for f in sorted(all_fields, key=lambda f: order.get(f.name, 0)):
        yield f, f.metadata[_META]


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def env_name(name: str) -> str:
    return ENV_PREFIX + name.upper()


def help_note(f: Field[Any], spec: Spec) -> str:
    """'default: 1024', 'required', 'repeatable; default: none'."""
    note = "required" if spec.required else f"default: {default_text(f, spec)}"
    return f"repeatable; {note}" if spec.repeat else note


def default_text(f: Field[Any], spec: Spec) -> str:
    if spec.required:
        return "required"
    if spec.default_text is not None:
        return spec.default_text
    if f.default is None or f.default == ():
        return "none"
    if isinstance(f.default, bool):
        return str(f.default).lower()
    return str(f.default)


# -- the three sources ------------------------------------------------------

def add_arguments(parser: argparse.ArgumentParser, cls: type[CommonConfig], *,
                  settings_file: bool = True) -> None:
    """Flags for every setting of `cls` (and --config FILE when `settings_file`)."""
    if settings_file:
        parser.add_argument("--config", metavar="FILE", default=argparse.SUPPRESS,
                            help="a TOML file of these settings (top-level keys named "
                                 "like the settings below)")
    for f, spec in specs(cls):
        help_text = f"{spec.help} ({help_note(f, spec)})".replace("%", "%%")
        kw: dict[str, Any] = {"default": argparse.SUPPRESS, "help": help_text}
        if spec.kind is BOOL:
            parser.add_argument(flag(f.name), action=argparse.BooleanOptionalAction, **kw)
            continue
        kw.update(type=_arg_type(spec, f.name), metavar=spec.metavar)
        if spec.choices:
            kw.update(choices=spec.choices, metavar=None)
        if spec.positional:
            parser.add_argument(f.name, nargs="?", **kw)
        else:
            parser.add_argument(flag(f.name), action="append" if spec.repeat else "store",
                                **kw)
    example = next(f.name for f, _ in specs(cls))
    if settings_file:
        parser.epilog = (
            f"Each setting may also come from the --config file (key: the setting's name, "
            f"e.g. {example}) or from the environment ({env_name(example)}; lists "
            "whitespace-separated). Precedence: default < file < environment < command line.")
    else:
        parser.epilog = (f"Each setting may also come from the environment "
                         f"({env_name(example)}); the command line wins.")


def _arg_type(spec: Spec, name: str) -> Callable[[str], Any]:
    def parse(text: str) -> Any:
        try:
            return _read(spec, text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(_reason(spec, exc, text)) from exc
    parse.__name__ = name  # argparse names the type in some errors
    return parse


def from_args(cls: type[CommonConfig], args: argparse.Namespace) -> dict[str, Any]:
    """What the command line set (flags default to SUPPRESS: absent means not given)."""
    out: dict[str, Any] = {}
    for f, spec in specs(cls):
        if hasattr(args, f.name):
            value = getattr(args, f.name)
            out[f.name] = tuple(value) if spec.repeat else value
    return out


def from_env(cls: type[CommonConfig], environ: Mapping[str, str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for f, spec in specs(cls):
        name = env_name(f.name)
        if name in environ:
            text = environ[name]
            out[f.name] = _convert(spec, text.split() if spec.repeat else text,
                                   f"environment {name}")
    return out


def read_file(path: str | Path) -> dict[str, Any]:
    """The TOML document at `path`, or ConfigError naming the file."""
    try:
        with open(path, "rb") as handle:
            return tomllib.load(handle)
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the settings file: {exc.strerror}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from exc


def from_mapping(cls: type[CommonConfig], data: Mapping[str, Any],
                 source: str) -> dict[str, Any]:
    """Checked and converted values of a TOML table whose keys are settings of `cls`."""
    known = {f.name: spec for f, spec in specs(cls)}
    out: dict[str, Any] = {}
    for key, value in data.items():
        if key not in known:
            raise ConfigError(unknown(source, key, known))
        out[key] = _convert(known[key], value, f"{source}: {key}")
    return out


def unknown(source: str, key: str, known: Iterable[str]) -> str:
    """The 'unknown setting' message, with the nearest known name if one is close."""
    close = difflib.get_close_matches(key, list(known), n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return f"{source}: unknown setting {key!r}{hint}"


def resolve(cls: type[C], args: argparse.Namespace, environ: Mapping[str, str]) -> C:
    """defaults < file (args.config) < environment < command line; then `check()`."""
    values: dict[str, Any] = {}
    path = getattr(args, "config", None)
    if path is not None:
        values.update(from_mapping(cls, read_file(path), str(path)))
    values.update(from_env(cls, environ))
    values.update(from_args(cls, args))
    for f, spec in specs(cls):
        if spec.required and not values.get(f.name):
            where = (spec.metavar or f.name) if spec.positional else flag(f.name)
            raise ConfigError(f"missing setting {f.name!r}: give {where}, "
                              f"{env_name(f.name)} or {f.name} in the --config file")
    config = cls(**values)
    config.check()
    return config


def env_warnings(environ: Mapping[str, str], *classes: type[CommonConfig]) -> list[str]:
    """SCALE0_* variables close to, but not, a setting name: likely typos. Other
    SCALE0_* names are left alone (tools and tests use some of their own)."""
    names = {env_name(f.name) for cls in classes for f, _ in specs(cls)}
    out = []
    for name in sorted(environ):
        if name.startswith(ENV_PREFIX) and name not in names:
            close = difflib.get_close_matches(name, sorted(names), n=1, cutoff=0.85)
            if close:
                out.append(f"environment {name} is not a setting (did you mean {close[0]}?)")
    return out


def to_argv(cls: type[CommonConfig], data: Mapping[str, Any]) -> list[str]:
    """Command-line arguments for a TOML table already checked by `from_mapping`:
    how `scale0 up` passes a [[broker]] or [[pool]] table to its process."""
    known = {f.name: spec for f, spec in specs(cls)}
    head: list[str] = []
    argv: list[str] = []
    for key, value in data.items():
        spec = known[key]
        if spec.positional:
            head.append(_arg_text(value))
        elif spec.kind is BOOL:
            argv.append(flag(key) if value else "--no-" + flag(key)[2:])
        else:
            for item in (value if spec.repeat else [value]):
                argv.append(f"{flag(key)}={_arg_text(item)}")
    return head + argv


def _arg_text(value: Any) -> str:
    return repr(value) if isinstance(value, float) else str(value)


# -- reading one value ------------------------------------------------------

def _convert(spec: Spec, value: Any, where: str) -> Any:
    if spec.repeat:
        if not isinstance(value, list):
            raise ConfigError(f"{where}: expected a list of {spec.kind.expected}, "
                              f"got {value!r}")
        items = []
        for item in value:
            try:
                items.append(_read(spec, item))
            except ValueError as exc:
                raise ConfigError(f"{where}: {_reason(spec, exc, item)}") from exc
        return tuple(items)
    try:
        return _read(spec, value)
    except ValueError as exc:
        raise ConfigError(f"{where}: {_reason(spec, exc, value)}") from exc


def _read(spec: Spec, value: Any) -> Any:
    kind = spec.kind
    if not kind.toml:  # parsed from text only: a TOML value must be a string
        if not isinstance(value, str):
            raise ValueError(value)
        return kind.from_text(value)
    result = kind.read(value)
    if spec.choices and result not in spec.choices:
        raise Invalid(f"expected one of {', '.join(spec.choices)}, got {value!r}")
    return result


def _reason(spec: Spec, exc: ValueError, value: Any) -> str:
    if isinstance(exc, Invalid):
        return str(exc)
    expected = f"one of {', '.join(spec.choices)}" if spec.choices else spec.kind.expected
    return f"expected {expected}, got {value!r}"


# -- documentation ----------------------------------------------------------

COMMANDS: dict[str, type[CommonConfig]] = {
    "broker": BrokerConfig, "wsgi": WsgiConfig, "asgi": AsgiConfig, "relay": RelayConfig,
    "up": UpConfig}


def markdown() -> str:
    """The settings tables of every command, for docs/operating.md."""
    lines = []
    for command, cls in COMMANDS.items():
        lines += [f"### `scale0 {command}`", "",
                  "| setting (TOML key) | flag | environment | default | meaning |",
                  "|---|---|---|---|---|"]
        for f, spec in specs(cls):
            arg = spec.metavar or (f"{{{','.join(spec.choices)}}}" if spec.choices else "")
            cli = arg if spec.positional else f"{flag(f.name)} {arg}".strip()
            if spec.kind is BOOL:
                cli = f"{flag(f.name)}, --no-{flag(f.name)[2:]}"
            meaning = spec.help.replace("|", "\\|") + (" (repeatable)" if spec.repeat else "")
            default = "required" if spec.required else default_text(f, spec)
            lines.append(f"| `{f.name}` | `{cli}` | `{env_name(f.name)}` | {default} | "
                         f"{meaning} |")
        lines.append("")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m scale0.config")
    parser.add_argument("--markdown", action="store_true", help="print the settings tables")
    args = parser.parse_args(argv)
    if not args.markdown:
        parser.print_help()
        return 2
    sys.stdout.write(markdown())
    return 0


if __name__ == "__main__":
    sys.exit(main())
