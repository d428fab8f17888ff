"""The dispatcher's state, and the small helpers every concern shares.

`DispatchState` is the base of the `Dispatcher` (core/dispatch.py): it owns
every index the invariants speak of (services with their LRU ready queues,
workers, requests, connections, the flow-control windows) and the two
outboxes. The concerns build on it, each in its module, one class on the
next, so that a method only calls what is below it:

    DispatchState     (core/dispatch_state.py)  indexes, ready queues, answers
    Lifecycle         (core/lifecycle.py)       route, send, fail, forget, finish
    Registry          (core/registry.py)        HELLO, removal, expiry, ejection, drains
    Bodies            (core/bodies.py)          uploads, streamed bodies, credits
    WebSockets        (core/websockets.py)      handshakes, frames, idle timeouts
    Mongrel2Events    (core/mongrel2_events.py) on_mongrel2: HTTP requests, disconnects
    WorkerEvents      (core/worker_events.py)   on_worker: the S0W1 command table
    Dispatcher        (core/dispatch.py)        settings, on_tick, snapshot: the facade

Nothing here touches a socket or a clock: `now` comes with every event.
"""

from __future__ import annotations

import logging
import random
from collections import OrderedDict, deque
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from scale0.core.ratelog import RateLimitedLog
from scale0.core.records import Counters, Done, Request, Service, Worker, path_of
from scale0.core.routebook import RouteBook
from scale0.core.routing import RouteTable, parse_route
from scale0.wire import mongrel2_reply as m2r
from scale0.wire import s0w1 as p

if TYPE_CHECKING:
    from scale0.core.dispatch import DispatchSettings

log = logging.getLogger(__name__)

# Connections with reply bytes not yet credited by Mongrel2, at most; the oldest
# is forgotten past this (only one whose credits never came: its client left).
MAX_UNACKED_CONNECTIONS = 65536
MAX_REFUSALS_KEPT = 16


class DispatchState:
    def __init__(self, settings: DispatchSettings) -> None:
        self.settings = s = settings
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
        # them (net/spool_files.py) and empties the list.
        self.to_unlink: list[bytes] = []
        # The loop's reader of spooled bodies (net/spool_files.py read), when it shares Mongrel2's
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
        # Workers at which requests wait (prefetch, protocol.md 4.6): where
        # on_tick looks for requests to recall.
        self.prefetching: dict[bytes, Worker] = {}
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
        self._next_recall = 0.0  # when on_tick next looks for stalled workers (prefetch)
        self._next_keepalive = s.keepalive_s
        self._timeouts = dict(s.service_timeouts)
        self._maintenance = dict(s.maintenance_pages)
        # Per service, its WebSocket twin (see on_websocket).
        self._ws_services: dict[str, Service] = {}
        for spec, service in s.routes:
            self.book.configure(parse_route(spec), service)
            self._service(service)

    def _service(self, name: str) -> Service:
        service = self.services.get(name)
        if service is None:
            service = self.services[name] = Service(
                name, name.encode(),
                timeout_s=self._timeouts.get(name, self.settings.request_timeout_s))
        return service

    def _update_ready(self, w: Worker) -> None:
        """Put `w` where dispatch looks for it: in each service's `ready` LRU
        while it has a free slot; in its `room` bucket while its slots are
        taken and it has prefetch room; in `prefetching` while requests wait at it."""
        n = len(w.in_flight)
        taking = not w.draining and not w.ejected_until and w.ident in self.workers
        free = taking and n < w.capacity
        for service in w.services:
            if free:
                if w.ident not in service.ready:
                    service.ready[w.ident] = w  # re-insert at the back: LRU
            else:
                service.ready.pop(w.ident, None)
        if w.prefetch:
            waiting = n - w.capacity
            level = waiting if taking and 0 <= waiting < w.prefetch else -1
            if level != w.room_level:
                self._move_room(w, level)
            if waiting > 0:
                self.prefetching[w.ident] = w
            else:
                self.prefetching.pop(w.ident, None)

    def _move_room(self, w: Worker, level: int) -> None:
        """Move `w` to bucket `level` of its services' `room` (-1: out of it)."""
        for service in w.services:
            room = service.room
            if w.room_level >= 0:
                bucket = room.get(w.room_level)
                if bucket is not None:
                    bucket.pop(w.ident, None)
                    if not bucket:
                        del room[w.room_level]
            if level >= 0:
                bucket = room.get(level)
                if bucket is None:
                    bucket = room[level] = OrderedDict()
                bucket[w.ident] = w  # at the back: least recently given one first
        w.room_level = level

    def _stalled(self, w: Worker, now: float) -> bool:
        """`w` finished nothing for recall_after_s while busy: what waits
        there may wait long (protocol.md 4.6)."""
        return now - w.progress_at >= self.settings.recall_after_s

    def _prefetch_target(self, service: Service, now: float) -> Worker | None:
        """The worker a request of `service` may wait at: fewest waiting
        first, least recently given one among equals, never a stalled one
        (which leaves `room` until it progresses). None: none has room."""
        room = service.room
        for level in sorted(room):
            bucket = room.get(level)
            while bucket:
                w = next(iter(bucket.values()))
                if not self._stalled(w, now):
                    return w
                self._move_room(w, -1)  # back in at its next LAST (_update_ready)
                bucket = room.get(level)
        return None

    def _credited(self, key: tuple[int, int], credits: int) -> None:
        left = self.unacked.get(key)
        if left is not None:
            if left > credits:
                self.unacked[key] = left - credits
            else:
                del self.unacked[key]

    def _record(self, r: Request, status: int) -> None:
        if self.record:
            self.done.append(Done(
                r.link, r.conn_id, r.method.decode("latin-1"),
                (r.uri or path_of(r.raw)).decode("latin-1"),
                r.service.name, r.worker_label, status, len(r.raw), r.bytes_out,
                r.received_at, self._now, r.attempts))

    def _cancel_at_worker(self, r: Request) -> None:
        w = r.worker
        if w is not None and not r.cancelled:
            self.to_workers.append([
                w.ident, p.VERSION, p.CMD[p.Command.CANCEL], p.encode_request_id(r.rid),
            ])

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
            body = m2r.error_response(status, text, headers=headers, close=close)
        else:
            headers += [(b"Content-Type", b"text/html; charset=utf-8"),
                        (b"Content-Length", b"%d" % len(page))]
            if close:
                headers.append((b"Connection", b"close"))
            body = m2r.http_response(status, headers, page)
        try:
            self.to_mongrel2.append((link, m2r.reply(sender, conn_id, body)))
            if close:
                self.to_mongrel2.append((link, m2r.close_reply(sender, conn_id)))
            if link in self.link_credits:  # Mongrel2 credits these bytes back too
                self._unacked_add((link, conn_id), len(body))
        except m2r.ReplyError:
            self.warnings.warning("unanswerable sender", self._now,
                                  "cannot answer sender %r conn %d", sender, conn_id)

    def _answer_malformed(self, link: int, raw: bytes, status: int) -> None:
        """Answer a malformed message if its sender and conn id are readable."""
        parts = raw.split(b" ", 2)
        if len(parts) == 3 and parts[1].isdigit() and len(parts[1]) <= 20 and parts[0]:
            self._reply_error(link, parts[0], int(parts[1]), status, "malformed request",
                              close=True)

    def _operator_drained(self, w: Worker) -> bool:
        return w.label in self.drained_labels or any(
            sv.name in self.drained_services for sv in w.services)

    def _maybe_forget_service(self, service: Service) -> None:
        """Forget a service that nothing refers to any more: no worker, no
        route (configured, or claimed and in its grace), nothing pending.
        A request still holding the object (one pipelined behind another)
        gets 503 from it, as from any service without workers."""
        if (not service.workers and not service.queue and not service.active
                and not self.book.owns(service.name)
                and self.services.get(service.name) is service):
            del self.services[service.name]
