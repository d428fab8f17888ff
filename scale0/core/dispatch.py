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

Layout
------
The Dispatcher is one object built by concern, one class on the next (see
core/dispatch_state.py for the stack): the records in core/records.py, the
request lifecycle in core/lifecycle.py, the worker registry in
core/registry.py, bodies and credits in core/bodies.py, WebSockets in
core/websockets.py, the Mongrel2 events in core/mongrel2_events.py, the
S0W1 command table in core/worker_events.py with its state machine in
core/worker_states.py, the invariants in core/invariants.py. This module
keeps the settings, time (`on_tick`, `next_deadline`, `shutdown`) and the
operator's view (`snapshot`); callers import from here only.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from scale0.core import invariants
from scale0.core.dispatch_state import MAX_REFUSALS_KEPT, MAX_UNACKED_CONNECTIONS
from scale0.core.records import (
    HANDSHAKE,
    SAFE_TO_RETRY,
    Counters,
    Done,
    Request,
    Service,
    Worker,
    head,
)
from scale0.core.worker_events import WorkerEvents
from scale0.core.worker_states import WorkerState, state_of
from scale0.wire import mongrel2_reply as m2r

__all__ = ["MAX_REFUSALS_KEPT", "MAX_UNACKED_CONNECTIONS", "SAFE_TO_RETRY", "Counters",
           "DispatchSettings", "Dispatcher", "Done", "Request", "Service", "Worker",
           "WorkerState", "state_of"]


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
    # are removed there once their request is over (net/spool_files.py). None: not here.
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
    # Prefetch (protocol.md 4.6): a worker holding waiting requests that has
    # finished nothing for this long is stalled; what waits there is recalled
    # for a free worker, and nothing more is sent to wait there.
    recall_after_s: float = 0.05


class Dispatcher(WorkerEvents):
    def __init__(self, settings: DispatchSettings | None = None) -> None:
        super().__init__(settings or DispatchSettings())

    # ---- time ----------------------------------------------------------

    def on_tick(self, now: float) -> None:
        self._now = now
        for service in self.services.values():
            queue, active = service.queue, service.active
            while queue and head(queue).deadline <= now:
                self.counters.queue_timeouts += 1
                self._fail(queue.popitem(last=False)[1], 503, "timed out in queue")
            while active and head(active).deadline <= now:
                r = active.popitem(last=False)[1]
                self.counters.request_timeouts += 1
                timed_out = r.worker
                self._fail(r, 504, "worker did not answer in time", close=r.reply_started)
                if timed_out is not None:
                    self._on_worker_timeout(timed_out, now)
        for twin in self._ws_services.values():
            while twin.active and head(twin.active).deadline <= now:
                self._ws_idle(twin.active.popitem(last=False)[1])
        if now >= self._next_keepalive:
            self._next_keepalive = now + self.settings.keepalive_s
            self._keep_alive(now)
        if now >= self._next_heartbeat:
            self._heartbeat(now)
        if now >= self.book.next_deadline():
            self._forget_routes(now)
        if self.prefetching and now >= self._next_recall:
            self._recall_stalled(now)
        self.warnings.flush(now)

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
                    self.to_mongrel2.append((r.link, m2r.keep_alive_reply(r.sender, r.conn_id)))

    def shutdown(self, now: float) -> int:
        """Answer every request still held (503, or a close if its reply had
        started) so that no client waits for a broker that is gone."""
        self._now = now
        left = [r for r in self.requests.values() if not r.cancelled]
        for r in left:
            if r.reply_started and r.method == HANDSHAKE:
                self._ws_close_frame(r, 1001, "broker shutting down")
            self._fail(r, 503, "broker shutting down", close=True)
        return len(left)

    def next_deadline(self) -> float:
        """When on_tick next has work. O(services); the loop calls it once per wake-up."""
        deadline = min(self._next_heartbeat, self._next_keepalive, self.book.next_deadline())
        if self.prefetching:  # while requests wait at workers: look for stalls now and then
            deadline = min(deadline, self._next_recall)
        for service in self.services.values():
            for pending in (service.queue, service.active):
                if pending:
                    deadline = min(deadline, head(pending).deadline)
        for twin in self._ws_services.values():
            if twin.active:
                deadline = min(deadline, head(twin.active).deadline)
        return deadline

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
            "capacity": w.capacity, "in_flight": len(w.in_flight), "prefetch": w.prefetch,
            "draining": w.draining,
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
        """For tests: raise AssertionError if the state is inconsistent
        (core/invariants.py)."""
        invariants.check(self)
