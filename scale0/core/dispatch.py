"""The broker's brain: a pure, clock-free state machine.

Theory of operation
-------------------
The I/O loop (net/broker.py) feeds three kinds of event, each with ``now`` from
``time.monotonic()``:

* ``on_mongrel2(link, raw, now)``: one message PULLed from Mongrel2 `link`;
* ``on_worker(ident, frames, now)``: one S0W1 message from a worker's DEALER;
* ``on_tick(now)``: time passed; expire deadlines, heartbeat, purge.

Effects are appended to two outboxes that the loop drains after each event:
``to_workers`` (ROUTER frames, identity first) and ``to_mongrel2`` ((link,
message) pairs for that link's PUB). Nothing here touches a socket or a clock.

Invariants (checked by ``check_invariants`` in tests):

* A worker is in ``Service.ready`` of each of its services iff it is not
  draining and has fewer requests in flight than its capacity, so it is never
  sent more than it announced. ``ready`` is an LRU (OrderedDict): dispatch pops
  the oldest, a worker with a free slot goes back at the end. O(1).
* Every request is in exactly one place: a service queue, a connection
  backlog (behind an earlier request on the same keep-alive connection, so
  pipelined replies keep their order), or a worker's ``in_flight``.
* Every request answers its client exactly once, or is dropped because the
  client is gone; each one has a deadline, so none is left hanging.
* An answered request (an error, a timeout, a disconnect) leaves its
  connection at once, so the next pipelined one starts; if a worker still
  holds it, it stays cancelled in that worker's ``in_flight`` (and in
  ``requests``) until its LAST reply, or the worker's removal, frees the slot.
* Answers on a connection keep request order: even a request refused at once
  (404, 413, forged upload) waits its turn behind the active one.
"""

from __future__ import annotations

import logging
import random
import struct
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from scale0.core import spool
from scale0.core.ratelog import RateLimitedLog
from scale0.core.routebook import RouteBook
from scale0.core.routing import Route, RouteTable, parse_route
from scale0.core.screen import screen
from scale0.wire import mongrel2 as m2
from scale0.wire import s0w1 as p

log = logging.getLogger(__name__)

IDEMPOTENT_METHODS = frozenset({b"GET", b"HEAD", b"OPTIONS", b"PUT", b"DELETE", b"TRACE"})
SAFE_TO_RETRY = frozenset({b"GET", b"HEAD", b"OPTIONS"})
_REFUSED_TEXT = {400: "bad request", 426: "a WebSocket handshake needs Sec-WebSocket-Key "
                                          "and Sec-WebSocket-Version: 13"}
_CREDITS_TAIL = b'{"type":"credits"},'
# Connections with reply bytes not yet credited by Mongrel2, at most; the oldest
# is forgotten past this (only one whose credits never came: its client left).
MAX_UNACKED_CONNECTIONS = 65536
MAX_REFUSALS_KEPT = 16
MAX_EJECTION_FACTOR = 10  # an ejection lasts eject_s x min(ejections, this)
MIN_PEER_HEARTBEAT_S = 0.01  # protocol.md 3.1: heartbeat_ms is at least 10
# Built once for the hot path: S0W1 command frames and ints to compare with.
_REQUEST = p.CMD[p.Command.REQUEST]
_CREDIT = p.CMD[p.Command.CREDIT]
_REPLY_CMD = int(p.Command.REPLY)
_HEARTBEAT_CMD = int(p.Command.HEARTBEAT)
_pack_id = struct.Struct(">Q").pack
_unpack_id = struct.Struct(">Q").unpack


@dataclass(frozen=True, slots=True)
class DispatchSettings:
    heartbeat_s: float = 1.0
    liveness: int = 3
    queue_size: int = 1024  # per service
    queue_timeout_s: float = 10.0
    request_timeout_s: float = 60.0
    retry_after_s: int = 5
    max_body_bytes: int = 1 << 30
    max_retries: int = 1
    # Mongrel2 kills connections idle for limits.min_ping (120 s): a request
    # waiting this long gets a ctl keep-alive, and again every keepalive_s.
    keepalive_s: float = 30.0
    routes: tuple[tuple[str, str], ...] = ()  # (route spec, service) from the broker config
    service_timeouts: tuple[tuple[str, float], ...] = ()  # per-service request_timeout_s
    # Per service: the 503 page (HTML) sent while no worker of it is connected.
    maintenance_pages: tuple[tuple[str, bytes], ...] = ()
    # Mongrel2's upload.temp_store folder as the broker sees it: spooled bodies
    # are removed there once their request is over (core/spool.py). None: not here.
    upload_dir: str | None = None
    # Spooled bodies up to this size go to the worker inside the request (core/spool.py),
    # at most inline_budget_bytes of them held at once; 0: never.
    inline_body_max: int = 0
    inline_budget_bytes: int = 128 << 20
    # A route whose last worker crashed or expired is kept (503) this long.
    route_grace_s: float = 30.0
    # Bounded state: HELLOs past these are refused (ERROR 429).
    max_workers: int = 4096
    max_services: int = 256
    max_routes: int = 4096  # announced by workers; configured ones are not counted
    # Outlier ejection: this many request timeouts in a row (0: never) take a
    # worker out of dispatch for eject_s x its ejections so far (at most 10).
    eject_after: int = 3
    eject_s: float = 30.0
    # A worker is expired after its own HELLO heartbeat_ms x liveness, that
    # interval clamped to at most this (or our own heartbeat, if longer).
    max_peer_heartbeat_s: float = 30.0
    # A WebSocket with no frame either way for this long is closed (1001).
    websocket_idle_timeout_s: float = 300.0


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
    body_pieces: int = 0  # upload.stream pieces forwarded to workers as BODY
    body_dropped: int = 0  # pieces for no streaming request (it ended or was refused)


class Dispatcher:
    def __init__(self, settings: DispatchSettings | None = None) -> None:
        self.settings = s = settings or DispatchSettings()
        self.expiry_s = s.heartbeat_s * s.liveness
        self.routes = RouteTable()
        self.book = RouteBook(self.routes, grace_s=s.route_grace_s)
        self.services: dict[str, Service] = {}
        self.workers: dict[bytes, Worker] = {}
        self.requests: dict[int, Request] = {}
        # (link, conn_id) -> requests on that connection, the first one active.
        self.connections: dict[tuple[int, int], deque[Request]] = {}
        self.uploads: OrderedDict[tuple[int, int], bytes] = OrderedDict()
        # Uploads refused at their start: their done message is dropped, the file removed.
        self.refused_uploads: OrderedDict[tuple[int, int], bytes] = OrderedDict()
        # Mongrel2 paths of spooled bodies nobody needs any more; the loop removes
        # them (core/spool.py) and empties the list.
        self.to_unlink: list[bytes] = []
        # The loop's reader of spooled bodies (spool.read), when it shares Mongrel2's
        # disk: (path, max bytes) -> the body, or None to forward the file instead.
        self.read_spooled: Callable[[bytes, int], bytes | None] | None = None
        self.inline_bytes = 0  # bodies inlined into requests still held
        # download.flow_control (protocol.md 3.9): Mongrel2's window belongs to
        # the connection, not to a request, and only the first request of a
        # connection carries DOWNLOAD_CREDITS. `link_credits`: the window size
        # of each link seen to be flow-controlled; `unacked`: per connection,
        # reply bytes sent to Mongrel2 and not yet credited back. A REQUEST
        # carries the rest of the window, so a later request on a keep-alive
        # connection stays within it too.
        self.link_credits: dict[int, int] = {}
        self.unacked: OrderedDict[tuple[int, int], int] = OrderedDict()
        self._starting: set[tuple[int, int]] = set()  # connections in _start_next
        self._nowhere = Service("", b"")  # of refused requests; never has workers
        self.to_workers: list[list[bytes]] = []
        self.to_mongrel2: list[tuple[int, bytes]] = []
        self.counters = Counters()
        self.warnings = RateLimitedLog(log)
        # The latest HELLO refusals, newest last, for `ctl status`.
        self.refusals: deque[dict[str, Any]] = deque(maxlen=MAX_REFUSALS_KEPT)
        # The operator's drains (`ctl drain`), by service name and by worker
        # label: they outlive a worker's reconnect or re-HELLO and last until
        # `ctl undrain` or a broker restart (they are not persisted).
        self.drained_services: set[str] = set()
        self.drained_labels: set[str] = set()
        # Set `record` to get a Done in `done` for every request that ends;
        # the loop drains `done` like the outboxes. Off, nothing is kept.
        self.record = False
        self.done: list[Done] = []
        self._now = 0.0
        # Random start: replies meant for a previous broker process never
        # match a request of this one.
        self._next_rid = random.randrange(1, 1 << 48)
        self._next_heartbeat = 0.0
        self._next_keepalive = s.keepalive_s
        self._timeouts = dict(s.service_timeouts)
        self._maintenance = dict(s.maintenance_pages)
        # Per service, its WebSocket twin (see on_websocket).
        self._ws_services: dict[str, Service] = {}
        for spec, service in s.routes:
            self.book.configure(parse_route(spec), service)
            self._service(service)

    # ---- Mongrel2 side -------------------------------------------------

    def on_mongrel2(self, link: int, raw: bytes, now: float) -> None:
        self._now = now
        if raw.endswith(_CREDITS_TAIL):
            # download.flow_control sends one per write; most arrive after the
            # request ended. Those need no parse (the only per-reply extra cost).
            # Only a '@' path is a special message: a request body may end alike.
            head = raw.split(b" ", 3)
            if len(head) == 4 and head[2][:1] == b"@" and head[1].isdigit():
                key = (link, int(head[1]))
                if key not in self.connections:
                    if key not in self.unacked:
                        return
                    credits = m2.credits_of(head[3])  # the end of a reply: count only
                    if credits is not None:
                        self._credited(key, credits)
                        return
        try:
            event = m2.parse_message(raw)
        except m2.Mongrel2ProtocolError as exc:
            self.counters.bad_mongrel2 += 1
            self.warnings.warning("malformed Mongrel2", now,
                                  "malformed Mongrel2 message on link %d: %s", link, exc)
            self._answer_malformed(link, raw, exc.status_hint)
            return
        if isinstance(event, (m2.HttpRequest, m2.UploadDone)):
            self._on_request(link, raw, event, now)
        elif isinstance(event, m2.Disconnect):
            self._on_disconnect(link, event.conn_id)
        elif isinstance(event, m2.Credits):
            self._on_credits(link, event.conn_id, event.credits)
        elif isinstance(event, m2.UploadStart):
            self._on_request(link, raw, event, now)
        elif isinstance(event, (m2.WebSocketHandshake, m2.WebSocketFrame)):
            self.on_websocket(link, raw, event, now)
        elif isinstance(event, m2.UploadChunk):
            self._on_chunk(link, event, now)
        else:  # JSON socket messages: not served
            self._reply_error(link, event.sender, event.conn_id, 501, close=True)

    def _on_request(self, link: int, raw: bytes,
                    req: m2.HttpRequest | m2.UploadStart | m2.UploadDone, now: float) -> None:
        if isinstance(req, m2.UploadDone) and self._refused_done(link, req):
            return
        if not isinstance(req, m2.UploadStart):
            self.counters.requests += 1
        sender, conn_id = req.sender, req.conn_id
        try:
            prefix = m2.reply_prefix(sender, conn_id)
        except ValueError:
            # parse_message takes any SENDER without a space, but a reply's must
            # be [A-Za-z0-9-]+ (MONGREL2.md): nobody could ever be answered.
            self.counters.bad_mongrel2 += 1
            self.warnings.warning("unanswerable sender", now, "unanswerable sender %r on link %d",
                                  sender, link)
            return
        close = _wants_close(req)
        key = (link, conn_id)
        if link not in self.link_credits:
            window = req.header(b"DOWNLOAD_CREDITS")  # upper case: Mongrel2's own
            if window is not None and window.isdigit():
                self.link_credits[link] = int(window)
        refused = 0
        match = None
        req, raw, problem = screen(req, raw)
        # A done message matching its start names Mongrel2's own file (core/spool.py).
        spooled = b""
        if isinstance(req, m2.UploadDone) and self.uploads.pop(key, None) == req.upload_path:
            spooled = req.upload_path
        length = req.header(b"content-length")
        declared = int(length) if length is not None and length.isdigit() else None
        if problem:  # duplicate Host, conflicting lengths (core/screen.py)
            self.counters.bad_requests += 1
            self.warnings.warning("bad request", now, "bad request on conn %d: %s", conn_id,
                                  problem)
            refused, close = 400, True
        elif isinstance(req, m2.UploadStart) and (req.body or not (declared or _chunked(req))):
            # Mongrel2's own upload-start has an empty body and a Content-Length
            # over limits.content_length, or is chunked (always spooled); a
            # client-forged header on a small request has neither.
            self.counters.forged_uploads += 1
            self.warnings.warning("forged upload", now, "forged upload-start on conn %d", conn_id)
            refused, close = 400, True
        elif isinstance(req, m2.UploadDone) and not spooled:
            self.counters.forged_uploads += 1
            self.warnings.warning("forged upload", now,
                                  "upload-done without matching upload-start on conn %d", conn_id)
            refused, close = 400, True
        elif declared is not None and declared > self.settings.max_body_bytes:
            self.counters.too_large += 1
            refused, close = 413, True  # for an upload: at its start, not after it
        elif isinstance(req, m2.UploadStart):
            self._on_upload_start(link, req)
            return
        elif b"upgrade" in req.headers and _websocket_upgrade(req):
            # Mongrel2 passes an upgrade it does not take as a handshake (no key or
            # version) as a plain GET: no app may answer it as one.
            self.counters.websocket_refused += 1
            refused, close = 426, True
        else:
            match = self.routes.lookup(req.header(b"host"), req.path)
            if match is None:
                self.counters.no_route += 1
                refused = 404
        on_conn = self.connections.get(key)
        if refused and isinstance(req, m2.UploadStart):
            self.counters.requests += 1  # refused at its start: it ends here, counted once
            if not req.body and (declared or _chunked(req)):  # genuine: Mongrel2's file
                self._refuse_upload(key, req.upload_path)
        if refused and on_conn is None:
            if spooled:
                self.to_unlink.append(spooled)
            self._reply_error(link, sender, conn_id, refused,
                              problem or _REFUSED_TEXT.get(refused, ""), close=close)
            if self.record:
                uri = req.header(b"URI") or req.path
                self.done.append(Done(link, conn_id, req.method.decode("latin-1"),
                                      uri.decode("latin-1"), "", "", refused, len(raw),
                                      0, now, now, 0))
            return
        rid = self._next_rid
        self._next_rid = rid + 1
        if match is None:  # refused, but pipelined: answer in turn (RFC 9112 section 9.3.2)
            service, script_name = self._nowhere, b""
        else:
            service = self.services[match.service]
            script_name = match.script_name.encode("latin-1")
        r = Request(rid, link, sender, conn_id, req.method, raw, service, script_name, now,
                    close, reply_prefix=prefix, refused=refused, upload=spooled)
        if self.record:
            r.uri = req.header(b"URI") or req.path
        if m2.streamed_body(req.headers):  # upload.stream: the body follows (core/bodystream.py)
            r.streamed, r.body_in = True, len(req.body)
        self.requests[rid] = r
        if on_conn is not None:  # pipelined: wait behind the active request
            on_conn.append(r)
            return
        self.connections[key] = deque((r,))
        self._route(r, now)

    def _route(self, r: Request, now: float) -> None:
        """Send `r` to its service's LRU ready worker, or queue it."""
        service = r.service
        if r.refused:
            self._fail(r, r.refused, _REFUSED_TEXT.get(r.refused, ""))
        elif service.ready:
            self._send(r, service.ready.popitem(last=False)[1], now)
        elif not service.workers:
            self.counters.no_worker += 1
            self._fail(r, 503, "no worker serves this service",
                       page=self._maintenance.get(service.name))
        elif len(service.queue) >= self.settings.queue_size:
            self.counters.queue_full += 1
            self._fail(r, 503, "queue full")
        else:
            r.deadline = now + self.settings.queue_timeout_s
            service.queue[r.rid] = r
            if log.isEnabledFor(logging.DEBUG):  # the args cost even when not logged
                log.debug("request %d queued for %s (%d waiting)", r.rid, service.name,
                          len(service.queue))

    def _send(self, r: Request, w: Worker, now: float) -> None:
        """Hand `r` to `w` (just popped from ready queues or known to be free)."""
        if r.streamed and not w.streams_bodies:
            self._fail(r, 501, "this worker cannot take a streamed request body")
            self._update_ready(w)
            return
        if r.upload and not r.inline and not w.reads_uploads and self.read_spooled:
            self._inline(r)  # no shared disk there: the body goes inside (core/spool.py)
        r.worker = w
        r.worker_label = w.label
        r.attempts += 1
        w.in_flight[r.rid] = r
        r.deadline = now + r.service.timeout_s
        r.service.active[r.rid] = r
        frames = [w.ident, p.VERSION, _REQUEST, _pack_id(r.rid), r.service.name_bytes,
                  r.script_name, r.raw]
        window = self.link_credits.get(r.link)
        if window is not None:  # what is left of the connection's window
            frames.append(b"%d" % max(0, window - self.unacked.get((r.link, r.conn_id), 0)))
        self.to_workers.append(frames)
        self._update_ready(w)

    def _on_disconnect(self, link: int, conn_id: int) -> None:
        key = (link, conn_id)
        started = self.uploads.pop(key, None)  # Mongrel2 removes a half-written file
        if started is not None:  # itself, but it may have been complete
            self.to_unlink.append(started)
        self.refused_uploads.pop(key, None)
        self.unacked.pop(key, None)
        on_conn = self.connections.pop(key, None)
        if not on_conn:
            return
        self.counters.client_gone += 1
        for r in on_conn:
            if not r.cancelled:
                self._record(r, 499)
            self._forget(r, cancel=True)

    def _credited(self, key: tuple[int, int], credits: int) -> None:
        left = self.unacked.get(key)
        if left is not None:
            if left > credits:
                self.unacked[key] = left - credits
            else:
                del self.unacked[key]

    def _on_credits(self, link: int, conn_id: int, credits: int) -> None:
        key = (link, conn_id)
        self._credited(key, credits)
        on_conn = self.connections.get(key)
        if on_conn:
            r = on_conn[0]
            if r.worker is not None:
                self.to_workers.append([
                    r.worker.ident, p.VERSION, _CREDIT, _pack_id(r.rid), b"%d" % credits,
                ])

    def _on_chunk(self, link: int, event: m2.UploadChunk, now: float) -> None:
        """The next piece of the active request's streamed body: to its worker
        as BODY, within the credits that worker granted (core/bodystream.py)."""
        on_conn = self.connections.get((link, event.conn_id))
        r = on_conn[0] if on_conn else None
        if r is None or not r.streamed or r.body_done:
            self.counters.body_dropped += 1  # its request was answered (e.g. 413) or is gone
            return
        r.body_in += len(event.body)
        r.body_done = event.done
        if r.body_in > self.settings.max_body_bytes:  # chunked: no length said so at the start
            self.counters.too_large += 1
            self._fail(r, 413, "", close=True)
            return
        w = r.worker
        if w is None or r.cancelled:
            self.counters.body_dropped += 1
            return
        self.counters.body_pieces += 1
        self.to_workers.append([w.ident, p.VERSION, p.CMD[p.Command.BODY],
                                p.encode_request_id(r.rid),
                                p.BODY_END if event.done else p.BODY_MORE, event.body])
        # An upload making progress is alive, like a streaming reply.
        r.deadline = now + r.service.timeout_s
        r.service.active.move_to_end(r.rid)

    def _on_read(self, w: Worker, frames: list[bytes]) -> None:
        """READ n: the worker lets n more body bytes come; Mongrel2 gets them as
        upload credits for the request's connection."""
        if len(frames) != 4 or not frames[3].isdigit() or len(frames[3]) > 10:
            raise p.WireError("READ takes request id, decimal byte count")
        r = w.in_flight.get(p.decode_request_id(frames[2]))
        if r is None or r.cancelled or not r.streamed or r.body_done:
            return  # ended meanwhile: the body is not wanted any more
        self.to_mongrel2.append(
            (r.link, m2.upload_credits_reply(r.sender, r.conn_id, int(frames[3]))))

    def _on_upload_start(self, link: int, event: m2.UploadStart) -> None:
        key = (link, event.conn_id)
        self.uploads[key] = event.upload_path
        self.uploads.move_to_end(key)
        while len(self.uploads) > 10_000:  # bounded even if no upload-done ever comes
            self.to_unlink.append(self.uploads.popitem(last=False)[1])

    def _refuse_upload(self, key: tuple[int, int], upload_path: bytes) -> None:
        """A genuine upload refused at its start: its file goes, and so does its
        done message, if Mongrel2 still sends one (the body was in first)."""
        self.to_unlink.append(upload_path)
        self.refused_uploads[key] = upload_path
        self.refused_uploads.move_to_end(key)
        while len(self.refused_uploads) > 10_000:
            self.refused_uploads.popitem(last=False)

    def _inline(self, r: Request) -> None:
        """Put `r`'s spooled body into its message, when it fits inline_body_max
        and the budget; else it stays a file (a worker without it answers 400)."""
        s = self.settings
        room = min(s.inline_body_max, s.inline_budget_bytes - self.inline_bytes)
        if room <= 0 or self.read_spooled is None:
            return
        body = self.read_spooled(r.upload, room)
        event = m2.parse_message(r.raw) if body is not None else None
        if body is None or not isinstance(event, m2.UploadDone):
            return
        r.raw = spool.inline_message(event, body)
        r.inline = len(body)
        self.inline_bytes += r.inline
        self.to_unlink.append(r.upload)  # in memory now: the file can go

    def _refused_done(self, link: int, req: m2.UploadDone) -> bool:
        """The done message of an upload refused at its start: already answered."""
        key = (link, req.conn_id)
        if self.refused_uploads.get(key) != req.upload_path:
            return False
        del self.refused_uploads[key]
        self.to_unlink.append(req.upload_path)
        return True

    # ---- WebSockets (docs/protocol.md section 12) ------------------------

    def on_websocket(self, link: int, raw: bytes,
                     event: m2.WebSocketHandshake | m2.WebSocketFrame, now: float) -> None:
        """A WebSocket is one long request: its handshake takes a slot at a worker
        that announced the feature, every later frame of the connection goes to
        that worker (FRAME), and the slot frees on the worker's LAST.

        Its Request belongs to the service's WebSocket twin: a Service sharing
        the real one's ready LRU, workers and queue, with an `active` of its own
        whose timeout is the idle timeout. A frame either way pushes the deadline
        to now + that timeout (for the worker's replies, _on_reply's streaming
        rule does it), so the twin's `active` stays in deadline order, and the
        request paths need no WebSocket test.
        """
        if isinstance(event, m2.WebSocketFrame):
            self._on_ws_frame(link, raw, event, now)
            return
        self.counters.requests += 1
        sender, conn_id = event.sender, event.conn_id
        if link not in self.link_credits:  # as in _on_request: the link's window size
            window = event.header(b"DOWNLOAD_CREDITS")
            if window is not None and window.isdigit():
                self.link_credits[link] = int(window)
        try:
            prefix = m2.reply_prefix(sender, conn_id)
        except ValueError:
            self.counters.bad_mongrel2 += 1
            log.warning("unanswerable sender %r on link %d", sender, link)
            return
        match = self.routes.lookup(event.header(b"host"), event.path)
        if match is None:
            self.counters.no_route += 1
            self._refuse_handshake(link, raw, event, 404, "", now)
            return
        service = self.services[match.service]
        if service.workers and not all(w.websocket for w in service.workers.values()):
            # A WSGI worker would take the handshake for a plain GET.
            self.counters.websocket_refused += 1
            self._refuse_handshake(link, raw, event, 400, "this service does not take "
                                   "WebSockets", now)
            return
        self.counters.websockets += 1
        rid = self._next_rid
        self._next_rid = rid + 1
        r = Request(rid, link, sender, conn_id, event.method, raw, self._ws_service(service),
                    match.script_name.encode("latin-1"), now, True, reply_prefix=prefix)
        if self.record:
            r.uri = event.header(b"URI") or event.path
        self.requests[rid] = r
        key = (link, conn_id)
        on_conn = self.connections.get(key)
        if on_conn is not None:
            on_conn.append(r)
            return
        self.connections[key] = deque((r,))
        self._route(r, now)

    def _refuse_handshake(self, link: int, raw: bytes, event: m2.WebSocketHandshake,
                          status: int, text: str, now: float) -> None:
        """Answered at once and closed, even behind pipelined requests: with the
        connection closed, nothing can be answered out of order on it."""
        self._reply_error(link, event.sender, event.conn_id, status, text, close=True)
        if self.record:
            uri = (event.header(b"URI") or event.path).decode("latin-1")
            self.done.append(Done(link, event.conn_id, "GET", uri, "", "", status, len(raw), 0,
                                  now, now, 0))

    def _ws_service(self, service: Service) -> Service:
        twin = self._ws_services.get(service.name)
        if twin is None:
            twin = self._ws_services[service.name] = Service(
                service.name, service.name_bytes, ready=service.ready,
                timeout_s=self.settings.websocket_idle_timeout_s, queue=service.queue,
                workers=service.workers)
        return twin

    def _on_ws_frame(self, link: int, raw: bytes, event: m2.WebSocketFrame, now: float) -> None:
        on_conn = self.connections.get((link, event.conn_id))
        r = on_conn[0] if on_conn else None
        if r is None or r.method != _HANDSHAKE:
            # No WebSocket of ours (its worker left, a broker restart, a timeout):
            # close it, so that the client is not left waiting.
            self.counters.websocket_strays += 1
            try:
                self.to_mongrel2.append((link, m2.close_reply(event.sender, event.conn_id)))
            except ValueError:
                pass
            return
        w = r.worker
        if w is None:  # still queued: a client must wait for the 101 before sending
            return
        r.deadline = now + r.service.timeout_s
        r.service.active.move_to_end(r.rid)
        self.to_workers.append([w.ident, p.VERSION, p.CMD[p.Command.FRAME],
                                p.encode_request_id(r.rid), raw])

    def _ws_idle(self, r: Request) -> None:
        """The idle timeout: a close frame (1001) if the WebSocket was accepted."""
        self.counters.websocket_timeouts += 1
        if r.reply_started:
            self._ws_close_frame(r, 1001, "idle timeout")
        self._fail(r, 504, "the WebSocket was not accepted in time", close=True)

    def _ws_close_frame(self, r: Request, code: int, reason: str) -> None:
        if not r.cancelled:
            payload = code.to_bytes(2, "big") + reason.encode()
            self.to_mongrel2.append(
                (r.link, m2.reply(r.sender, r.conn_id, bytes((0x88, len(payload))) + payload)))

    # ---- worker side ---------------------------------------------------

    def on_worker(self, ident: bytes, frames: list[bytes], now: float) -> None:
        self._now = now
        if len(frames) < 2 or frames[0] != p.VERSION or len(frames[1]) != 1:
            self.counters.bad_worker += 1
            if frames and frames[0] != p.VERSION:
                self.to_workers.append([ident, *p.error(p.ERR_BAD_VERSION, "expected S0W1")])
            self.warnings.warning("malformed worker", now,
                                  "malformed worker message from %r (%d frames)", ident,
                                  len(frames))
            return
        command = frames[1][0]
        w = self.workers.get(ident)
        if w is not None:
            w.expires_at = now + w.expiry_s
        try:
            if command == _REPLY_CMD and w is not None:
                self._on_reply(w, frames, now)
            elif command == _HEARTBEAT_CMD and w is not None:
                pass
            elif command == p.Command.READ and w is not None:
                self._on_read(w, frames)
            elif command == p.Command.HELLO:
                self._on_hello(ident, frames, now)
            elif command == p.Command.BYE:
                if w is not None:
                    self.remove_worker(w, now, deliberate=True)
            elif command == p.Command.DRAIN and w is not None:
                w.draining = w.leaving = True
                self._update_ready(w)
                # Ack with DRAIN: every REQUEST sent before it reaches the worker first.
                self.to_workers.append([ident, p.VERSION, p.CMD[p.Command.DRAIN]])
            elif w is None:
                # Unknown worker (e.g. after a broker restart): ask it to say HELLO.
                self.to_workers.append([ident, p.VERSION, p.CMD[p.Command.BYE]])
            else:
                raise p.WireError(f"unknown command {command:#x}")
        except p.WireError as exc:
            self.counters.bad_worker += 1
            self.warnings.warning("bad worker", now, "bad message from worker %r: %s", ident, exc)
            self.to_workers.append([ident, *p.error(exc.code, str(exc))])

    def _on_hello(self, ident: bytes, frames: list[bytes], now: float) -> None:
        if len(frames) != 3:
            raise p.WireError("HELLO takes one frame")
        hello = p.Hello.decode(frames[2])
        # Parse and check every route before changing anything: a refused
        # HELLO leaves no half-announced routes behind.
        routes: list[tuple[Route, str]] = []
        for spec in hello.services:
            for route_spec in spec.routes:
                try:
                    routes.append((parse_route(route_spec), spec.name))
                except ValueError as exc:
                    raise p.WireError(str(exc)) from exc
        label = hello.worker or ident.hex()
        refusal = self._refuse_hello(ident, hello, routes)
        if refusal is not None:
            code, text = refusal
            self.refusals.append({"at": now, "worker": label, "id": ident.hex(),
                                  "code": code, "reason": text})
            self.warnings.warning("refused HELLO", now, "refused HELLO from worker %s: %s",
                                  label, text)
            self.to_workers.append([ident, *p.error(code, text)])
            return
        old = self.workers.get(ident)
        if old is not None:
            self.remove_worker(old, now, deliberate=True)
        services = tuple(self._service(s.name) for s in hello.services)
        self.book.claim(ident, routes)
        beat_s, expiry_s = self._peer_timing(hello.heartbeat_ms)
        w = Worker(ident, label, services, hello.capacity, now, now + expiry_s,
                   routes=tuple(route for route, _ in routes), expiry_s=expiry_s,
                   beat_s=beat_s, next_beat=now + beat_s,
                   reads_uploads=hello.meta.get("uploads") == "file",
                   websocket=p.FEATURE_WEBSOCKET in hello.features,
                   streams_bodies=hello.meta.get("bodies") == "stream")
        w.draining = w.held = self._operator_drained(w)  # kept over a reconnect
        self.workers[ident] = w
        for service in services:
            service.workers[ident] = w
        self.to_workers.append([ident, *p.welcome("scale0", int(self.settings.heartbeat_s * 1000))])
        log.info("worker %s ready: services=%s capacity=%d heartbeat=%gs", w.label,
                 ",".join(s.name for s in services), w.capacity, expiry_s / self.settings.liveness)
        if beat_s < self.settings.heartbeat_s:  # else the next regular tick is soon enough
            self._next_heartbeat = min(self._next_heartbeat, w.next_beat)
        self._update_ready(w)
        self._pull_queued(w, now)

    def _refuse_hello(self, ident: bytes, hello: p.Hello,
                      routes: list[tuple[Route, str]]) -> tuple[int, str] | None:
        """(ERROR code, text) if this HELLO may not register, else None.
        Ownership first (protocol.md 3.10): the text names the route and its owner."""
        conflict = self.book.conflict(ident, routes)
        if conflict is not None:
            self.counters.hello_conflicts += 1
            return p.ERR_ROUTE_OWNED, conflict.text()
        s = self.settings
        if ident not in self.workers and len(self.workers) >= s.max_workers:
            self.counters.hello_limits += 1
            return p.ERR_LIMIT, f"broker full: {len(self.workers)} workers (max_workers)"
        new_services = {spec.name for spec in hello.services} - self.services.keys()
        if len(self.services) + len(new_services) > s.max_services:
            self.counters.hello_limits += 1
            return p.ERR_LIMIT, (f"broker full: {len(self.services)} services known, "
                                 f"{len(new_services)} new (max_services {s.max_services})")
        new_routes = self.book.new_routes(route for route, _ in routes)
        if len(self.book.claims) + new_routes > s.max_routes:
            self.counters.hello_limits += 1
            return p.ERR_LIMIT, (f"broker full: {len(self.book.claims)} announced routes, "
                                 f"{new_routes} new (max_routes {s.max_routes})")
        return None

    def _peer_timing(self, heartbeat_ms: int) -> tuple[float, float]:
        """(how often we heartbeat it, when it expires) for a worker announcing
        `heartbeat_ms`: expired after its own interval x liveness, that
        interval clamped to sane bounds; heartbeated at least as often as it
        heartbeats us, so a worker that expires a broker by its own interval
        (an older worker) never sees us as silent."""
        s = self.settings
        high = max(s.max_peer_heartbeat_s, s.heartbeat_s)
        interval_s = min(max(heartbeat_ms / 1000, MIN_PEER_HEARTBEAT_S), high)
        return min(s.heartbeat_s, interval_s), interval_s * s.liveness

    def _on_reply(self, w: Worker, frames: list[bytes], now: float) -> None:
        if len(frames) < 4 or frames[3] not in (p.FLAG_MORE, p.FLAG_LAST):
            raise p.WireError("REPLY takes request id, flags, messages")
        rid_frame = frames[2]
        rid: int = (_unpack_id(rid_frame)[0] if len(rid_frame) == 8
                    else p.decode_request_id(rid_frame))  # which raises the WireError
        r = w.in_flight.get(rid)
        if r is None:
            self.counters.late_replies += 1
            return
        last = frames[3] == p.FLAG_LAST
        if not r.cancelled:
            prefix, messages = r.reply_prefix, frames[4:]
            # Check all before forwarding any: a 502 after part of a reply
            # would corrupt the client's stream.
            single = len(messages) == 1  # the usual: one whole response
            if (messages[0].startswith(prefix) if single
                    else all(message.startswith(prefix) for message in messages)):
                link = r.link
                if single:
                    self.to_mongrel2.append((link, messages[0]))
                else:
                    self.to_mongrel2.extend([(link, message) for message in messages])
                if link in self.link_credits and messages:
                    self._unacked_add((link, r.conn_id),
                                      sum(map(len, messages)) - len(prefix) * len(messages))
                if self.record and messages:
                    if not r.reply_started:
                        r.status = _status_of(messages[0], len(prefix))
                    r.bytes_out += sum(map(len, messages)) - len(prefix) * len(messages)
                if messages and not last:
                    # A streaming reply is alive: the timeout is between pieces,
                    # not for the whole download. now + timeout is the latest
                    # deadline, so `active` stays in deadline order.
                    r.reply_started = True
                    r.deadline = now + r.service.timeout_s
                    r.service.active.move_to_end(rid)
                elif messages:
                    r.reply_started = True
                elif last and not r.reply_started:
                    self.counters.worker_failures += 1
                    self.warnings.warning("no response", now,
                                          "worker %s ended a request without a response",
                                          w.label)
                    self._reply_error(link, r.sender, r.conn_id, 502, "no response from worker",
                                      close=r.close_after)
                    r.status = 502
                if last:
                    self._record(r, r.status)
            else:
                self.counters.bad_worker += 1
                self.warnings.warning("wrong connection", now,
                                      "worker %s replied to the wrong connection", w.label)
                # Cancelled: the rest is dropped; the slot frees on the LAST reply.
                self._fail(r, 502, "bad reply from worker", close=True)
        if last:
            if r.streamed and not r.body_done and not r.cancelled:
                # Answered before its body was in: Mongrel2 would wait for
                # credits that never come; close (after the response) instead.
                self.to_mongrel2.append((r.link, m2.close_reply(r.sender, r.conn_id)))
            w.served += 1
            self.counters.replies += 1
            self._finish(r, w, now)

    def _finish(self, r: Request, w: Worker, now: float) -> None:
        """`r` is over at `w`: free the slot, start the next on its connection."""
        w.in_flight.pop(r.rid, None)
        r.worker = None
        if not r.cancelled:  # a reply in time: the streak of timeouts is over
            w.timeouts_in_row = w.ejections = 0
        self._forget(r, cancel=False)
        self._update_ready(w)
        self._pull_queued(w, now)

    def worker_unreachable(self, w: Worker, frames: list[bytes], now: float) -> None:
        """A send of `frames` to `w` failed (EHOSTUNREACH): remove it. A REQUEST
        among them never reached it, so that was no attempt: the loops of a
        killed process vanish together, and a retry sent to a sibling loop must
        not use up the request's one retry."""
        if len(frames) > 3 and frames[2] == p.CMD[p.Command.REQUEST]:
            r = w.in_flight.get(p.decode_request_id(frames[3]))
            if r is not None:
                r.attempts -= 1
        self.remove_worker(w, now)

    def remove_worker(self, w: Worker, now: float, *, deliberate: bool = False) -> None:
        """Idempotent. In-flight requests are retried once if safe, else 502.

        Its routes go with it when it was their last worker: at once if it
        left `deliberate`ly (BYE, a new HELLO), else after the route grace
        (core/routebook.py). A service left with no worker and no route is forgotten.
        """
        if self.workers.get(w.ident) is not w:  # gone, or replaced by a new HELLO
            return
        del self.workers[w.ident]
        self.book.release(w.ident, w.routes, now, deliberate=deliberate)
        self._now = now
        for service in w.services:
            service.ready.pop(w.ident, None)
            service.workers.pop(w.ident, None)
        orphans = list(w.in_flight.values())
        w.in_flight.clear()
        for r in orphans:
            r.worker = None
            # Out of `active` before a retry re-adds it: an OrderedDict keeps an
            # existing key's place, and a later deadline there would hide the
            # earlier ones behind it from on_tick.
            r.service.active.pop(r.rid, None)
            if r.cancelled:
                self._forget(r, cancel=False)
            elif (not r.reply_started and r.method in SAFE_TO_RETRY and not r.streamed
                    and r.attempts <= self.settings.max_retries):
                self.counters.retries += 1
                self._route(r, now)
            else:
                self.counters.worker_failures += 1
                self._fail(r, 502, "worker failed", close=r.reply_started)
        for service in w.services:
            while service.queue and not service.workers:  # nobody left to serve them
                self.counters.no_worker += 1
                self._fail(service.queue.popitem(last=False)[1], 503,
                           "no worker serves this service")
            self._maybe_forget_service(service)
        log.info("worker %s gone (%d in flight)", w.label, len(orphans))

    def _maybe_forget_service(self, service: Service) -> None:
        """Forget a service that nothing refers to any more: no worker, no
        route (configured, or claimed and in its grace), nothing pending.
        A request still holding the object (one pipelined behind another)
        gets 503 from it, as from any service without workers."""
        if (not service.workers and not service.queue and not service.active
                and not self.book.owns(service.name)
                and self.services.get(service.name) is service):
            del self.services[service.name]

    # ---- time ----------------------------------------------------------

    def on_tick(self, now: float) -> None:
        self._now = now
        for service in self.services.values():
            queue, active = service.queue, service.active
            while queue and _head(queue).deadline <= now:
                self.counters.queue_timeouts += 1
                self._fail(queue.popitem(last=False)[1], 503, "timed out in queue")
            while active and _head(active).deadline <= now:
                r = active.popitem(last=False)[1]
                self.counters.request_timeouts += 1
                timed_out = r.worker
                self._fail(r, 504, "worker did not answer in time", close=r.reply_started)
                if timed_out is not None:
                    self._on_worker_timeout(timed_out, now)
        for twin in self._ws_services.values():
            while twin.active and _head(twin.active).deadline <= now:
                self._ws_idle(twin.active.popitem(last=False)[1])
        if now >= self._next_keepalive:
            self._next_keepalive = now + self.settings.keepalive_s
            self._keep_alive(now)
        if now >= self._next_heartbeat:
            self._heartbeat(now)
        if now >= self.book.next_deadline():
            self._forget_routes(now)
        self.warnings.flush(now)

    def _heartbeat(self, now: float) -> None:
        """Expire silent workers, heartbeat each at its own pace, end ejections.
        O(workers), every min(heartbeat_s, the shortest worker interval).

        A worker due within half its interval gets its HEARTBEAT now (early is
        harmless): so workers of one pace share ticks instead of each
        registration adding a tick of its own (O(workers) ticks of O(workers))."""
        next_beat = now + self.settings.heartbeat_s
        expired = [w for w in self.workers.values() if w.expires_at <= now]
        for w in expired:  # the loops of one hung process expire together: none
            for service in w.services:  # may take the retry of another's request
                service.ready.pop(w.ident, None)
        for w in expired:
            log.warning("worker %s expired (silent for %.1f s)", w.label,
                        now - w.expires_at + w.expiry_s)
            self.remove_worker(w, now)
        for w in list(self.workers.values()):
            if w.ejected_until and w.ejected_until <= now:
                w.ejected_until = 0.0
                w.timeouts_in_row = 0
                log.info("worker %s back after its ejection", w.label)
                self._update_ready(w)
                self._pull_queued(w, now)
            if w.next_beat <= now + w.beat_s / 2:
                w.next_beat = now + w.beat_s
                self.to_workers.append([w.ident, p.VERSION, p.CMD[p.Command.HEARTBEAT]])
            next_beat = min(next_beat, w.next_beat, w.ejected_until or next_beat)
        self._next_heartbeat = next_beat

    def _on_worker_timeout(self, w: Worker, now: float) -> None:
        """Outlier detection: eject_after timeouts in a row take `w` out of
        dispatch (its slots no longer count) until the ejection ends; it stays
        registered and heartbeated, and comes back by itself (docs/reliability.md)."""
        w.timeouts_in_row += 1
        s = self.settings
        if (not s.eject_after or w.timeouts_in_row < s.eject_after or w.ejected_until
                or self.workers.get(w.ident) is not w):
            return
        w.ejections += 1
        duration_s = s.eject_s * min(w.ejections, MAX_EJECTION_FACTOR)
        w.ejected_until = now + duration_s
        self.counters.ejections += 1
        self.warnings.warning("worker ejected", now,
                              "worker %s ejected for %.0f s: %d request timeouts in a row",
                              w.label, duration_s, w.timeouts_in_row)
        self._update_ready(w)
        self._next_heartbeat = min(self._next_heartbeat, w.ejected_until)

    def _forget_routes(self, now: float) -> None:
        """Routes whose grace ended are forgotten (then 404 or the next route)."""
        for route, name in self.book.expire(now):
            self.counters.routes_forgotten += 1
            log.info("route %s of service %s forgotten: no worker came back in %g s",
                     route, name, self.settings.route_grace_s)
            service = self.services.get(name)
            if service is not None:
                self._maybe_forget_service(service)

    def _keep_alive(self, now: float) -> None:
        """ctl keep-alive for every request waiting longer than keepalive_s.
        O(requests waiting), once per keepalive_s."""
        oldest = now - self.settings.keepalive_s
        pendings = [pending for service in self.services.values()
                    for pending in (service.queue, service.active)]
        # WebSockets: a twin's queue is its service's, its `active` its own.
        pendings += [twin.active for twin in self._ws_services.values()]
        for pending in pendings:
            for r in pending.values():
                if r.received_at <= oldest and not r.cancelled:
                    self.to_mongrel2.append((r.link, m2.keep_alive_reply(r.sender, r.conn_id)))

    def shutdown(self, now: float) -> int:
        """Answer every request still held (503, or a close if its reply had
        started) so that no client waits for a broker that is gone."""
        self._now = now
        left = [r for r in self.requests.values() if not r.cancelled]
        for r in left:
            if r.reply_started and r.method == _HANDSHAKE:
                self._ws_close_frame(r, 1001, "broker shutting down")
            self._fail(r, 503, "broker shutting down", close=True)
        return len(left)

    def next_deadline(self) -> float:
        """When on_tick next has work. O(services); the loop calls it once per wake-up."""
        deadline = min(self._next_heartbeat, self._next_keepalive, self.book.next_deadline())
        for service in self.services.values():
            for pending in (service.queue, service.active):
                if pending:
                    deadline = min(deadline, _head(pending).deadline)
        for twin in self._ws_services.values():
            if twin.active:
                deadline = min(deadline, _head(twin.active).deadline)
        return deadline

    # ---- helpers -------------------------------------------------------

    def _service(self, name: str) -> Service:
        service = self.services.get(name)
        if service is None:
            service = self.services[name] = Service(
                name, name.encode(),
                timeout_s=self._timeouts.get(name, self.settings.request_timeout_s))
        return service

    def _update_ready(self, w: Worker) -> None:
        free = (not w.draining and not w.ejected_until and len(w.in_flight) < w.capacity
                and w.ident in self.workers)
        for service in w.services:
            if free:
                if w.ident not in service.ready:
                    service.ready[w.ident] = w  # re-insert at the back: LRU
            else:
                service.ready.pop(w.ident, None)

    def _pull_queued(self, w: Worker, now: float) -> None:
        """Give a free worker the oldest queued requests of its services."""
        while (w.ident in self.workers and not w.draining and not w.ejected_until
               and len(w.in_flight) < w.capacity):
            oldest: Service | None = None
            for service in w.services:
                if service.queue and (oldest is None or _head(service.queue).received_at
                                      < _head(oldest.queue).received_at):
                    oldest = service
            if oldest is None:
                return
            r = oldest.queue.popitem(last=False)[1]
            for service in w.services:
                service.ready.pop(w.ident, None)
            self._send(r, w, now)

    def _fail(self, r: Request, status: int, text: str, *, close: bool = False,
              page: bytes | None = None) -> None:
        """Answer `r` with an error (or just close if its reply had started)."""
        if r.worker is not None:
            self._cancel_at_worker(r)
        close = close or (r.streamed and not r.body_done)  # Mongrel2 waits for upload credits
        if not r.cancelled:
            self._record(r, r.status if r.reply_started else status)
            if r.reply_started:
                self.to_mongrel2.append((r.link, m2.close_reply(r.sender, r.conn_id)))
            else:
                self._reply_error(r.link, r.sender, r.conn_id, status, text,
                                  close=close or r.close_after, page=page)
        r.cancelled = True
        # Answered: the connection moves on now, even if a worker still holds
        # `r` (after a 504 it may never answer), or a pipelined request would
        # wait behind it with no deadline of its own.
        self._forget(r, cancel=False)

    def _record(self, r: Request, status: int) -> None:
        if self.record:
            self.done.append(Done(
                r.link, r.conn_id, r.method.decode("latin-1"),
                (r.uri or _path_of(r.raw)).decode("latin-1"),
                r.service.name, r.worker_label, status, len(r.raw), r.bytes_out,
                r.received_at, self._now, r.attempts))

    def _cancel_at_worker(self, r: Request) -> None:
        w = r.worker
        if w is not None and not r.cancelled:
            self.to_workers.append([
                w.ident, p.VERSION, p.CMD[p.Command.CANCEL], p.encode_request_id(r.rid),
            ])

    def _forget(self, r: Request, *, cancel: bool) -> None:
        """Drop `r` from every index and start the next request on its connection.

        A request that a worker still holds stays in `requests` (cancelled)
        until that worker's last reply, or its removal, frees the slot.
        """
        if cancel:
            self._cancel_at_worker(r)
            r.cancelled = True
        r.service.queue.pop(r.rid, None)
        r.service.active.pop(r.rid, None)
        if r.worker is None and self.requests.pop(r.rid, None) is not None and r.upload:
            self.to_unlink.append(r.upload)  # over: nobody reads its body any more
            self.inline_bytes -= r.inline
        key = (r.link, r.conn_id)
        on_conn = self.connections.get(key)
        if not on_conn:
            return
        if on_conn[0] is r:
            on_conn.popleft()
            if not on_conn:
                del self.connections[key]
            elif key not in self._starting:  # else the loop up the stack routes it
                self._start_next(key, on_conn)
        elif r in on_conn:
            on_conn.remove(r)

    def _start_next(self, key: tuple[int, int], on_conn: deque[Request]) -> None:
        """Route the new head of a connection, and the next while heads fail at once.

        A loop, not recursion: a head that fails at once (no worker, queue full)
        is forgotten inside `_route`, and that `_forget` leaves the next head to
        this loop, so a long pipeline cannot overflow the stack.
        """
        self._starting.add(key)
        try:
            while on_conn:
                head = on_conn[0]
                self._route(head, self._now)
                if on_conn and on_conn[0] is head:
                    break  # queued or sent: it has a deadline now
        finally:
            self._starting.discard(key)

    def _unacked_add(self, key: tuple[int, int], n: int) -> None:
        """`n` more reply bytes are on their way to connection `key` (flow control)."""
        if n > 0:
            self.unacked[key] = self.unacked.get(key, 0) + n
            self.unacked.move_to_end(key)
            if len(self.unacked) > MAX_UNACKED_CONNECTIONS:
                self.unacked.popitem(last=False)

    def _reply_error(self, link: int, sender: bytes, conn_id: int, status: int,
                     text: str | None = None, *, close: bool = False,
                     page: bytes | None = None) -> None:
        headers: list[tuple[bytes, bytes]] = []
        if status == 503:
            headers.append((b"Retry-After", b"%d" % self.settings.retry_after_s))
        if page is None:
            body = m2.error_response(status, text, headers=headers, close=close)
        else:
            headers += [(b"Content-Type", b"text/html; charset=utf-8"),
                        (b"Content-Length", b"%d" % len(page))]
            if close:
                headers.append((b"Connection", b"close"))
            body = m2.http_response(status, headers, page)
        try:
            self.to_mongrel2.append((link, m2.reply(sender, conn_id, body)))
            if close:
                self.to_mongrel2.append((link, m2.close_reply(sender, conn_id)))
            if link in self.link_credits:  # Mongrel2 credits these bytes back too
                self._unacked_add((link, conn_id), len(body))
        except ValueError:
            self.warnings.warning("unanswerable sender", self._now,
                                  "cannot answer sender %r conn %d", sender, conn_id)

    def _answer_malformed(self, link: int, raw: bytes, status: int) -> None:
        """Answer a malformed message if its sender and conn id are readable."""
        parts = raw.split(b" ", 2)
        if len(parts) == 3 and parts[1].isdigit() and len(parts[1]) <= 20 and parts[0]:
            self._reply_error(link, parts[0], int(parts[1]), status, "malformed request",
                              close=True)

    # ---- management (ops/control.py) ---------------------------------------

    def drain_worker(self, w: Worker) -> bool:
        """Recycle (`ctl recycle`): `w` gets no new request and is sent DRAIN,
        which a worker takes as SIGTERM (protocol.md 3.7): it finishes what it
        holds, says DRAIN (acked as usual), then BYE, and its pool starts a new
        process. False if it is already leaving."""
        if w.leaving or self.workers.get(w.ident) is not w:
            return False
        w.draining = w.leaving = True
        self._update_ready(w)
        self.to_workers.append([w.ident, p.VERSION, p.CMD[p.Command.DRAIN]])
        return True

    def drain(self, now: float, *, service: str = "", label: str = "") -> list[Worker]:
        """Operator drain (HAProxy's): the workers of `service`, or the worker
        labelled `label`, get no new request; what they hold finishes; they
        stay connected, listed as draining, until `undrain`. Kept by name, so
        a worker that reconnects stays drained. The workers newly drained."""
        if service:
            self.drained_services.add(service)
        if label:
            self.drained_labels.add(label)
        return [w for w in list(self.workers.values()) if self._apply_drains(w, now)]

    def undrain(self, now: float, *, service: str = "", label: str = "") -> list[Worker]:
        """Undo `drain` of `service` / `label`; the workers that take requests
        again (one still drained by another of its names stays drained)."""
        self.drained_services.discard(service)
        self.drained_labels.discard(label)
        return [w for w in list(self.workers.values()) if self._apply_drains(w, now)]

    def _operator_drained(self, w: Worker) -> bool:
        return w.label in self.drained_labels or any(
            sv.name in self.drained_services for sv in w.services)

    def _apply_drains(self, w: Worker, now: float) -> bool:
        """Bring `w.held` in line with the operator's drains; whether it changed."""
        held = self._operator_drained(w)
        if held == w.held:
            return False
        w.held = held
        w.draining = held or w.leaving
        self._update_ready(w)
        if not w.draining:
            self._pull_queued(w, now)
        return True

    def add_route(self, spec: str, service: str) -> Route:
        """Route `spec` to `service` as broker configuration (wins over what
        workers announce). Raises ValueError on a bad spec or service name."""
        if not service or any(c.isspace() for c in service):
            raise ValueError(f"bad service name {service!r}")
        route = parse_route(spec)
        self.book.configure(route, service)
        self._service(service)
        return route

    def remove_route(self, spec: str) -> str | None:
        """Remove the route `spec`: its configuration if it is configured (a
        worker's claim on it, if any, then maps it again), else the workers'
        claim (they announce it again on their next HELLO). The service it
        mapped to, or None."""
        route = parse_route(spec)
        service = self.book.unconfigure(route)
        if service is None:
            service = self.book.drop(route)
        old = self.services.get(service or "")
        if old is not None:
            self._maybe_forget_service(old)
        return service

    @property
    def configured(self) -> dict[Route, str]:
        """The broker's own routes (route -> service)."""
        return self.book.configured

    def snapshot(self, now: float) -> dict[str, Any]:
        """The state an operator looks at (control `status`, metrics, status
        page), as plain JSON-able data. O(services + workers + routes)."""
        routes: dict[str, list[str]] = {}
        for route, name in self.routes.routes():
            routes.setdefault(name, []).append(str(route))
        services = [{
            "name": sv.name, "routes": routes.get(sv.name, []), "queued": len(sv.queue),
            "in_flight": len(sv.active), "workers": len(sv.workers), "ready": len(sv.ready),
            # An ejected worker's slots do not count (outlier ejection).
            "capacity": sum(w.capacity for w in sv.workers.values() if not w.ejected_until),
            "ejected": sum(1 for w in sv.workers.values() if w.ejected_until),
            "timeout_s": sv.timeout_s, "drained": sv.name in self.drained_services,
        } for sv in sorted(self.services.values(), key=lambda sv: sv.name)]
        workers = [{
            "id": w.ident.hex(), "label": w.label, "services": [sv.name for sv in w.services],
            "capacity": w.capacity, "in_flight": len(w.in_flight), "draining": w.draining,
            "state": "leaving" if w.leaving else "draining" if w.held else "ready",
            "served": w.served, "age_s": round(now - w.connected_at, 3),
            "ejected_s": round(max(0.0, w.ejected_until - now), 3) if w.ejected_until else 0,
            "heartbeat_s": w.expiry_s / self.settings.liveness,
        } for w in self.workers.values()]
        return {"services": services, "workers": workers,
                "drained": {"services": sorted(self.drained_services),
                            "workers": sorted(self.drained_labels)},
                "counters": {f: getattr(self.counters, f) for f in Counters.__slots__},
                "requests": len(self.requests), "connections": len(self.connections),
                "refused_hellos": [{**r, "age_s": round(now - r["at"], 3)}
                                   for r in self.refusals],
                "orphaned_routes": [{"route": str(route), "service": name,
                                     "forget_in_s": round(max(0.0, at - now), 3)}
                                    for route, name, at in self.book.orphaned()],
                "limits": {"workers": [len(self.workers), self.settings.max_workers],
                           "services": [len(self.services), self.settings.max_services],
                           "routes": [len(self.book.claims), self.settings.max_routes]}}

    def check_invariants(self) -> None:
        """For tests: raise AssertionError if the state is inconsistent."""
        where: dict[int, str] = {}  # rid -> the one place it is in

        def place(r: Request, here: str) -> None:
            if r.rid in where:
                raise AssertionError(f"request {r.rid} in {where[r.rid]} and {here}")
            if self.requests.get(r.rid) is not r:
                raise AssertionError(f"request {r.rid} in {here} but not in requests")
            where[r.rid] = here

        def ordered(pending: OrderedDict[int, Request], what: str) -> None:
            deadlines = [r.deadline for r in pending.values()]
            if deadlines != sorted(deadlines):
                raise AssertionError(f"{what} not in deadline order: {deadlines}")

        for service in self.services.values():
            for ident, w in service.workers.items():
                if self.workers.get(ident) is not w or service not in w.services:
                    raise AssertionError(f"{service.name}: stale worker {w.label}")
            if self.services.get(service.name) is not service:
                raise AssertionError(f"service {service.name} listed under another name")
            for ident, w in service.ready.items():
                if self.workers.get(ident) is not w or w.draining or w.ejected_until:
                    raise AssertionError(f"{service.name}: dead, draining or ejected worker "
                                         "ready")
                if len(w.in_flight) >= w.capacity:
                    raise AssertionError(f"{service.name}: full worker ready")
            if service.ready and service.queue:
                raise AssertionError(f"{service.name}: requests queued while a worker is ready")
            ordered(service.queue, f"{service.name} queue")
            ordered(service.active, f"{service.name} active")
            for r in service.queue.values():
                if r.worker is not None or r.cancelled or r.service not in (
                        service, self._ws_services.get(service.name)):
                    raise AssertionError("queued request is also elsewhere")
                if self.connections.get((r.link, r.conn_id), (None,))[0] is not r:
                    raise AssertionError(f"queued request {r.rid} not first on its connection")
                place(r, "queue")
            for r in service.active.values():
                if r.worker is None or r.cancelled or r.worker.in_flight.get(r.rid) is not r:
                    raise AssertionError(f"active request {r.rid} is not at a worker")
        for (link, conn_id), n in self.unacked.items():
            if n <= 0 or link not in self.link_credits:
                raise AssertionError(f"unacked {n} on conn {conn_id} of link {link}")
        if len(self.unacked) > MAX_UNACKED_CONNECTIONS:
            raise AssertionError("too many connections with unacked bytes")
        for w in self.workers.values():
            if len(w.in_flight) > w.capacity:
                raise AssertionError(f"worker {w.label} over capacity")
            if w.held != self._operator_drained(w) or w.draining != (w.held or w.leaving):
                raise AssertionError(f"worker {w.label}: draining is not held or leaving")
            free = not w.draining and not w.ejected_until and len(w.in_flight) < w.capacity
            for service in w.services:
                if self.services.get(service.name) is not service:
                    raise AssertionError(f"worker {w.label}: service {service.name} forgotten")
                if service.workers.get(w.ident) is not w:
                    raise AssertionError(f"worker {w.label} missing from {service.name}")
                if (w.ident in service.ready) != free:
                    raise AssertionError(f"worker {w.label}: ready iff free, in {service.name}")
            for r in w.in_flight.values():
                if r.worker is not w:
                    raise AssertionError("in-flight request points at another worker")
                if not r.cancelled and (
                        r.rid not in r.service.active
                        or self.connections.get((r.link, r.conn_id), (None,))[0] is not r):
                    raise AssertionError(f"in-flight request {r.rid}: no deadline, or not "
                                         "first on its connection")
                place(r, f"worker {w.label}")
        for key, on_conn in self.connections.items():
            if not on_conn:
                raise AssertionError(f"connection {key} with no request")
            for i, r in enumerate(on_conn):
                if (r.link, r.conn_id) != key or r.cancelled:
                    raise AssertionError(f"connection {key}: foreign or cancelled request")
                if i == 0 and r.rid not in where:
                    raise AssertionError(f"connection {key}: first request neither queued "
                                         "nor at a worker")
                if i > 0:
                    place(r, f"connection {key} backlog")
        for rid in self.requests:
            if rid not in where:
                raise AssertionError(f"request {rid} is nowhere")
        inlined = sum(r.inline for r in self.requests.values())
        if inlined != self.inline_bytes:
            raise AssertionError(f"inline_bytes {self.inline_bytes} != {inlined} held")
        self.book.check()
        for w in self.workers.values():
            for route in w.routes:
                claim = self.book.claims.get(route)
                if claim is not None and w.ident not in claim.workers:
                    raise AssertionError(f"worker {w.label}: not in the claim of {route}")
        for service in self.services.values():
            if not service.workers and not self.book.owns(service.name) \
                    and not service.queue and not service.active:
                raise AssertionError(f"service {service.name} kept with nothing to keep it")


def _chunked(req: m2.Message) -> bool:
    """A chunked body: Mongrel2 spools it whatever its size, with no Content-Length."""
    return b"chunked" in (req.header(b"transfer-encoding") or b"").lower()


def _wants_close(req: m2.Message) -> bool:
    connection = req.header(b"connection")
    if req.header(b"VERSION") == b"HTTP/1.0":
        return connection is None or connection.lower() != b"keep-alive"
    return connection is not None and b"close" in connection.lower()


_HANDSHAKE = b"WEBSOCKET_HANDSHAKE"


def _websocket_upgrade(req: m2.Message) -> bool:
    """An HTTP request asking for a WebSocket (RFC 6455 4.1) that Mongrel2 did not
    take as a handshake: it lacks a valid key or version."""
    value = req.headers.get(b"upgrade")
    values = value if isinstance(value, list) else [value] if value else []
    return any(b"websocket" in v.lower() for v in values)


def _status_of(message: bytes, offset: int) -> int:
    """The status code of the HTTP response starting at `offset`, or 0."""
    line = message[offset:offset + 12]
    return int(line[9:12]) if line[:5] == b"HTTP/" and line[9:12].isdigit() else 0


def _path_of(raw: bytes) -> bytes:
    """PATH of a Mongrel2 request message ('SENDER ID PATH ...')."""
    parts = raw.split(b" ", 3)
    return parts[2] if len(parts) > 3 else b""


def _head(pending: OrderedDict[int, Request]) -> Request:
    """The oldest entry of a deadline-ordered dict."""
    return next(iter(pending.values()))
