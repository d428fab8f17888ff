"""Prefetch at the broker (docs/protocol.md 4.6): requests that wait at a busy
worker, the rules that keep that safe and fair, RECALL and RETURN.

Driven like tests/unit/test_dispatch.py: a Dispatcher, a fake clock, the
invariants checked after every step (among them: nothing but a request that
may wait is ever beyond a worker's capacity)."""

from __future__ import annotations

from scale0.wire import s0w1 as p

from .test_dispatch import SENDER, Cmd, Harness, Sent, m2_disconnect

RECALL_AFTER = 0.05  # DispatchSettings' default recall_after_s


def _two_workers(prefetch: int = 2, **settings: object) -> Harness:
    h = Harness(**settings)
    h.hello(b"w1", prefetch=prefetch)
    h.hello(b"w2", prefetch=prefetch)
    return h


def _two_busy(**settings: object) -> tuple[Harness, Sent, Sent]:
    """Two workers with prefetch 2, each running one GET."""
    h = _two_workers(**settings)
    h.request(1)
    h.request(2)
    a, b = h.take_requests()
    return h, a, b


def _one_waiting(**settings: object) -> tuple[Harness, Sent, Sent, Sent]:
    """`_two_busy`, then a third GET waiting at one of them, and the other
    worker free again: (harness, the waiting one, the request it waits behind,
    the other worker's, served)."""
    h, a, b = _two_busy(**settings)
    h.request(3)
    waiting = h.take_one_request()
    stuck, other = (a, b) if a.ident == waiting.ident else (b, a)
    h.serve(other)
    h.take_mongrel2()
    return h, waiting, stuck, other


def test_requests_go_to_free_workers_first_then_wait_at_the_least_loaded() -> None:
    h = _two_workers()
    h.request(1)
    h.request(2)
    first = h.take_requests()
    assert sorted(s.ident for s in first) == [b"w1", b"w2"]
    assert h.d.counters.prefetched == 0
    h.request(3)  # nothing free: it waits at a busy worker
    third = h.take_one_request()
    h.request(4)  # the other one now has fewer waiting
    fourth = h.take_one_request()
    assert {third.ident, fourth.ident} == {b"w1", b"w2"}
    h.request(5)
    h.request(6)
    assert len(h.take_requests()) == 2
    assert h.d.counters.prefetched == 4
    # Each holds 1 running + 2 waiting: full, so the next one is queued here.
    h.request(7)
    h.quiet()
    assert len(h.d.services["app"].queue) == 1
    assert all(len(w.in_flight) == 3 for w in h.d.workers.values())


def test_a_worker_without_prefetch_is_never_sent_more_than_its_capacity() -> None:
    h = _two_workers(prefetch=0)
    for conn in range(1, 5):
        h.request(conn)
    assert len(h.take_requests()) == 2
    assert len(h.d.services["app"].queue) == 2 and h.d.counters.prefetched == 0


def test_only_get_head_and_options_may_wait_at_a_worker() -> None:
    h = _two_workers()
    h.request(1)
    h.request(2)
    h.take_requests()
    for conn, method in ((3, b"POST"), (4, b"PUT"), (5, b"DELETE"), (6, b"PATCH")):
        h.request(conn, method=method)
    h.quiet()
    assert len(h.d.services["app"].queue) == 4
    h2 = _two_workers()
    h2.request(1)
    h2.request(2)
    h2.take_requests()
    for conn, method in ((3, b"GET"), (4, b"HEAD"), (5, b"OPTIONS")):
        h2.request(conn, method=method)
    assert len(h2.take_requests()) == 3 and not h2.d.services["app"].queue


def test_nothing_overtakes_a_request_queued_at_the_broker() -> None:
    h = Harness()
    h.hello(b"w1", prefetch=2)
    running = h.take_requests() or None
    assert running is None
    h.request(1)
    get1 = h.take_one_request()
    h.request(2)  # waits at w1
    get2 = h.take_one_request()
    h.request(3, method=b"POST")  # may not wait at w1: queued here
    h.request(4)  # a GET behind the POST: queued too, not sent to wait at w1
    h.quiet()
    assert [r.method for r in h.d.services["app"].queue.values()] == [b"POST", b"GET"]
    h.serve(get1)  # get2 runs now; w1 has room, but the oldest queued is the POST
    h.take_mongrel2()
    h.quiet()
    h.serve(get2)  # w1 is free: the POST, then the GET to wait behind it
    post, get4 = h.take_requests()
    assert (post.event.headers[b"METHOD"], post.conn_id) == (b"POST", 3)
    assert get4.conn_id == 4 and h.d.counters.prefetched == 2


def test_a_stalled_worker_is_given_nothing_more_to_wait_there() -> None:
    h, _, _ = _two_busy()
    h.tick(RECALL_AFTER)  # neither finished anything since: both stalled
    h.request(3)
    h.quiet()
    assert len(h.d.services["app"].queue) == 1


def test_what_waits_at_a_stalled_worker_is_recalled_for_a_free_one() -> None:
    h, waiting, stuck, other = _one_waiting()  # the other worker is free; `stuck` runs on
    at = waiting.ident
    h.quiet()
    h.tick(h.now + RECALL_AFTER / 4)  # not stalled yet: it started its request just now
    h.quiet()
    h.tick(h.now + RECALL_AFTER)
    [recall] = h.take_workers()
    assert (recall.ident, recall.command, recall.rid) == (at, Cmd.RECALL, waiting.rid)
    h.tick(h.now + RECALL_AFTER)  # recalled once only
    h.quiet()
    h.worker(at, Cmd.RETURN, waiting.rid_frame)
    again = h.take_one_request()
    assert (again.ident, again.rid, again.raw) == (other.ident, waiting.rid, waiting.raw)
    r = h.d.requests[waiting.rid]
    assert r.attempts == 1 and h.d.counters.recalls == 1 and h.d.counters.returns == 1
    h.serve(again)
    assert [m.conn_id for m in h.take_mongrel2()] == [3]
    h.serve(stuck)
    assert h.d.requests == {}


def test_a_recall_that_comes_too_late_leaves_the_request_where_it_runs() -> None:
    h, waiting, stuck, _ = _one_waiting()
    h.tick(h.now + RECALL_AFTER)
    assert [m.command for m in h.take_workers()] == [Cmd.RECALL]
    h.serve(stuck)  # the worker went on to the recalled one: it ignores the RECALL
    h.serve(waiting)
    assert sorted(m.conn_id for m in h.take_mongrel2()) == [stuck.conn_id, 3]
    assert h.d.requests == {} and h.d.counters.returns == 0


def test_nothing_is_recalled_while_no_worker_is_free() -> None:
    h = _two_workers()
    for conn in (1, 2, 3, 4):
        h.request(conn)
    h.take_requests()
    h.tick(10 * RECALL_AFTER)
    h.quiet()


def test_a_return_that_was_not_asked_for_is_refused() -> None:
    h = _two_workers()
    h.request(1)
    sent = h.take_one_request()
    h.worker(sent.ident, Cmd.RETURN, sent.rid_frame)
    [error] = h.take_workers()
    assert error.command == Cmd.ERROR and error.args[0] == b"%d" % p.ERR_BAD_MESSAGE
    assert h.d.requests[sent.rid].worker is h.d.workers[sent.ident]  # still there
    h.worker(sent.ident, Cmd.RETURN, p.encode_request_id(999))  # not there: a late one
    h.quiet()
    assert h.d.counters.late_replies == 1


def test_a_recalled_request_answered_meanwhile_is_forgotten_on_its_return() -> None:
    h, waiting, _, _ = _one_waiting()
    h.tick(h.now + RECALL_AFTER)
    assert [m.command for m in h.take_workers()] == [Cmd.RECALL]
    h.m2(m2_disconnect(3))  # the client left before the RETURN came
    assert [m.command for m in h.take_workers()] == [Cmd.CANCEL]
    h.worker(waiting.ident, Cmd.RETURN, waiting.rid_frame)
    h.quiet()
    assert waiting.rid not in h.d.requests


def test_requests_waiting_at_a_dead_worker_are_retried() -> None:
    h, _, _ = _two_busy()
    h.request(3)
    h.request(4)
    waiting = h.take_requests()
    dead = waiting[0].ident
    h.worker(dead, Cmd.BYE)  # its running GET and its waiting one: both retried
    alive = b"w2" if dead == b"w1" else b"w1"
    retried = h.take_one_request()  # one waits at the other worker, the last in the queue
    assert retried.ident == alive and len(h.d.services["app"].queue) == 1
    assert h.d.counters.retries == 2


def test_a_disconnect_cancels_a_waiting_request_at_its_worker() -> None:
    h, _, _ = _two_busy()
    h.request(3)
    waiting = h.take_one_request()
    h.m2(m2_disconnect(3))
    [cancel] = h.take_workers()
    assert (cancel.ident, cancel.command, cancel.rid) == (waiting.ident, Cmd.CANCEL,
                                                          waiting.rid)
    h.reply(waiting)  # its LAST, when its turn comes: the slot frees
    assert waiting.rid not in h.d.requests


def test_a_draining_worker_takes_nothing_more_to_wait() -> None:
    h, _, _ = _two_busy()
    h.worker(b"w1", Cmd.DRAIN)
    h.take_workers()  # the DRAIN ack
    h.request(3)
    h.request(4)
    assert {s.ident for s in h.take_requests()} == {b"w2"}


def test_the_status_shows_each_workers_prefetch() -> None:
    h = _two_workers(prefetch=3)
    snapshot = h.d.snapshot(h.now)
    assert [w["prefetch"] for w in snapshot["workers"]] == [3, 3]
    assert snapshot["counters"]["prefetched"] == 0
    assert SENDER  # the requests above are this sender's
