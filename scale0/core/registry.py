"""The worker registry: HELLO, removal, expiry, ejection and drains.

protocol.md section 4.2 (its states: core/worker_states.py). A worker is
registered by an accepted HELLO and is in the ready LRU of each of its
services while it takes requests (`_update_ready`); it is removed by BYE,
heartbeat expiry, EHOSTUNREACH or a new HELLO on its identity, and its
requests are then retried once if safe, else answered 502. Its routes go
with it (at once after BYE, after the route grace otherwise:
core/routebook.py). Drains and routes changed by the operator (ops/control.py)
are here too.
"""

from __future__ import annotations

import logging

from scale0.core.lifecycle import Lifecycle
from scale0.core.records import SAFE_TO_RETRY, Worker
from scale0.core.routing import Route, parse_route
from scale0.wire import s0w1 as p

log = logging.getLogger(__name__)

MAX_EJECTION_FACTOR = 10  # an ejection lasts eject_s x min(ejections, this)
MIN_PEER_HEARTBEAT_S = 0.01  # protocol.md 3.1: heartbeat_ms is at least 10
_RECALL = p.CMD[p.Command.RECALL]


class Registry(Lifecycle):
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
                   streams_bodies=hello.meta.get("bodies") == "stream",
                   prefetch=hello.prefetch)
        w.draining = w.held = self._operator_drained(w)  # kept over a reconnect
        self.workers[ident] = w
        for service in services:
            service.workers[ident] = w
        self.to_workers.append([ident, *p.welcome("scale0", int(self.settings.heartbeat_s * 1000))])
        log.info("worker %s ready: services=%s capacity=%d prefetch=%d heartbeat=%gs", w.label,
                 ",".join(s.name for s in services), w.capacity, w.prefetch,
                 expiry_s / self.settings.liveness)
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
        if w.room_level >= 0:
            self._move_room(w, -1)
        self.prefetching.pop(w.ident, None)
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

    def _recall_stalled(self, now: float) -> None:
        """Take back what waits at stalled workers for the free ones (protocol.md
        4.6): per service, at most one RECALL per worker ready now, newest
        waiting request first (the furthest from its turn). Each request is
        recalled at most once; one its worker has started meanwhile simply
        runs there. O(workers with waiting requests)."""
        self._next_recall = now + self.settings.recall_after_s / 2
        wanted: dict[str, int] = {}  # service -> RECALLs it can still use
        for w in list(self.prefetching.values()):
            if not self._stalled(w, now):
                continue
            waiting = list(w.in_flight.values())[w.capacity:]
            for r in reversed(waiting):
                if r.recalled or r.cancelled or r.reply_started:
                    continue
                service = r.service
                free = wanted.get(service.name)
                if free is None:
                    free = wanted[service.name] = len(service.ready)
                if free <= 0:
                    continue
                wanted[service.name] = free - 1
                r.recalled = True
                self.counters.recalls += 1
                self.to_workers.append([w.ident, p.VERSION, _RECALL, p.encode_request_id(r.rid)])

    def _on_return(self, w: Worker, frames: list[bytes], now: float) -> None:
        """RETURN: a recalled request that `w` never started. It was no
        attempt; it is routed again, to a free worker if one is left."""
        if len(frames) != 3:
            raise p.WireError("RETURN takes one request id")
        rid = p.decode_request_id(frames[2])
        r = w.in_flight.get(rid)
        if r is None:
            self.counters.late_replies += 1  # it ended here meanwhile (a 504's LAST came first)
            return
        if not r.recalled or r.reply_started:
            raise p.WireError(f"RETURN of request {rid}, which was not recalled")
        del w.in_flight[rid]
        r.worker = None
        r.attempts -= 1
        r.service.active.pop(rid, None)
        self.counters.returns += 1
        self._update_ready(w)
        if r.cancelled:
            self._forget(r, cancel=False)
        else:
            self._route(r, now)
        self._pull_queued(w, now)

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
