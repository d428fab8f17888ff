"""Who owns each route, and for how long: the broker's routing state. Pure, no I/O.

Theory of operation
-------------------
A route comes from one of two origins:

* **configured**: the broker's own route table (``--route``, ``ctl routes
  add``). It always wins: it maps the route in the lookup table whatever
  workers announce, and only an operator removes it.
* **claimed**: announced in the HELLO of one or more workers. A claim names
  one service and the identities of the workers that announced it. Workers
  of the same service may announce the same route (their claim is shared);
  a worker of another service may not take it over (`conflict`) while the
  claim has a worker of its own or is in its grace period, nor may it claim
  a configured route of another service.

A claim lives as long as its workers, and then:

* the last worker left deliberately (BYE, after a graceful stop): the claim
  is dropped at once, so requests fall through to the next matching route
  (or 404);
* the last worker crashed or expired: the claim stays for `grace_s`, still
  owning the route (the dispatcher answers 503 with Retry-After, as for any
  service without workers), so a pool that restarts in time keeps it. Then
  it is forgotten.

Invariants (checked by `check` in tests): the lookup table maps exactly the
configured routes to their service, plus every claimed route that is not
configured to its claim's service; a claim is in `_orphans` iff it has no
worker, ordered by `forget_at` (the grace is one constant, so appending keeps
the order and expiry pops from the front); `claims_of[service]` counts the
claims of each service. Every operation is O(routes it names); `expire` is
O(routes forgotten).
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass, field

from scale0.core.routing import Route, RouteTable

__all__ = ["Claim", "Conflict", "RouteBook"]


@dataclass(slots=True, eq=False)
class Claim:
    service: str
    workers: set[bytes] = field(default_factory=set)
    forget_at: float = 0.0  # while orphaned: when the grace ends; 0.0 while it has workers


@dataclass(frozen=True, slots=True)
class Conflict:
    """A route `service` may not announce: it belongs to `owner`."""

    route: Route
    service: str
    owner: str
    origin: str  # "broker" (configured) or "worker" (claimed by another service's workers)

    def text(self) -> str:
        whose = ("the broker's route table" if self.origin == "broker"
                 else "workers of that service")
        return (f"route {self.route} belongs to service {self.owner} ({whose}); "
                f"not taken over by service {self.service}")


class RouteBook:
    """Configured routes and workers' claims over one `RouteTable`."""

    def __init__(self, table: RouteTable, *, grace_s: float = 30.0) -> None:
        self.table = table
        self.grace_s = grace_s
        self.configured: dict[Route, str] = {}
        self.claims: dict[Route, Claim] = {}
        self.claims_of: dict[str, int] = {}  # service -> number of its claims
        self._orphans: OrderedDict[Route, Claim] = OrderedDict()

    # ---- configured routes ----------------------------------------------

    def configure(self, route: Route, service: str) -> None:
        self.table.add(route, service)
        self.configured[route] = service

    def unconfigure(self, route: Route) -> str | None:
        """Remove a configured route; a claim on it (if any) maps it again.
        The service it mapped to, or None if it was not configured."""
        service = self.configured.pop(route, None)
        if service is None:
            return None
        self.table.remove(route)
        claim = self.claims.get(route)
        if claim is not None:
            self.table.add(route, claim.service)
        return service

    # ---- claims ---------------------------------------------------------

    def conflict(self, ident: bytes, routes: Iterable[tuple[Route, str]]) -> Conflict | None:
        """The first of `routes` (route, service) that `ident` may not claim.

        `ident`'s own claims do not count against it: a worker announcing
        again (a new HELLO on its identity) may change its mind.
        """
        for route, service in routes:
            owner = self.configured.get(route)
            if owner is not None and owner != service:
                return Conflict(route, service, owner, "broker")
            claim = self.claims.get(route)
            if (claim is not None and claim.service != service
                    and (claim.forget_at or claim.workers - {ident})):
                return Conflict(route, service, claim.service, "worker")
        return None

    def new_routes(self, routes: Iterable[Route]) -> int:
        """How many of `routes` (distinct) are neither claimed nor configured."""
        return sum(1 for route in set(routes)
                   if route not in self.claims and route not in self.configured)

    def claim(self, ident: bytes, routes: Iterable[tuple[Route, str]]) -> None:
        """Record that `ident` serves `routes`; `conflict` must have passed."""
        for route, service in routes:
            claim = self.claims.get(route)
            if claim is not None and claim.service != service:
                # Only `ident`'s own old claim can differ here (see `conflict`).
                self._drop(route)
                claim = None
            if claim is None:
                claim = self.claims[route] = Claim(service)
                self.claims_of[service] = self.claims_of.get(service, 0) + 1
                if route not in self.configured:
                    self.table.add(route, service)
            elif claim.forget_at:
                claim.forget_at = 0.0
                del self._orphans[route]
            claim.workers.add(ident)

    def release(self, ident: bytes, routes: Iterable[Route], now: float, *,
                deliberate: bool) -> list[str]:
        """`ident` serves `routes` no more. A claim left without workers is
        dropped now if `deliberate`, else kept for the grace period. Returns
        the services whose last claim was dropped."""
        gone: list[str] = []
        for route in routes:
            claim = self.claims.get(route)
            if claim is None or ident not in claim.workers:
                continue
            claim.workers.discard(ident)
            if claim.workers:
                continue
            if deliberate or self.grace_s <= 0:
                if self._drop(route):
                    gone.append(claim.service)
            else:
                claim.forget_at = now + self.grace_s
                self._orphans[route] = claim
        return gone

    def expire(self, now: float) -> list[tuple[Route, str]]:
        """Forget the orphaned claims whose grace has ended: (route, service)."""
        forgotten: list[tuple[Route, str]] = []
        while self._orphans:
            route, claim = next(iter(self._orphans.items()))
            if claim.forget_at > now:
                break
            self._drop(route)
            forgotten.append((route, claim.service))
        return forgotten

    def next_deadline(self) -> float:
        if not self._orphans:
            return math.inf
        return next(iter(self._orphans.values())).forget_at

    def drop(self, route: Route) -> str | None:
        """Forget the claim on `route` at once (operator's `routes remove`)."""
        claim = self.claims.get(route)
        if claim is None:
            return None
        self._drop(route)
        return claim.service

    def _drop(self, route: Route) -> bool:
        """Remove the claim on `route`; True if it was its service's last."""
        claim = self.claims.pop(route)
        self._orphans.pop(route, None)
        if route not in self.configured:
            self.table.remove(route, claim.service)
        left = self.claims_of[claim.service] - 1
        if left:
            self.claims_of[claim.service] = left
            return False
        del self.claims_of[claim.service]
        return True

    # ---- reading --------------------------------------------------------

    def owns(self, service: str) -> bool:
        """Whether any route (configured or claimed) names `service`."""
        return service in self.claims_of or service in self.configured.values()

    def orphaned(self) -> list[tuple[Route, str, float]]:
        """Claims in their grace period: (route, service, forget_at)."""
        return [(route, c.service, c.forget_at) for route, c in self._orphans.items()]

    def check(self) -> None:
        """For tests: raise AssertionError if the state is inconsistent."""
        want = dict(self.configured)
        for route, claim in self.claims.items():
            want.setdefault(route, claim.service)
            if bool(claim.workers) == (route in self._orphans):
                raise AssertionError(f"claim {route}: orphaned iff it has no workers")
            if bool(claim.forget_at) != (route in self._orphans):
                raise AssertionError(f"claim {route}: forget_at set iff orphaned")
        have = {route: service for route, service in self.table.routes()}
        if have != want:
            raise AssertionError(f"route table {have} != configured + claimed {want}")
        counts: dict[str, int] = {}
        for claim in self.claims.values():
            counts[claim.service] = counts.get(claim.service, 0) + 1
        if counts != self.claims_of:
            raise AssertionError(f"claims_of {self.claims_of} != {counts}")
        deadlines = [c.forget_at for c in self._orphans.values()]
        if deadlines != sorted(deadlines):
            raise AssertionError("orphans not in forget_at order")
