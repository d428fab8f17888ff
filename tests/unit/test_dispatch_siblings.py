"""Workers that die together (the loops of one `scale0 wsgi` process, each a
worker of capacity 1): a retried GET must not be used up on a dead sibling."""

from __future__ import annotations

from scale0.wire import s0w1 as p

from .test_dispatch import Cmd, Harness


def test_expiring_siblings_do_not_take_the_retry_of_each_others_request() -> None:
    h = Harness(heartbeat_s=1.0, liveness=3)
    for ident in (b"a0", b"a1", b"b0"):  # a0, a1: one process's loops; b0: another's
        h.hello(ident)
    h.request(1)
    sent = h.take_one_request()
    assert sent.ident == b"a0"
    for now in (1.0, 2.0):
        h.tick(now)
        h.take_workers()
        h.worker(b"b0", Cmd.HEARTBEAT)  # the a-process hangs: only b0 is heard
    h.tick(3.0)  # a0 and a1 expire in the same tick
    msgs = [(m.ident, m.command) for m in h.take_workers()]
    assert msgs == [(b"b0", Cmd.REQUEST), (b"b0", Cmd.HEARTBEAT)]
    assert set(h.d.workers) == {b"b0"} and h.d.counters.worker_failures == 0


def test_a_request_that_never_reached_an_unreachable_worker_is_no_attempt() -> None:
    h = Harness()
    for ident in (b"a0", b"a1", b"b0"):
        h.hello(ident)
    h.request(1)
    first = h.take_one_request()
    assert first.ident == b"a0"
    h.d.remove_worker(h.d.workers[b"a0"], h.now)  # a0 is gone: the GET is retried
    retry = h.take_one_request()
    assert retry.ident == b"a1"  # a sibling of a0, dead too: the send fails
    frames = [retry.ident, p.VERSION, p.CMD[Cmd.REQUEST], retry.rid_frame, retry.service,
              retry.script_name, retry.raw]
    h.d.worker_unreachable(h.d.workers[b"a1"], frames, h.now)
    h.d.check_invariants()
    third = h.take_one_request()
    assert (third.ident, third.rid) == (b"b0", first.rid)
    assert h.d.counters.worker_failures == 0
