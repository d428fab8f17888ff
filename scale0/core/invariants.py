"""The dispatcher's invariants, checked (core/dispatch.py lists them).

`check(d)` raises AssertionError if `d`'s indexes disagree; the tests call it
(through `Dispatcher.check_invariants`) after every step of the Hypothesis
state machine. O(everything): never on the broker's path.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import TYPE_CHECKING

from scale0.core import dispatch_state
from scale0.core.lifecycle import may_wait
from scale0.core.records import Request

if TYPE_CHECKING:
    from scale0.core.dispatch import Dispatcher


def check(d: Dispatcher) -> None:
    """For tests: raise AssertionError if the state is inconsistent."""
    where: dict[int, str] = {}  # rid -> the one place it is in

    def place(r: Request, here: str) -> None:
        if r.rid in where:
            raise AssertionError(f"request {r.rid} in {where[r.rid]} and {here}")
        if d.requests.get(r.rid) is not r:
            raise AssertionError(f"request {r.rid} in {here} but not in requests")
        where[r.rid] = here

    def ordered(pending: OrderedDict[int, Request], what: str) -> None:
        deadlines = [r.deadline for r in pending.values()]
        if deadlines != sorted(deadlines):
            raise AssertionError(f"{what} not in deadline order: {deadlines}")

    for service in d.services.values():
        for ident, w in service.workers.items():
            if d.workers.get(ident) is not w or service not in w.services:
                raise AssertionError(f"{service.name}: stale worker {w.label}")
        if d.services.get(service.name) is not service:
            raise AssertionError(f"service {service.name} listed under another name")
        for ident, w in service.ready.items():
            if d.workers.get(ident) is not w or w.draining or w.ejected_until:
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
                    service, d._ws_services.get(service.name)):
                raise AssertionError("queued request is also elsewhere")
            if d.connections.get((r.link, r.conn_id), (None,))[0] is not r:
                raise AssertionError(f"queued request {r.rid} not first on its connection")
            place(r, "queue")
        for r in service.active.values():
            if r.worker is None or r.cancelled or r.worker.in_flight.get(r.rid) is not r:
                raise AssertionError(f"active request {r.rid} is not at a worker")
    for (link, conn_id), n in d.unacked.items():
        if n <= 0 or link not in d.link_credits:
            raise AssertionError(f"unacked {n} on conn {conn_id} of link {link}")
    if len(d.unacked) > dispatch_state.MAX_UNACKED_CONNECTIONS:
        raise AssertionError("too many connections with unacked bytes")
    for service in d.services.values():
        for level, bucket in service.room.items():
            if not bucket:
                raise AssertionError(f"{service.name}: empty room bucket {level}")
            for ident, w in bucket.items():
                if (d.workers.get(ident) is not w or w.draining or w.ejected_until
                        or w.room_level != level or len(w.in_flight) - w.capacity != level
                        or not 0 <= level < w.prefetch or service not in w.services):
                    raise AssertionError(f"{service.name}: worker {w.label} in room {level} "
                                         f"with {len(w.in_flight)} of {w.capacity}+{w.prefetch}")
    for ident, w in d.prefetching.items():
        if d.workers.get(ident) is not w or len(w.in_flight) <= w.capacity:
            raise AssertionError(f"worker {w.label} prefetching with nothing waiting")
    for w in d.workers.values():
        if len(w.in_flight) > w.capacity + w.prefetch:
            raise AssertionError(f"worker {w.label} over capacity and prefetch")
        if len(w.in_flight) > w.capacity and w.ident not in d.prefetching:
            raise AssertionError(f"worker {w.label}: requests wait there, not in prefetching")
        for r in list(w.in_flight.values())[w.capacity:]:
            if not may_wait(r):
                raise AssertionError(f"request {r.rid} ({r.method!r}) waits at {w.label}")
        for service in w.services:
            if w.room_level >= 0 and w.ident not in service.room.get(w.room_level, {}):
                raise AssertionError(f"worker {w.label} missing from {service.name}'s room")
        if w.held != d._operator_drained(w) or w.draining != (w.held or w.leaving):
            raise AssertionError(f"worker {w.label}: draining is not held or leaving")
        free = not w.draining and not w.ejected_until and len(w.in_flight) < w.capacity
        for service in w.services:
            if d.services.get(service.name) is not service:
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
                    or d.connections.get((r.link, r.conn_id), (None,))[0] is not r):
                raise AssertionError(f"in-flight request {r.rid}: no deadline, or not "
                                     "first on its connection")
            place(r, f"worker {w.label}")
    for key, on_conn in d.connections.items():
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
    for rid in d.requests:
        if rid not in where:
            raise AssertionError(f"request {rid} is nowhere")
    inlined = sum(r.inline for r in d.requests.values())
    if inlined != d.inline_bytes:
        raise AssertionError(f"inline_bytes {d.inline_bytes} != {inlined} held")
    d.book.check()
    for w in d.workers.values():
        for route in w.routes:
            claim = d.book.claims.get(route)
            if claim is not None and w.ident not in claim.workers:
                raise AssertionError(f"worker {w.label}: not in the claim of {route}")
    for service in d.services.values():
        if not service.workers and not d.book.owns(service.name) \
                and not service.queue and not service.active:
            raise AssertionError(f"service {service.name} kept with nothing to keep it")
