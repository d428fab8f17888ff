"""Broker <-> worker wire protocol (S0W1), sans-IO. See docs/protocol.md.

Every message is one ZeroMQ multipart message. On the worker's DEALER it is
``[VERSION, COMMAND, *args]``; the broker's ROUTER sees the worker's routing
id in front. COMMAND is one byte. Frames stay bytes: a request's Mongrel2
message and a reply's Mongrel2 messages are forwarded unchanged (no
re-encoding on the hot path). Only the HELLO/WELCOME/ERROR payloads are JSON,
sent once per connection.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass, field
from enum import IntEnum

from scale0.errors import ProtocolError

VERSION = b"S0W1"


class Command(IntEnum):
    HELLO = 0x01  # W->B [json Hello]
    REQUEST = 0x02  # B->W [request_id, service, script_name, mongrel2 message]
    REPLY = 0x03  # W->B [request_id, flags, *mongrel2 messages]
    HEARTBEAT = 0x04  # both ways, no args
    BYE = 0x05  # W->B: leaving now. B->W: you are unknown, say HELLO again
    DRAIN = 0x06  # W->B: take no new requests. B->W: please drain and leave
    CANCEL = 0x07  # B->W [request_id]: client gone or timed out, drop the reply
    CREDIT = 0x08  # B->W [request_id, decimal bytes]: Mongrel2 wrote these bytes
    WELCOME = 0x09  # B->W [json {"broker": id, "heartbeat_ms": n}]
    ERROR = 0x0A  # B->W [decimal code, text]: the last message was refused
    FRAME = 0x0B  # B->W [request_id, mongrel2 message]: a later message of a WebSocket
    BODY = 0x0C  # B->W [request_id, flags, bytes]: the next piece of the request body
    READ = 0x0D  # W->B [request_id, decimal bytes]: let this many more body bytes come
    RECALL = 0x0E  # B->W [request_id]: give this request back if it has not started
    RETURN = 0x0F  # W->B [request_id]: a recalled request, never started: it is the broker's


# One-byte frames, built once: the hot path compares and sends these.
CMD = {c: bytes([c]) for c in Command}

# REPLY flags: bit 0 = this is the last reply for the request (its slot is free).
FLAG_MORE = b"\x00"
FLAG_LAST = b"\x01"

# ERROR codes (HTTP-like, so operators read them at a glance).
# BODY flags: bit 0 = the body ends with this piece.
BODY_MORE = b"\x00"
BODY_END = b"\x01"

ERR_BAD_VERSION = 505
ERR_BAD_MESSAGE = 400
ERR_ROUTE_OWNED = 409  # HELLO: a route it announces belongs to another service
ERR_LIMIT = 429  # HELLO: the broker is at max_workers, max_services or max_routes

_ID = struct.Struct(">Q")


class WireError(ProtocolError, ValueError):
    """A malformed S0W1 message. `code` is the ERROR code to answer the peer
    with; `status_hint` (502: a bad message from the other side of the
    gateway) is for a client waiting on that request."""

    def __init__(self, msg: str, *, code: int = ERR_BAD_MESSAGE, status_hint: int = 502) -> None:
        super().__init__(msg, status_hint=status_hint)
        self.code = code


def encode_request_id(request_id: int) -> bytes:
    return _ID.pack(request_id)


def decode_request_id(frame: bytes) -> int:
    if len(frame) != _ID.size:
        raise WireError(f"request id must be {_ID.size} bytes, got {len(frame)}")
    value: int = _ID.unpack(frame)[0]
    return value


MAX_COUNT_DIGITS = 12  # byte counts (CREDIT n, READ n, a REQUEST's window) stay far below


def count_of(frame: bytes | None) -> int | None:
    """A byte-count frame (CREDIT's n, READ's n, a REQUEST's window): ASCII
    decimal of at most MAX_COUNT_DIGITS digits; None for anything else, so
    that no peer can make us int() thousands of digits (a ValueError)."""
    if frame is None or not frame.isdigit() or len(frame) > MAX_COUNT_DIGITS:
        return None
    return int(frame)


MAX_SERVICES = 64
MAX_ROUTES = 256
MAX_NAME_LEN = 128
MAX_CAPACITY = 10_000
MAX_PREFETCH = 10_000
FEATURE_WEBSOCKET = "websocket"  # HELLO features: takes WebSocket handshakes and FRAMEs


@dataclass(frozen=True, slots=True)
class ServiceSpec:
    name: str
    routes: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class Hello:
    """What a worker announces: who it is, what it serves, how much at once."""

    services: tuple[ServiceSpec, ...]
    capacity: int
    worker: str = ""  # human-readable label, e.g. "host:pid"
    heartbeat_ms: int = 1000
    meta: dict[str, str] = field(default_factory=dict)
    features: tuple[str, ...] = ()  # e.g. FEATURE_WEBSOCKET; unknown ones are ignored
    # Requests that may wait at the worker beyond `capacity`, run in arrival
    # order as slots free (docs/protocol.md 4.6); 0: none.
    prefetch: int = 0

    def encode(self) -> bytes:
        data: dict[str, object] = {
            "services": [{"name": s.name, "routes": list(s.routes)} for s in self.services],
            "capacity": self.capacity,
            "worker": self.worker,
            "heartbeat_ms": self.heartbeat_ms,
            "meta": self.meta,
        }
        if self.features:
            data["features"] = list(self.features)
        if self.prefetch:
            data["prefetch"] = self.prefetch
        return json.dumps(data, separators=(",", ":")).encode()

    @classmethod
    def decode(cls, payload: bytes) -> Hello:
        """Validate a HELLO payload; any nonsense raises WireError."""
        try:
            data = json.loads(payload)
        except (ValueError, UnicodeDecodeError, RecursionError) as exc:
            raise WireError(f"HELLO is not JSON: {exc}") from exc
        if not isinstance(data, dict):
            raise WireError("HELLO must be a JSON object")
        capacity = data.get("capacity")
        if type(capacity) is not int or not 1 <= capacity <= MAX_CAPACITY:
            raise WireError(f"HELLO capacity must be an int in 1..{MAX_CAPACITY}: {capacity!r}")
        prefetch = data.get("prefetch", 0)
        if type(prefetch) is not int or not 0 <= prefetch <= MAX_PREFETCH:
            raise WireError(f"HELLO prefetch must be an int in 0..{MAX_PREFETCH}: {prefetch!r}")
        heartbeat_ms = data.get("heartbeat_ms", 1000)
        if type(heartbeat_ms) is not int or not 10 <= heartbeat_ms <= 600_000:
            raise WireError(f"HELLO heartbeat_ms must be an int in 10..600000: {heartbeat_ms!r}")
        raw_services = data.get("services")
        if not isinstance(raw_services, list) or not 1 <= len(raw_services) <= MAX_SERVICES:
            raise WireError(f"HELLO services must be a list of 1..{MAX_SERVICES}")
        services = []
        n_routes = 0
        for raw in raw_services:
            if not isinstance(raw, dict):
                raise WireError("HELLO service must be an object")
            name = raw.get("name")
            if not isinstance(name, str) or not _valid_name(name):
                raise WireError(f"HELLO service name invalid: {name!r}")
            routes = raw.get("routes", [])
            if not isinstance(routes, list) or not all(
                isinstance(r, str) and 0 < len(r) <= 1024 for r in routes
            ):
                raise WireError(f"HELLO routes of {name!r} must be a list of strings")
            n_routes += len(routes)
            services.append(ServiceSpec(name=name, routes=tuple(routes)))
        if n_routes > MAX_ROUTES:
            raise WireError(f"HELLO announces {n_routes} routes, at most {MAX_ROUTES}")
        worker = data.get("worker", "")
        if not isinstance(worker, str) or len(worker) > 256:
            raise WireError("HELLO worker label must be a string of at most 256 chars")
        meta = data.get("meta", {})
        if not isinstance(meta, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in meta.items()
        ):
            raise WireError("HELLO meta must map strings to strings")
        features = data.get("features", [])
        if not isinstance(features, list) or len(features) > 64 or not all(
            isinstance(f, str) and len(f) <= 64 for f in features
        ):
            raise WireError("HELLO features must be a list of at most 64 short strings")
        return cls(tuple(services), capacity, worker, heartbeat_ms, meta, tuple(features),
                   prefetch)


def _valid_name(name: str) -> bool:
    return (
        0 < len(name) <= MAX_NAME_LEN
        and name.isascii()
        and all(c.isalnum() or c in "-_.:" for c in name)
    )


def welcome(broker_id: str, heartbeat_ms: int) -> list[bytes]:
    payload = json.dumps({"broker": broker_id, "heartbeat_ms": heartbeat_ms}).encode()
    return [VERSION, CMD[Command.WELCOME], payload]


def error(code: int, text: str) -> list[bytes]:
    return [VERSION, CMD[Command.ERROR], str(code).encode(), text.encode()]
