"""RelayCore: placing connections on brokers, stickiness, credit, leaving."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from scale0.core import relaycore
from scale0.core.relaycore import RelayCore

S = b"5ca1e000-0000-4000-8000-000000000001"


def req(conn: int, path: bytes = b"/") -> bytes:
    return S + b" %d " % conn + path + b" 2:{},0:,"


def disconnect(conn: int) -> bytes:
    return S + b' %d @* 17:{"METHOD":"JSON"},21:{"type":"disconnect"},' % conn


def credits(conn: int) -> bytes:
    return S + b' %d @* 17:{"METHOD":"JSON"},18:{"type":"credits"},' % conn


def core(*brokers: bytes, window: int = 10) -> RelayCore:
    c = RelayCore(heartbeat_s=1.0, liveness=3, max_peer_heartbeat_s=30.0)
    for ident in brokers:
        c.on_broker(ident, b"HELLO S0R1 %d" % window, 0.0)
    return c


def sent(c: RelayCore) -> list[tuple[bytes, bytes]]:
    out, c.to_brokers = c.to_brokers, []
    return [(f[0], f[-1]) for f in out]


def assert_connections_counted(c: RelayCore) -> None:
    """Each live broker's `connections` is the number of sticky entries naming it."""
    for peer in c.peers.values():
        assert peer.connections == sum(1 for owner in c.owners.values() if owner is peer)


def test_new_connections_go_round_robin_and_follow_ups_stick() -> None:
    c = core(b"A", b"B")
    for conn in (1, 2, 3):
        c.on_mongrel2(req(conn))
    assert [who for who, _ in sent(c)] == [b"A", b"B", b"A"]
    c.on_mongrel2(credits(2))
    c.on_mongrel2(req(2, b"/again"))
    c.on_mongrel2(disconnect(2))
    assert sent(c) == [(b"B", credits(2)), (b"B", req(2, b"/again")), (b"B", disconnect(2))]
    # After the disconnect the id is free; a message for it has no owner.
    c.on_mongrel2(credits(2))
    assert sent(c) == [] and c.dropped == 1


def test_without_credit_new_connections_wait_in_order_and_credit_places_them() -> None:
    c = core(b"A", window=2)
    c.on_mongrel2(req(1))
    c.on_mongrel2(req(2))
    c.on_mongrel2(req(3))  # no credit left: waits
    c.on_mongrel2(req(1, b"/sticky"))  # a sticky message still goes, over credit
    c.on_mongrel2(req(4))
    assert c.intake  # still reading: A's connections need their messages
    assert sent(c) == [(b"A", req(1)), (b"A", req(2)), (b"A", req(1, b"/sticky"))]
    c.on_broker(b"A", b"CREDIT 3", 0.5)
    assert sent(c) == [(b"A", req(3)), (b"A", req(4))]
    assert not c.pending


def test_a_lone_draining_broker_still_gets_its_connections_messages() -> None:
    c = core(b"A")
    c.on_mongrel2(req(1))
    sent(c)
    c.on_broker(b"A", b"DRAIN", 0.1)
    assert sent(c) == [(b"A", b"DRAINING")]  # the answer: RELEASE counts from here
    assert c.intake  # a streamed reply of conn 1 needs Mongrel2's credits
    c.on_mongrel2(credits(1))
    c.on_mongrel2(req(2))  # new: waits for a broker that takes new connections
    assert sent(c) == [(b"A", credits(1))] and list(c.pending) == [req(2)]
    c.on_broker(b"B", b"HELLO S0R1 10", 0.2)
    assert sent(c) == [(b"B", req(2))]


def test_draining_broker_keeps_its_connections_but_gets_no_new_ones() -> None:
    c = core(b"A", b"B")
    c.on_mongrel2(req(1))  # A
    sent(c)
    c.on_broker(b"A", b"DRAIN", 0.1)
    c.on_mongrel2(req(2))
    c.on_mongrel2(req(1, b"/pipelined"))
    c.on_mongrel2(req(3))
    assert sent(c) == [(b"A", b"DRAINING"), (b"B", req(2)), (b"A", req(1, b"/pipelined")),
                       (b"B", req(3))]


def test_a_released_connection_moves_only_once_its_broker_read_all_it_was_sent() -> None:
    """RELEASE (Appendix B): the count is of the connection's messages sent
    since DRAINING; short of it, a message is on its way and the connection
    stays; equal, its next message is a new connection's."""
    c = core(b"A", b"B")
    c.on_mongrel2(req(1))  # A
    c.on_mongrel2(req(2))  # B
    c.on_mongrel2(req(3))  # A
    sent(c)
    key = S + b" 1"
    c.on_broker(b"A", b"RELEASE " + key + b" 0", 0.1)  # not draining: nothing moves
    c.on_broker(b"A", b"DRAIN", 0.2)
    c.on_mongrel2(credits(1))  # sent since DRAINING: 1
    assert sent(c) == [(b"A", b"DRAINING"), (b"A", credits(1))]
    c.on_broker(b"A", b"RELEASE " + key + b" 0", 0.3)  # the credits are on their way
    c.on_broker(b"B", b"RELEASE " + S + b" 2 0", 0.3)  # not draining
    c.on_broker(b"A", b"RELEASE " + S + b" 2 0", 0.3)  # not its connection
    c.on_mongrel2(req(1, b"/still"))
    c.on_mongrel2(req(2, b"/still"))
    assert sent(c) == [(b"A", req(1, b"/still")), (b"B", req(2, b"/still"))]
    c.on_broker(b"A", b"RELEASE " + key + b" 2", 0.4)  # all read: it moves
    c.on_broker(b"A", b"RELEASE " + S + b" 3 0", 0.4)
    assert c.released == 2
    c.on_mongrel2(req(1, b"/moved"))
    c.on_mongrel2(req(3, b"/moved"))
    assert sent(c) == [(b"B", req(1, b"/moved")), (b"B", req(3, b"/moved"))]
    c.on_broker(b"A", b"RELEASE " + key + b" 0", 0.5)  # B's now: stays there
    c.on_mongrel2(req(1, b"/stays"))
    assert sent(c) == [(b"B", req(1, b"/stays"))]


def test_leave_is_answered_bye_and_its_connections_move_on() -> None:
    c = core(b"A", b"B")
    c.on_mongrel2(req(1))  # A
    sent(c)
    c.on_broker(b"A", b"LEAVE", 0.2)
    assert c.to_brokers == [[b"A", b"", b"BYE"]]
    sent(c)
    c.on_mongrel2(req(1, b"/next"))
    assert sent(c) == [(b"B", req(1, b"/next"))]
    c.on_broker(b"A", b"HEARTBEAT", 0.3)  # it is unknown now: say HELLO again
    assert c.to_brokers == [[b"A", b"", b"WHO"]]


def test_silent_broker_expires_and_heartbeats_go_to_the_others() -> None:
    c = core(b"A", b"B")
    c.on_tick(0.0)
    sent(c)
    c.on_broker(b"B", b"HEARTBEAT", 2.5)
    c.on_tick(3.0)
    assert set(c.peers) == {b"B"}
    assert sent(c) == [(b"B", b"HEARTBEAT")]


def test_unreachable_broker_is_dropped() -> None:
    c = core(b"A", b"B")
    c.unreachable(b"A")
    c.on_mongrel2(req(1))
    assert sent(c) == [(b"B", req(1))]


def test_bad_input_is_counted_not_raised() -> None:
    c = core(b"A")
    c.on_mongrel2(b"garbage")
    c.on_mongrel2(S + b" twelve / 2:{},0:,")  # no connection id a reply could name
    c.on_broker(b"A", b"HELLO S0R9 10", 0.1)
    c.on_broker(b"A", b"WHAT", 0.1)
    c.on_broker(b"A", b"CREDIT x", 0.1)
    assert c.malformed == 5 and sent(c) == [] and not c.owners
    assert c.intake  # A is still there


def test_with_no_broker_at_all_the_relay_stops_reading() -> None:
    c = RelayCore(heartbeat_s=1.0, liveness=3, max_peer_heartbeat_s=30.0)
    assert not c.intake  # requests wait in Mongrel2
    c.on_mongrel2(req(1))  # one read in a race is kept, not lost
    c.on_broker(b"A", b"HELLO S0R1 10", 0.0)
    assert sent(c) == [(b"A", req(1))]


def test_hello_again_keeps_the_connections_and_its_heartbeat_sets_the_expiry() -> None:
    c = RelayCore(heartbeat_s=1.0, liveness=3, max_peer_heartbeat_s=30.0)
    c.on_broker(b"A", b"HELLO S0R1 10 5000", 0.0)  # a broker beating every 5 s
    c.on_mongrel2(req(1))
    sent(c)
    c.on_tick(10.0)  # 10 s < 5 s x 3: still there
    assert b"A" in c.peers
    c.on_broker(b"A", b"HELLO S0R1 10 5000", 10.5)  # after a WHO: same broker
    c.on_mongrel2(req(1, b"/next"))
    assert sent(c)[-1] == (b"A", req(1, b"/next"))
    c.on_tick(26.0)
    assert b"A" not in c.peers


@settings(max_examples=300, deadline=None)
@given(st.lists(st.one_of(
    st.binary(max_size=80).map(lambda b: ("m2", b)),
    st.sampled_from([req(1), req(2), credits(1), disconnect(2), req(3, b"/x")]).map(
        lambda b: ("m2", b)),
    st.tuples(st.sampled_from([b"A", b"B", b"C"]),
              st.one_of(st.binary(max_size=24),
                        st.sampled_from([b"HELLO S0R1 3", b"CREDIT 2", b"DRAIN", b"LEAVE",
                                         b"HEARTBEAT", b"HELLO S0R1 x", b"CREDIT -1",
                                         b"RELEASE " + S + b" 1 0", b"RELEASE " + S + b" 2 1",
                                         b"RELEASE " + S + b" 1 x"])))
    .map(lambda t: ("broker", t)),
), max_size=60))
def test_any_input_is_handled_without_raising_and_invariants_hold(
        events: list[tuple[str, object]]) -> None:
    c = core(b"A", b"B")
    now = 0.0
    for kind, item in events:
        now += 0.1
        if kind == "m2":
            assert isinstance(item, bytes)
            c.on_mongrel2(item)
        else:
            ident, frame = item  # type: ignore[misc]
            c.on_broker(ident, frame, now)
        c.on_tick(now)
        for ident, peer in c.ready.items():  # ready: known, not draining, has credit
            assert c.peers.get(ident) is peer and not peer.draining and peer.credit > 0
        assert_connections_counted(c)
        for frames in c.to_brokers:
            assert len(frames) in (2, 3)
        c.to_brokers.clear()



def test_commands_are_read_strictly_and_an_unknown_broker_is_asked_who() -> None:
    c = core(b"A")
    for frame in (b"HEARTBEAT now", b"CREDIT 08", b"CREDIT " + b"1" * 13, b"DRAIN "):
        c.on_broker(b"A", frame, 0.1)  # malformed from a known broker: counted, no effect
    assert c.malformed == 4 and sent(c) == [] and not c.peers[b"A"].draining
    c.on_broker(b"X", b"nonsense", 0.2)  # unknown: whatever it says, it must HELLO first
    assert c.to_brokers == [[b"X", b"", b"WHO"]]
    c.to_brokers.clear()
    c.on_broker(b"X", b"HELLO S0R2 10", 0.3)  # a bad HELLO is counted, not answered
    assert c.malformed == 5 and c.to_brokers == [] and b"X" not in c.peers


def test_snapshot_counts_each_brokers_connections_through_every_way_one_ends(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(relaycore, "MAX_CONNECTIONS", 4)
    c = core(b"A", b"B", window=100)
    for conn in range(1, 6):  # the fifth pushes the least recently used (1, on A) out
        c.on_mongrel2(req(conn))
    c.on_mongrel2(disconnect(2))  # on B
    assert_connections_counted(c)
    snap = c.snapshot(0.5)
    by_id = {b["id"]: b for b in snap["brokers"]}
    assert by_id[b"A".hex()]["sticky"] == 2 and by_id[b"B".hex()]["sticky"] == 1
    assert snap["sticky"] == 3 and snap["pending"] == 0
    assert by_id[b"A".hex()]["expires_in_s"] == pytest.approx(2.5)  # HELLO at 0, 1 s x 3

    c.on_broker(b"A", b"DRAIN", 1.0)
    c.on_broker(b"A", b"RELEASE " + S + b" 3 0", 1.0)  # nothing of conn 3 sent it since
    assert_connections_counted(c)
    snap = c.snapshot(1.0)
    a = next(b for b in snap["brokers"] if b["id"] == b"A".hex())
    assert a["draining"] and a["sticky"] == 1 and snap["counters"]["released"] == 1

    c.on_tick(10.0)  # both silent: lost, their connections forgotten
    snap = c.snapshot(10.0)
    assert snap["brokers"] == [] and snap["sticky"] == 0
    assert snap["counters"]["brokers_lost"] == 2 and snap["counters"]["lost_connections"] == 2


def test_a_connection_of_a_broker_that_left_moves_with_its_count() -> None:
    c = core(b"A", b"B")
    c.on_mongrel2(req(1))  # to A
    c.on_broker(b"A", b"LEAVE", 0.1)
    c.on_mongrel2(req(1))  # its next request: to B, the stale entry changes hands
    assert c.peers[b"B"].connections == 1
    assert_connections_counted(c)
    c.on_broker(b"B", b"LEAVE", 0.2)
    c.on_mongrel2(credits(1))  # nobody holds it now: dropped, the entry goes
    assert len(c.owners) == 0 and c.dropped == 1


def test_a_connection_placed_anew_is_the_newest_when_the_oldest_are_pushed_out(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(relaycore, "MAX_CONNECTIONS", 2)
    c = core(b"A", b"B")
    c.on_mongrel2(req(1))  # to A
    c.on_mongrel2(req(2))  # to B
    c.on_broker(b"A", b"LEAVE", 0.1)
    c.on_mongrel2(req(1))  # placed anew, on B: now the most recent entry
    c.on_mongrel2(req(3))  # one too many: the oldest (2) goes, not 1
    assert list(c.owners) == [S + b" 1", S + b" 3"]
    assert_connections_counted(c)
