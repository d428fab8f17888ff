"""RouteBook: configured routes, claims, conflicts and the grace of orphans."""

from __future__ import annotations

import math

from scale0.core.routebook import RouteBook
from scale0.core.routing import RouteTable, parse_route

A, B = parse_route("/a"), parse_route("example.com/")


def book(grace_s: float = 10.0) -> RouteBook:
    return RouteBook(RouteTable(), grace_s=grace_s)


def mapped(b: RouteBook) -> list[tuple[str, str]]:
    b.check()
    return [(str(r), s) for r, s in b.table.routes()]


def test_claims_are_shared_by_one_service_and_refused_to_another() -> None:
    b = book()
    b.claim(b"w1", [(A, "app")])
    b.claim(b"w2", [(A, "app")])
    assert b.conflict(b"w3", [(A, "app")]) is None
    conflict = b.conflict(b"w3", [(B, "x"), (A, "x")])
    assert conflict is not None and (str(conflict.route), conflict.owner) == ("/a", "app")
    assert conflict.origin == "worker"
    # Its own claim never stands in a worker's way.
    b.release(b"w2", [A], 0.0, deliberate=True)
    assert b.conflict(b"w1", [(A, "other")]) is None
    assert mapped(b) == [("/a", "app")]


def test_deliberate_release_drops_at_once_a_crash_keeps_it_for_the_grace() -> None:
    b = book(grace_s=10.0)
    b.claim(b"w1", [(A, "app"), (B, "site")])
    assert b.release(b"w1", [A], 1.0, deliberate=True) == ["app"]
    assert mapped(b) == [("example.com/", "site")]
    assert b.release(b"w1", [B], 2.0, deliberate=False) == []
    assert b.orphaned() == [(B, "site", 12.0)] and b.next_deadline() == 12.0
    assert b.conflict(b"w9", [(B, "other")]) is not None  # still owned in its grace
    assert b.expire(11.99) == []
    assert b.expire(12.0) == [(B, "site")]
    assert mapped(b) == [] and b.claims_of == {} and b.next_deadline() == math.inf


def test_a_claim_in_its_grace_is_taken_back_by_its_service() -> None:
    b = book()
    b.claim(b"w1", [(A, "app")])
    b.release(b"w1", [A], 0.0, deliberate=False)
    b.claim(b"w2", [(A, "app")])
    assert b.orphaned() == [] and b.expire(100.0) == []
    assert mapped(b) == [("/a", "app")]


def test_configured_routes_win_and_uncovering_one_shows_the_claim_again() -> None:
    b = book()
    b.claim(b"w1", [(A, "app")])
    b.configure(A, "admin")
    assert mapped(b) == [("/a", "admin")]
    conflict = b.conflict(b"w2", [(A, "app")])
    assert conflict is not None and conflict.origin == "broker"
    assert conflict.text() == ("route /a belongs to service admin (the broker's route "
                               "table); not taken over by service app")
    assert b.unconfigure(A) == "admin" and mapped(b) == [("/a", "app")]
    assert b.unconfigure(A) is None
    assert b.drop(A) == "app" and mapped(b) == []
    assert b.owns("app") is False


def test_new_routes_counts_only_unknown_ones() -> None:
    b = book()
    b.configure(A, "x")
    b.claim(b"w", [(parse_route("/c"), "y")])
    assert b.new_routes([A, parse_route("/c"), B, B]) == 1
