"""How a setting is declared and read: `Kind` (text and TOML -> value, checked),
`Spec` (the metadata `setting()` puts on a dataclass field) and the helpers
that read those fields back (`specs`, `flag`, `env_name`, `default`).

The declarations themselves are in config/declared.py; config/load.py
reads them from the command line, the environment and TOML.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import Field, dataclass, field, fields
from typing import Any

from scale0.core.routing import parse_route
from scale0.errors import ConfigError

ENV_PREFIX = "SCALE0_"
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


def _prefetch(value: int) -> int:
    if not 0 <= value <= 10_000:  # s0w1.MAX_PREFETCH: what a HELLO may announce
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
    from scale0.ops.accesslog import AccessLogError, check_format

    try:
        check_format(text)
    except AccessLogError as exc:
        raise Invalid(str(exc)) from exc
    return text



@dataclass(frozen=True, slots=True)
class LinkSpec:
    """One Mongrel2 handler: where it PUSHes requests and where it SUBscribes
    (the value of the broker's `mongrel2` setting; net/broker.py serves it)."""

    send_spec: str
    recv_spec: str  # "" (relay links only): the relay publishes our replies
    recv_ident: bytes = b""
    relay: bool = False  # requests come from a `scale0 relay` at send_spec

    @classmethod
    def parse(cls, text: str) -> LinkSpec:
        """'SEND_SPEC,RECV_SPEC[,RECV_IDENT]' as given on the command line;
        SEND_SPEC 'relay+tcp://...' names a relay instead of Mongrel2 itself,
        and 'relay+tcp://...' alone sends the replies through that relay."""
        parts = [part.strip() for part in text.split(",")]
        send, relay = parts[0], parts[0].startswith("relay+")
        if relay and len(parts) == 1 and send != "relay+":
            return cls(send.removeprefix("relay+"), "", b"", True)
        if len(parts) not in (2, 3) or not all(parts[:2]):
            raise ValueError(f"--mongrel2 {text!r}: expected SEND_SPEC,RECV_SPEC[,RECV_IDENT]"
                             " or relay+ENDPOINT")
        return cls(send.removeprefix("relay+"), parts[1],
                   parts[2].encode() if len(parts) == 3 else b"", relay)

    @property
    def replies_via_relay(self) -> bool:
        return self.relay and not self.recv_spec

    def __str__(self) -> str:
        send = f"relay+{self.send_spec}" if self.relay else self.send_spec
        return f"{send},{self.recv_spec}" if self.recv_spec else send


POSITIVE_INT = Kind("an integer > 0", (int,), int, _positive)
POSITIVE_FLOAT = Kind("a number > 0", (int, float), float, lambda v: float(_positive(v)))
NON_NEGATIVE_INT = Kind("an integer >= 0", (int,), int, _non_negative)
CAPACITY = Kind("an integer from 1 to 10000", (int,), int, _capacity)
PREFETCH = Kind("an integer from 0 to 10000", (int,), int, _prefetch)
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
    # The name of the field or keyword parameter it feeds in the internal
    # settings objects (config.build), when not the setting's own name:
    # the internal names carry their units (queue_timeout -> queue_timeout_s).
    to: str = ""


def setting(default: Any, help: str, kind: Kind = TEXT, **spec: Any) -> Any:
    """A settings field: `queue_size: int = setting(1024, "...", POSITIVE_INT)`."""
    return field(default=default, metadata={_META: Spec(help, kind, **spec)})



def specs(cls: type[Any]) -> Iterator[tuple[Field[Any], Spec]]:
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



def default(cls: type[Any], name: str) -> Any:
    """The declared default of setting `name` of `cls`: what an internal
    settings object outside config/ takes as its own default, so that each
    default is written once (config/declared.py)."""
    for f in fields(cls):
        if f.name == name and _META in f.metadata:
            return f.default
    raise KeyError(f"{cls.__name__} declares no setting {name!r}")
