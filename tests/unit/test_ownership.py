"""The dispatcher's state learned from workers: route ownership, route
lifecycle (BYE vs crash, grace), limits, outlier ejection and per-worker
heartbeat timing. Pure, fake `now`, exact assertions; every step checks the
dispatcher's invariants (the Harness of test_dispatch.py)."""

from __future__ import annotations

import json

from scale0.core.dispatch import Dispatcher, DispatchSettings
from scale0.wire import s0w1 as p

from .test_dispatch import Cmd, Harness

# ---- route ownership --------------------------------------------------------------


def refused(h: Harness, ident: bytes) -> tuple[bytes, str]:
    """The one ERROR sent to `ident`: (code, text)."""
    (error,) = h.take_workers()
    assert (error.ident, error.command) == (ident, Cmd.ERROR)
    return error.args[0], error.args[1].decode()


def hello_raw(h: Harness, ident: bytes, services: dict[str, tuple[str, ...]],
              capacity: int = 1, heartbeat_ms: int = 1000) -> None:
    specs = tuple(p.ServiceSpec(name, routes) for name, routes in services.items())
    h.worker(ident, Cmd.HELLO, p.Hello(specs, capacity, worker=ident.decode(),
                                       heartbeat_ms=heartbeat_ms).encode())


def test_hello_for_another_service_on_an_owned_route_is_refused_and_shown() -> None:
    h = Harness()
    h.hello(b"w1", {"app": ("/", "/app")})
    h.now = 2.5
    hello_raw(h, b"evil", {"evil": ("/app/admin", "/")})
    code, text = refused(h, b"evil")
    assert code == b"409"
    assert text == ("route / belongs to service app (workers of that service); "
                    "not taken over by service evil")
    assert b"evil" not in h.d.workers and "evil" not in h.d.services
    # Nothing of it was registered: not even the route no one owned.
    assert h.d.routes.lookup(b"localhost", b"/app/admin").service == "app"  # type: ignore[union-attr]
    assert h.d.counters.hello_conflicts == 1
    snap = h.d.snapshot(4.0)
    assert snap["refused_hellos"] == [{"at": 2.5, "worker": "evil", "id": b"evil".hex(),
                                       "code": 409, "reason": text, "age_s": 1.5}]
    assert snap["counters"]["hello_conflicts"] == 1
    h.request(1, b"/")
    assert h.take_one_request().ident == b"w1"


def test_workers_of_one_service_share_a_route_and_it_lasts_until_the_last() -> None:
    h = Harness()
    h.hello(b"w1", {"app": ("/",)})
    h.hello(b"w2", {"app": ("/",)})
    assert h.d.book.claims[next(iter(h.d.book.claims))].workers == {b"w1", b"w2"}
    h.worker(b"w1", Cmd.BYE)
    h.request(1, b"/")
    assert h.take_one_request().ident == b"w2"
    # Another service still may not take it while w2 serves it.
    hello_raw(h, b"x", {"other": ("/",)})
    assert refused(h, b"x")[0] == b"409"


def test_a_worker_announcing_again_may_change_the_service_of_its_own_routes() -> None:
    h = Harness()
    h.hello(b"w1", {"old": ("/svc",)})
    h.hello(b"w1", {"new": ("/svc",)})
    assert h.d.routes.lookup(b"h", b"/svc").service == "new"  # type: ignore[union-attr]
    assert "old" not in h.d.services  # its only worker and route went to "new"


def test_broker_route_table_wins_and_its_own_service_may_announce_it() -> None:
    h = Harness(routes=(("example.com/", "site"),))
    hello_raw(h, b"x", {"other": ("example.com/",)})
    code, text = refused(h, b"x")
    assert (code, text) == (b"409", "route example.com/ belongs to service site (the "
                            "broker's route table); not taken over by service other")
    h.hello(b"w1", {"site": ("example.com/",)})
    h.worker(b"w1", Cmd.BYE)  # deliberately gone: the configured route stays
    assert h.d.routes.lookup(b"example.com", b"/").service == "site"  # type: ignore[union-attr]
    h.request(1, b"/", host=b"example.com")
    h.take_error(503, 1)


# ---- route lifecycle ----------------------------------------------------------


def test_bye_of_the_last_worker_removes_its_route_at_once_and_traffic_falls_back() -> None:
    h = Harness()
    h.hello(b"root", {"site": ("/",)})
    h.hello(b"api", {"api": ("/api",)})
    h.worker(b"api", Cmd.BYE)
    assert "api" not in h.d.services
    h.request(1, b"/api/x")
    sent = h.take_one_request()
    assert sent.ident == b"root"  # the next matching route
    h.serve(sent)
    h.take_mongrel2()
    h.worker(b"root", Cmd.BYE)
    h.request(2, b"/api/x")
    h.take_error(404, 2)
    assert h.d.services == {} and h.d.routes.routes() == []


def test_a_crashed_last_worker_leaves_its_route_for_the_grace_then_it_is_forgotten() -> None:
    page = b"<h1>back soon</h1>"
    h = Harness(heartbeat_s=1.0, liveness=3, route_grace_s=10.0,
                maintenance_pages=(("api", page),))
    h.hello(b"root", {"site": ("/",)}, heartbeat_ms=30_000)  # expires after 90 s
    h.hello(b"api", {"api": ("/api",)})
    for t in (1.0, 2.0):
        h.tick(t)
        h.take_workers()
    h.tick(3.0)  # api silent for 3 s: expired
    h.take_workers()
    assert b"api" not in h.d.workers
    assert h.d.snapshot(3.0)["orphaned_routes"] == [
        {"route": "/api", "service": "api", "forget_in_s": 10.0}]
    h.request(1, b"/api/x")
    (answer,) = h.take_mongrel2()
    assert answer.status == 503 and answer.headers[b"retry-after"] == b"5"
    assert answer.body.endswith(page)
    h.tick(12.99)
    assert "/api" in [str(r) for r, _ in h.d.routes.routes()]
    h.take_workers()
    h.tick(13.0)  # 3.0 + grace
    h.take_workers()
    assert h.d.counters.routes_forgotten == 1 and "api" not in h.d.services
    assert h.d.snapshot(13.0)["orphaned_routes"] == []
    h.request(2, b"/api/x")
    assert h.take_one_request().ident == b"root"


def test_a_worker_back_within_the_grace_keeps_the_route_and_others_stay_refused() -> None:
    h = Harness(route_grace_s=10.0)  # heartbeat 100 s: nobody expires here
    h.hello(b"api", {"api": ("/api",)})
    h.d.remove_worker(h.d.workers[b"api"], 0.5)  # unreachable: not deliberate
    hello_raw(h, b"evil", {"evil": ("/api",)})
    assert refused(h, b"evil") == (b"409", "route /api belongs to service api (workers of "
                                   "that service); not taken over by service evil")
    h.hello(b"api2", {"api": ("/api",)})
    h.tick(20.0)  # past the grace: nothing is forgotten, the claim has a worker
    h.take_workers()
    assert h.d.counters.routes_forgotten == 0
    assert h.d.book.claims and h.d.snapshot(20.0)["orphaned_routes"] == []


def test_route_grace_zero_forgets_at_once_even_after_a_crash() -> None:
    h = Harness(route_grace_s=0.0)
    h.hello(b"api", {"api": ("/api",)})
    h.d.remove_worker(h.d.workers[b"api"], 0.0)
    assert h.d.routes.routes() == [] and h.d.services == {}


# ---- limits ------------------------------------------------------------------


def test_limits_on_workers_services_and_routes_refuse_with_429() -> None:
    h = Harness(max_workers=2, max_services=3, max_routes=3)
    h.hello(b"w1", {"a": ("/a",)})
    h.hello(b"w2", {"a": ("/a",)})
    hello_raw(h, b"w3", {"a": ("/a",)})
    assert refused(h, b"w3") == (b"429", "broker full: 2 workers (max_workers)")
    h.hello(b"w1", {"a": ("/a",), "b": ("/b",)})  # a known identity is not a new worker
    hello_raw(h, b"w2", {"c": (), "d": (), "e": ()})
    assert refused(h, b"w2") == (b"429", "broker full: 2 services known, 3 new "
                                 "(max_services 3)")
    # w2 refused: its old registration stands.
    assert h.d.workers[b"w2"].services[0].name == "a"
    hello_raw(h, b"w2", {"a": ("/a", "/x", "/y")})
    assert refused(h, b"w2") == (b"429", "broker full: 2 announced routes, 2 new "
                                 "(max_routes 3)")
    assert h.d.counters.hello_limits == 3
    assert h.d.snapshot(0.0)["limits"] == {"workers": [2, 2], "services": [2, 3],
                                           "routes": [2, 3]}


def test_a_hello_flood_leaves_bounded_state_and_all_of_it_is_forgotten() -> None:
    h = Harness(heartbeat_s=1.0, liveness=3, route_grace_s=5.0, max_workers=500,
                max_services=100, max_routes=1000, routes=(("/keep", "kept"),))
    d = h.d
    for i in range(900):
        # 64 services x 4 routes each: 256 routes, names shared by every 10 identities
        group = i // 10
        services = {f"s{group}-{k}": tuple(f"/g{group}/s{k}/r{r}" for r in range(4))
                    for k in range(64)}
        hello_raw(h, b"flood%d" % i, services)
        if i % 2:
            h.worker(b"flood%d" % i, Cmd.BYE)
        d.to_workers.clear()
        assert len(d.workers) <= 500 and len(d.services) <= 100
        assert len(d.book.claims) <= 1000
    assert d.counters.hello_limits > 0
    assert json.dumps(d.snapshot(0.0))  # still renders, bounded
    h.tick(3.0)  # the silent ones expire
    d.to_workers.clear()
    assert d.workers == {}
    h.tick(8.0)  # and their routes' grace ends
    d.to_workers.clear()
    assert list(d.services) == ["kept"]
    assert [(str(r), s) for r, s in d.routes.routes()] == [("/keep", "kept")]
    assert d.book.claims == {} and d.requests == {}


# ---- outlier ejection ------------------------------------------------------------


def test_timeouts_in_a_row_eject_a_worker_until_its_ejection_ends() -> None:
    h = Harness(heartbeat_s=100.0, request_timeout_s=1.0, eject_after=2, eject_s=10.0)
    h.hello(b"slow", {"app": ("/app",)}, capacity=4)
    h.hello(b"good", {"app": ("/app",)}, capacity=1)
    h.request(1)
    h.request(2)
    assert [s.ident for s in h.take_requests()] == [b"slow", b"good"]
    h.request(3)
    (third,) = h.take_requests()
    assert third.ident == b"slow"
    h.tick(1.0)  # requests 1 and 3 time out at slow, 2 at good
    statuses = sorted((m.conn_id, m.status) for m in h.take_mongrel2() if m.status)
    assert statuses == [(1, 504), (2, 504), (3, 504)]
    h.take_workers()  # the CANCELs
    slow = h.d.workers[b"slow"]
    assert slow.ejected_until == 11.0 and h.d.counters.ejections == 1
    assert h.ready("app") == []  # good is still busy with its cancelled request
    snap = h.d.snapshot(1.0)
    assert snap["services"][0]["capacity"] == 1 and snap["services"][0]["ejected"] == 1
    assert [w["ejected_s"] for w in snap["workers"]] == [10.0, 0]
    h.request(4)
    h.quiet()  # queued: the ejected worker gets nothing new
    h.tick(10.99)
    h.take_mongrel2()  # request 4 timed out in the queue (10 s)
    h.take_workers()
    assert slow.ejected_until == 11.0
    h.tick(11.0)
    assert slow.ejected_until == 0.0 and h.ready("app") == [b"slow"]
    h.take_workers()


def test_a_reply_in_time_ends_the_streak_and_ejections_grow() -> None:
    h = Harness(heartbeat_s=100.0, request_timeout_s=1.0, eject_after=2, eject_s=10.0)
    h.hello(b"w", {"app": ("/app",)}, capacity=10)  # timed-out requests keep their slots
    h.request(1)
    h.take_requests()
    h.tick(1.0)
    h.take_mongrel2()
    h.take_workers()
    assert h.d.workers[b"w"].timeouts_in_row == 1
    h.request(2)
    sent = h.take_one_request()
    h.serve(sent)
    h.take_mongrel2()
    assert h.d.workers[b"w"].timeouts_in_row == 0
    # Two in a row now: ejected for 10 s; back, two more: 20 s.
    for conn, at in ((3, 2.0), (4, 3.0)):
        h.tick(at - 1.0)
        h.request(conn)
        h.take_requests()
        h.tick(at)
        h.take_mongrel2()
        h.take_workers()
    assert h.d.workers[b"w"].ejected_until == 13.0
    h.tick(13.0)
    h.take_workers()
    for conn, at in ((5, 14.0), (6, 15.0)):
        h.tick(at - 1.0)
        h.request(conn)
        h.take_requests()
        h.tick(at)
        h.take_mongrel2()
        h.take_workers()
    assert h.d.workers[b"w"].ejected_until == 35.0  # 15 + 2 x 10


def test_eject_after_zero_never_ejects() -> None:
    h = Harness(heartbeat_s=100.0, request_timeout_s=1.0, eject_after=0)
    h.hello(b"w", {"app": ("/app",)}, capacity=5)
    for conn in range(1, 6):
        h.request(conn)
    h.take_requests()
    h.tick(1.0)
    h.take_mongrel2()
    h.take_workers()
    assert h.d.workers[b"w"].ejected_until == 0.0 and h.d.counters.ejections == 0


# ---- heartbeats negotiated -------------------------------------------------------


def heartbeats_to(h: Harness, ident: bytes) -> int:
    return sum(1 for m in h.take_workers() if m.ident == ident and m.command == Cmd.HEARTBEAT)


def test_a_slow_heartbeating_worker_is_expired_by_its_own_interval() -> None:
    h = Harness(heartbeat_s=1.0, liveness=3)
    hello_raw(h, b"w", {"app": ("/app",)}, heartbeat_ms=5000)
    (welcome,) = h.take_workers()
    assert json.loads(welcome.args[0]) == {"broker": "scale0", "heartbeat_ms": 1000}
    for t in range(1, 15):
        h.tick(float(t))
        assert heartbeats_to(h, b"w") == 1  # we still beat every second
    assert b"w" in h.d.workers
    h.tick(15.0)  # 5 s x 3
    h.take_workers()
    assert b"w" not in h.d.workers


def test_a_fast_heartbeating_worker_is_heartbeated_at_its_pace_and_expired_by_it() -> None:
    h = Harness(heartbeat_s=5.0, liveness=3)
    hello_raw(h, b"w", {"app": ("/app",)}, heartbeat_ms=500)
    h.take_workers()
    assert h.d.next_deadline() == 0.5
    beats = 0
    for i in range(1, 3):
        h.tick(i * 0.5)
        beats += heartbeats_to(h, b"w")
    assert beats == 2
    h.tick(1.5)  # 0.5 s x 3 without a word from it
    assert heartbeats_to(h, b"w") == 0
    assert b"w" not in h.d.workers


def test_a_huge_announced_heartbeat_is_clamped() -> None:
    d = Dispatcher(DispatchSettings(heartbeat_s=1.0, liveness=3, max_peer_heartbeat_s=30.0))
    d.on_worker(b"w", [p.VERSION, p.CMD[Cmd.HELLO], p.Hello(
        (p.ServiceSpec("app", ()),), 1, heartbeat_ms=600_000).encode()], 0.0)
    assert d.workers[b"w"].expires_at == 90.0
    d.on_tick(89.0)
    assert b"w" in d.workers
    d.on_tick(90.0)
    assert b"w" not in d.workers



def test_workers_of_one_pace_share_heartbeat_ticks() -> None:
    # 100 workers announcing 10 ms apart, with 0.5 s heartbeats, to a 1 s broker.
    h = Harness(heartbeat_s=1.0, liveness=100)
    for i in range(100):
        h.tick(i * 0.01)
        hello_raw(h, b"w%d" % i, {"app": ()}, heartbeat_ms=500)
    h.take_workers()
    ticks, beats = 0, 0
    now = h.now
    while now < 11.0:
        now = h.d.next_deadline()
        h.tick(now)
        ticks += 1
        beats += sum(1 for m in h.take_workers() if m.command == Cmd.HEARTBEAT)
    # 10 s at a 0.5 s pace: about 20 ticks, each beating all 100, not a tick per worker.
    assert ticks <= 25 and beats >= 100 * 19
    assert all(w.next_beat - now <= 0.5 for w in h.d.workers.values())
