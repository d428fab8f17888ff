"""The dispatcher's records: requests, workers, services, counters, and Done.

Plain slotted dataclasses that the `Dispatcher` (core/dispatch.py) links to
each other; they hold no logic beyond their fields. Which index holds what,
and the invariants between them, are in core/dispatch.py and checked by
core/invariants.py.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field

from scale0.core.routing import Route

SAFE_TO_RETRY = frozenset({b"GET", b"HEAD", b"OPTIONS"})  # protocol.md 4.3, retry
# The method Mongrel2 gives a WebSocket handshake (its Request's `method`).
HANDSHAKE = b"WEBSOCKET_HANDSHAKE"
# Texts of broker error pages for statuses refused before routing.
REFUSED_TEXT = {400: "bad request", 426: "a WebSocket handshake needs Sec-WebSocket-Key "
                                         "and Sec-WebSocket-Version: 13"}


@dataclass(slots=True, eq=False)
class Request:
    rid: int
    link: int
    sender: bytes
    conn_id: int
    method: bytes
    raw: bytes
    service: Service
    script_name: bytes
    received_at: float
    close_after: bool  # HTTP/1.0 or Connection: close: close after broker errors
    deadline: float = 0.0
    worker: Worker | None = None
    reply_started: bool = False
    cancelled: bool = False
    attempts: int = 0
    reply_prefix: bytes = b""
    refused: int = 0  # an error status to answer with when its turn on the connection comes
    status: int = 0  # of the answer, once known (only kept while recording)
    bytes_out: int = 0  # response bytes forwarded (only counted while recording)
    worker_label: str = ""  # the last worker it was sent to
    uri: bytes = b""  # path and query, as the client sent them (only kept while recording)
    upload: bytes = b""  # Mongrel2's spooled body file: removed when the request is over
    inline: int = 0  # bytes of that body put into `raw` (core/spool.py), counted in inline_bytes
    # upload.stream (core/bodystream.py): the body follows in pieces, forwarded as BODY.
    streamed: bool = False
    body_in: int = 0  # body bytes received from Mongrel2 so far
    body_done: bool = False  # its last piece has come
    recalled: bool = False  # RECALL sent to its worker (at most once: protocol.md 4.6)


@dataclass(slots=True, eq=False)
class Worker:
    ident: bytes
    label: str
    services: tuple[Service, ...]
    capacity: int
    connected_at: float
    expires_at: float
    in_flight: dict[int, Request] = field(default_factory=dict)
    # `draining`: gets no new request (dispatch reads only this); it is
    # `held or leaving`. `held`: drained by the operator (`ctl drain`), until
    # `ctl undrain`. `leaving`: it finishes and goes (its own DRAIN, or
    # `ctl recycle`); never undone.
    draining: bool = False
    held: bool = False
    leaving: bool = False
    served: int = 0
    reads_uploads: bool = False  # HELLO meta uploads=file: it opens spooled files itself
    routes: tuple[Route, ...] = ()  # as announced in its HELLO
    expiry_s: float = 3.0  # its heartbeat interval (clamped) x liveness
    beat_s: float = 1.0  # how often we heartbeat it: min(ours, its own)
    next_beat: float = 0.0
    timeouts_in_row: int = 0  # request timeouts since its last good reply
    ejections: int = 0  # since its last good reply
    ejected_until: float = 0.0  # ejected (no new requests) until then; 0.0: not ejected
    websocket: bool = False  # announced protocol.FEATURE_WEBSOCKET
    streams_bodies: bool = False  # HELLO meta bodies=stream: it takes BODY and sends READ
    # Prefetch (protocol.md 4.6): up to `prefetch` requests may wait at it
    # beyond `capacity`. `progress_at`: when it last finished a request, or
    # started on one while idle; a worker holding waiting requests that has
    # not progressed for recall_after_s is stalled. `room_level`: the bucket
    # of Service.room it is in (its waiting requests), -1 for none.
    prefetch: int = 0
    progress_at: float = 0.0
    room_level: int = -1


@dataclass(slots=True, eq=False)
class Service:
    name: str
    name_bytes: bytes
    ready: OrderedDict[bytes, Worker] = field(default_factory=OrderedDict)
    timeout_s: float = 60.0
    # Both ordered by deadline: deadlines within a service only grow, so the
    # front is always the next to expire, and removal is O(1).
    queue: OrderedDict[int, Request] = field(default_factory=OrderedDict)
    active: OrderedDict[int, Request] = field(default_factory=OrderedDict)
    workers: dict[bytes, Worker] = field(default_factory=dict)
    # Workers whose slots are all taken but that have prefetch room, by how
    # many requests wait at each (its room_level); each bucket an LRU.
    room: dict[int, OrderedDict[bytes, Worker]] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Done:
    """The end of one request, for the access log, metrics and `tap`.

    `path` is the request URI (path and query); `status` is what the client
    was sent (499, as nginx logs it, when the client left first);
    `ended_at - received_at` is the time in the broker.
    """

    link: int
    conn_id: int
    method: str
    path: str
    service: str
    worker: str
    status: int
    bytes_in: int
    bytes_out: int
    received_at: float
    ended_at: float
    attempts: int


@dataclass(slots=True)
class Counters:
    requests: int = 0
    replies: int = 0
    no_route: int = 0
    no_worker: int = 0
    queue_full: int = 0
    queue_timeouts: int = 0
    request_timeouts: int = 0
    retries: int = 0
    worker_failures: int = 0
    late_replies: int = 0
    bad_mongrel2: int = 0
    bad_worker: int = 0
    client_gone: int = 0
    too_large: int = 0
    forged_uploads: int = 0
    bad_requests: int = 0
    hello_conflicts: int = 0  # HELLOs refused: a route owned by another service
    hello_limits: int = 0  # HELLOs refused: max_workers, max_services or max_routes
    ejections: int = 0  # workers ejected after eject_after timeouts in a row
    routes_forgotten: int = 0  # announced routes dropped after their workers left
    websockets: int = 0  # handshakes taken
    websocket_refused: int = 0  # upgrades to a service that does not take them, or malformed
    websocket_timeouts: int = 0  # closed for idleness
    websocket_strays: int = 0  # frames of a connection with no WebSocket here: closed
    prefetched: int = 0  # requests sent to wait at a busy worker (protocol.md 4.6)
    recalls: int = 0  # RECALLs sent: a request waiting at a stalled worker
    returns: int = 0  # recalled requests given back (RETURN) and routed again
    body_pieces: int = 0  # upload.stream pieces forwarded to workers as BODY
    body_dropped: int = 0  # pieces for no streaming request (it ended or was refused)


def status_of(message: bytes, offset: int) -> int:
    """The status code of the HTTP response starting at `offset`, or 0."""
    line = message[offset:offset + 12]
    return int(line[9:12]) if line[:5] == b"HTTP/" and line[9:12].isdigit() else 0


def path_of(raw: bytes) -> bytes:
    """PATH of a Mongrel2 request message ('SENDER ID PATH ...')."""
    parts = raw.split(b" ", 3)
    return parts[2] if len(parts) > 3 else b""


def head(pending: OrderedDict[int, Request]) -> Request:
    """The oldest entry of a deadline-ordered dict."""
    return next(iter(pending.values()))
