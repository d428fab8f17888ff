"""RelayClient (core/relayclient.py): the broker's side of S0R1, driven with a fake `now`."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from scale0.core.relayclient import DISCONNECT, Action, RelayClient, Send
from scale0.wire import s0r1

BYE, WHO, HEARTBEAT = s0r1.Control.BYE, s0r1.Control.WHO, s0r1.Control.HEARTBEAT
DRAINING = s0r1.Control.DRAINING


def client(window: int = 512) -> RelayClient:
    return RelayClient("tcp://relay:1", 0.5, handover_timeout_s=2.0, window=window)


def frames(actions: list[Action]) -> list[bytes]:
    return [a.frame for a in actions if isinstance(a, Send)]


def joined(window: int = 512) -> RelayClient:
    c = client(window)
    (hello,) = frames(c.beat(intake=True, writable=True))
    c.sent(hello)
    return c


def test_hello_only_once_intake_opens_and_replies_can_go_then_heartbeats() -> None:
    c = client()
    assert c.beat(intake=False, writable=True) == []  # the startup grace
    assert c.beat(intake=True, writable=False) == []  # Mongrel2 not subscribed yet
    assert c.beat(intake=True, writable=True) == [Send(b"HELLO S0R1 512 500")]
    assert not c.joined  # not sent (the relay is away): HELLO again next beat
    assert c.beat(intake=True, writable=True) == [Send(b"HELLO S0R1 512 500")]
    c.sent(b"HELLO S0R1 512 500")
    assert c.joined
    assert c.beat(intake=False, writable=False) == [Send(b"HEARTBEAT")]  # joined: always


def test_credit_goes_back_a_quarter_window_at_a_time() -> None:
    c = joined(window=512)
    c.took(127)
    assert c.credit() == []
    c.took(1)
    assert c.credit() == [Send(b"CREDIT 128")]
    assert c.credit() == [] and c.unacked == 0
    c.took(300)
    assert c.credit() == [Send(b"CREDIT 300")]


def test_who_means_join_again_at_once_unless_stopping() -> None:
    c = joined()
    assert c.on_control(WHO, 1.0, may_join=True, busy_after_bye=False) == [
        Send(b"HELLO S0R1 512 500")]
    assert not c.joined
    c.sent(b"HELLO S0R1 512 500")
    assert c.on_control(WHO, 2.0, may_join=False, busy_after_bye=False) == []
    assert not c.joined  # stopping: it stays out; stop_intake then just disconnects
    assert c.stop_intake() == [DISCONNECT] and c.closed


def test_heartbeat_from_the_relay_changes_nothing() -> None:
    c = joined()
    assert c.on_control(HEARTBEAT, 1.0, may_join=True, busy_after_bye=False) == []
    assert c.joined and not c.handing_over


def test_a_stop_before_joining_disconnects_at_once() -> None:
    c = client()
    assert c.stop_intake() == [DISCONNECT]
    assert c.closed and c.beat(intake=True, writable=True) == [] and c.on_close() == []


def test_drain_then_leave_once_idle_then_bye_disconnects() -> None:
    c = joined()
    assert c.stop_intake() == [Send(b"DRAIN")]
    assert c.handing_over  # read everything the relay still sends
    assert c.handover(10.0, busy=True, busy_after_bye=False) == []  # requests in progress
    assert c.handover(11.0, busy=False, busy_after_bye=False) == [Send(b"LEAVE")]
    assert c.left_at == 11.0 and c.handing_over
    assert c.handover(11.5, busy=False, busy_after_bye=False) == []  # waiting for BYE
    assert c.on_control(BYE, 11.6, may_join=False, busy_after_bye=False) == [DISCONNECT]
    assert c.closed and not c.handing_over
    assert c.handover(12.0, busy=False, busy_after_bye=False) == []
    assert c.on_close() == []  # it left: no LEAVE again


def test_draining_connections_are_released_with_their_counts_once_idle() -> None:
    """RELEASE (Appendix B): only after the relay's DRAINING; a connection
    with a request here (`held`) waits, one idle is released with the count
    of its messages read since DRAINING, once, until a message of it comes again."""
    c = joined()
    idle = {b"S 1": True, b"S 2": True, b"S 3": False}  # 3: download credits still owed
    c.took_message(b"S 9")  # before DRAIN: not counted
    assert c.releases({b"S 1"}, idle.__getitem__) == []  # no DRAINING yet
    assert c.stop_intake() == [Send(b"DRAIN")]
    assert c.releases({b"S 1"}, idle.__getitem__) == []  # DRAIN sent, no answer yet
    assert c.on_control(DRAINING, 1.0, may_join=False, busy_after_bye=False) == []
    c.took_message(b"S 2")
    c.took_message(b"S 2")
    c.took_message(b"S 3")
    assert sorted(frames(c.releases({b"S 1"}, idle.__getitem__))) == [b"RELEASE S 2 2"]
    assert c.releases({b"S 1"}, idle.__getitem__) == []  # once
    # Conn 1's request ends: released with no message read since DRAINING.
    assert frames(c.releases(set(), idle.__getitem__)) == [b"RELEASE S 1 0"]
    idle[b"S 3"] = True  # its credits came (a message of it, read)
    c.took_message(b"S 3")
    c.took_message(b"S 2")  # the relay had sent one more of conn 2: released again after it
    assert sorted(frames(c.releases(set(), idle.__getitem__))) == [b"RELEASE S 2 3",
                                                                   b"RELEASE S 3 2"]
    assert c.handover(2.0, busy=False, busy_after_bye=False) == [Send(b"LEAVE")]
    c.took_message(b"S 4")
    assert c.releases(set(), idle.__getitem__) == []  # after LEAVE the relay forgets all


def test_a_connection_watched_from_drain_is_released_even_if_it_ends_before_draining() -> None:
    """Watching starts at DRAIN, counting at DRAINING: a request held when
    DRAIN went out, or read after it, that ends before the first look after
    DRAINING (in the same wake-up) still gets its RELEASE."""
    c = joined()
    idle = {b"S 1": True, b"S 2": True, b"S 5": True}
    c.took_message(b"S 5")  # before DRAIN: not watched (LEAVE, or its next request, covers it)
    assert c.stop_intake() == [Send(b"DRAIN")]
    assert c.releases({b"S 1"}, idle.__getitem__) == []  # held at DRAIN: watched
    c.took_message(b"S 2")  # read between DRAIN and DRAINING: watched, not counted
    # Both requests end, then DRAINING is read, before any look.
    assert c.on_control(DRAINING, 1.0, may_join=False, busy_after_bye=False) == []
    assert sorted(frames(c.releases(set(), idle.__getitem__))) == [b"RELEASE S 1 0",
                                                                   b"RELEASE S 2 0"]


def test_draining_after_leave_or_without_drain_starts_nothing() -> None:
    c = joined()
    assert c.on_control(DRAINING, 1.0, may_join=True, busy_after_bye=False) == []
    assert c.counts is None  # not asked for
    c.stop_intake()
    c.handover(2.0, busy=False, busy_after_bye=False)  # LEAVE
    assert c.on_control(DRAINING, 2.1, may_join=False, busy_after_bye=False) == []
    assert c.counts is None


def test_after_bye_replies_through_the_relay_keep_the_link_until_they_are_out() -> None:
    c = joined()
    c.stop_intake()
    c.handover(1.0, busy=False, busy_after_bye=False)
    assert c.on_control(BYE, 1.1, may_join=False, busy_after_bye=True) == []
    assert c.bye and not c.closed and c.handing_over  # still reading, still sending
    assert c.handover(5.0, busy=True, busy_after_bye=True) == []  # no timeout after BYE
    assert c.handover(6.0, busy=False, busy_after_bye=False) == [DISCONNECT]
    assert c.handover(7.0, busy=False, busy_after_bye=False) == []
    assert c.beat(intake=False, writable=True) == []  # no heartbeat after BYE


def test_a_relay_that_never_answers_leave_is_left_after_the_handover_timeout() -> None:
    c = joined()
    c.stop_intake()
    assert c.handover(1.0, busy=False, busy_after_bye=False) == [Send(b"LEAVE")]
    assert c.handover(2.9, busy=False, busy_after_bye=False) == []
    assert c.handover(3.0, busy=False, busy_after_bye=False) == [DISCONNECT]


def test_a_forced_stop_says_leave_as_it_exits_once() -> None:
    c = joined()
    assert c.on_close() == [Send(b"LEAVE")]
    c = joined()
    c.stop_intake()  # DRAIN, and the graceful timeout passed before LEAVE
    assert c.on_close() == [Send(b"LEAVE")]


def test_a_malformed_relay_message_is_logged_rate_limited_not_raised() -> None:
    c = joined()
    for t in range(5):
        c.on_malformed(s0r1.S0R1Error("unknown relay control message b'X'"), float(t))
    assert c.joined and not c.closed


EVENTS = st.lists(st.one_of(
    st.tuples(st.just("beat"), st.booleans(), st.booleans()),
    st.tuples(st.just("sent"), st.booleans(), st.booleans()),
    st.tuples(st.just("took"), st.integers(0, 600), st.booleans()),
    st.tuples(st.sampled_from(list(s0r1.Control)), st.booleans(), st.booleans()),
    st.tuples(st.just("stop"), st.booleans(), st.booleans()),
    st.tuples(st.just("handover"), st.booleans(), st.booleans()),
), max_size=40)


@settings(max_examples=300, deadline=None)
@given(EVENTS)
def test_any_sequence_disconnects_at_most_once_and_sends_nothing_after(
        events: list[tuple[object, object, object]]) -> None:
    c = client(window=64)
    now, disconnects, stopping = 0.0, 0, False
    last: list[Action] = []
    for kind, a, b in events:
        now += 0.3
        if kind == "beat":
            out = c.beat(intake=bool(a) and not stopping, writable=bool(b))
        elif kind == "sent":
            out = []
            for frame in frames(last):
                c.sent(frame)
        elif kind == "took":
            assert isinstance(a, int)
            c.took(a)
            out = c.credit()
        elif kind == "stop":
            out = [] if stopping else c.stop_intake()
            stopping = True
        elif kind == "handover":
            out = c.handover(now, busy=bool(a), busy_after_bye=bool(b)) if stopping else []
        else:
            assert isinstance(kind, s0r1.Control)
            out = c.on_control(kind, now, may_join=bool(a) and not stopping,
                               busy_after_bye=bool(b))
        if disconnects:
            assert out == [], (kind, out)  # nothing after leaving for good
        disconnects += out.count(DISCONNECT)
        assert disconnects <= 1
        assert c.closed == (disconnects == 1)
        if c.left_at:  # LEAVE went out: never HELLO or DRAIN again
            assert not any(f.startswith((b"HELLO", b"DRAIN")) for f in frames(out))
        for frame in frames(out):
            assert s0r1.parse_command(frame) is not None  # well-formed S0R1
        last = out
    if disconnects:
        assert c.on_close() == []


def test_after_an_unasked_bye_a_stop_sends_nothing() -> None:
    c = joined()
    assert c.on_control(BYE, 1.0, may_join=True, busy_after_bye=False) == [DISCONNECT]
    assert c.stop_intake() == [] and c.on_close() == []
    assert c.on_control(BYE, 2.0, may_join=True, busy_after_bye=True) == []
    assert not c.handing_over  # nothing more to read from a relay we left
