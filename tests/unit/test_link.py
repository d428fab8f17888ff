"""The worker's broker-link core (scale0/worker/link.py), sans-IO: a fake `now`,
frames in, the outbox and the socket's Op out. Every move of docs/protocol.md
4.1's worker side, the heartbeat negotiation of section 5, and the command
table."""

from __future__ import annotations

import ast
import json
import math
from pathlib import Path

import pytest

from scale0.wire import s0w1 as p
from scale0.worker import link as link_module
from scale0.worker.link import (
    _TRANSITIONS,
    BrokerLink,
    Inbound,
    LinkSettings,
    LinkStateError,
    Op,
    State,
    Trigger,
    welcome_heartbeat_ms,
)

Cmd = p.Command
HELLO = b'{"services": []}'
SETTINGS = LinkSettings(heartbeat_s=1.0, liveness=3, reconnect_max_s=4.0)


def msg(command: p.Command, *args: bytes) -> list[bytes]:
    return [p.VERSION, p.CMD[command], *args]


def welcome(heartbeat_ms: int | None = None) -> list[bytes]:
    payload = {"broker": "test"} if heartbeat_ms is None else {"heartbeat_ms": heartbeat_ms}
    return msg(Cmd.WELCOME, json.dumps(payload).encode())


def sent(link: BrokerLink) -> list[list[bytes]]:
    """What the link queued since the last call, as a driver would send it."""
    out = list(link.outbox)
    link.outbox.clear()
    return out


def dialled(now: float = 100.0, settings: LinkSettings = SETTINGS) -> BrokerLink:
    link = BrokerLink("tcp://broker:1", HELLO, settings)
    assert link.tick(now) == (Op.OPEN, now + settings.heartbeat_s)
    assert sent(link) == [msg(Cmd.HELLO, HELLO)]
    return link


def welcomed(now: float = 100.0, heartbeat_ms: int | None = None) -> BrokerLink:
    link = dialled(now)
    assert link.receive(welcome(heartbeat_ms), now) is Inbound.WELCOMED
    return link


# ---- DISCONNECTED --dial--> HELLO_SENT --WELCOME--> WELCOMED ---------------------


def test_a_new_link_dials_at_its_first_tick_and_says_hello() -> None:
    link = BrokerLink("tcp://broker:1", HELLO, SETTINGS)
    assert link.state is State.DISCONNECTED and not link.connected and link.drained
    op, due = link.tick(5.0)
    assert (op, due, link.state) == (Op.OPEN, 6.0, State.HELLO_SENT)
    assert sent(link) == [msg(Cmd.HELLO, HELLO)]
    assert link.connected and not link.welcomed
    assert link.expiry_s == 3.0  # our own interval x liveness until a WELCOME


def test_welcome_registers_and_a_repeated_welcome_is_harmless() -> None:
    link = dialled()
    assert link.receive(welcome(), 100.5) is Inbound.WELCOMED
    assert link.state is State.WELCOMED and link.welcomed and not link.drained
    assert sent(link) == []
    assert link.receive(welcome(), 100.6) is Inbound.WELCOMED
    assert link.state is State.WELCOMED


def test_heartbeats_go_out_one_interval_apart_from_hello_on() -> None:
    link = welcomed(100.0)
    assert link.tick(100.5) == (Op.NONE, 101.0) and sent(link) == []
    assert link.tick(101.0) == (Op.NONE, 102.0)
    assert sent(link) == [msg(Cmd.HEARTBEAT)]
    assert link.tick(101.9) == (Op.NONE, 102.0) and sent(link) == []


def test_beat_sends_only_a_due_heartbeat_and_never_judges_silence() -> None:
    link = welcomed(100.0)
    link.beat(100.5)
    assert sent(link) == []
    link.beat(110.0)  # long silent, but nobody read: no expiry here
    assert sent(link) == [msg(Cmd.HEARTBEAT)] and link.state is State.WELCOMED
    assert link.next_heartbeat == 111.0
    BrokerLink("e", HELLO, SETTINGS).beat(100.0)  # not connected: nothing


# ---- heartbeat negotiation (sections 3.2 and 5) ----------------------------------


def test_welcome_heartbeat_sets_expiry_and_a_shorter_interval() -> None:
    slow = welcomed(100.0, heartbeat_ms=5000)
    assert (slow.expiry_s, slow.heartbeat_s) == (15.0, 1.0)  # broker's x our liveness
    fast = dialled(100.0)
    fast.receive(welcome(200), 100.1)
    assert fast.expiry_s == pytest.approx(0.6) and fast.heartbeat_s == pytest.approx(0.2)
    assert fast.next_heartbeat == pytest.approx(100.3)  # brought forward, not pushed back
    assert fast.tick(100.3)[0] is Op.NONE and sent(fast) == [msg(Cmd.HEARTBEAT)]


def test_a_welcome_without_a_usable_interval_keeps_ours() -> None:
    for payload in (b"", b"not json", b"[]", b'{"heartbeat_ms": "5"}', b'{"heartbeat_ms": 1.5}',
                    b"[" * 100_000):
        link = dialled()
        assert link.receive(msg(Cmd.WELCOME, payload), 100.0) is Inbound.WELCOMED
        assert (link.expiry_s, link.heartbeat_s) == (3.0, 1.0)
    bare = dialled()
    assert bare.receive(msg(Cmd.WELCOME), 100.0) is Inbound.WELCOMED  # no payload frame
    assert bare.expiry_s == 3.0


def test_welcome_heartbeat_is_clamped() -> None:
    assert welcome_heartbeat_ms(b'{"heartbeat_ms": 1}') == 10
    assert welcome_heartbeat_ms(b'{"heartbeat_ms": 10000000}') == 600_000
    assert welcome_heartbeat_ms(b'{"heartbeat_ms": 750}') == 750
    assert welcome_heartbeat_ms(b'{"heartbeat_ms": true}') is None


def test_a_redial_forgets_the_last_brokers_terms() -> None:
    link = welcomed(100.0, heartbeat_ms=200)
    assert link.receive(msg(Cmd.BYE), 100.1) is Inbound.LOST
    assert link.tick(100.1)[0] is Op.OPEN
    assert (link.expiry_s, link.heartbeat_s) == (3.0, 1.0)


# ---- silence: HELLO_SENT, WELCOMED --> DISCONNECTED, redial with backoff --------------


def test_silence_past_expiry_closes_and_backs_off_doubling_to_the_cap() -> None:
    link = welcomed(100.0)
    assert link.tick(103.0)[0] is Op.NONE  # exactly at expiry: still alive
    sent(link)
    now = 103.01
    waits = []
    for _ in range(5):
        op, due = link.tick(now)
        assert op is Op.CLOSE and link.state is State.DISCONNECTED and not link.connected
        assert sent(link) == []  # no BYE to a silent broker
        waits.append(round(due - now, 6))
        assert link.tick(due - 0.001) == (Op.NONE, due)  # not before its time
        assert link.tick(due)[0] is Op.OPEN and link.state is State.HELLO_SENT
        assert sent(link) == [msg(Cmd.HELLO, HELLO)]
        now = due + link.expiry_s + 0.01  # and the broker stays silent
    assert waits == [0.5, 1.0, 2.0, 4.0, 4.0]


def test_any_message_is_a_sign_of_life() -> None:
    link = welcomed(100.0)
    link.receive([b"garbage"], 102.5)  # even a malformed one
    assert link.tick(105.0)[0] is Op.NONE
    link.receive(msg(Cmd.HEARTBEAT), 105.4)
    assert link.tick(108.0)[0] is Op.NONE
    assert link.tick(108.5)[0] is Op.CLOSE


def test_a_welcome_resets_the_backoff() -> None:
    link = welcomed(100.0)
    op, due = link.tick(104.0)
    assert op is Op.CLOSE and due == 104.5
    link.tick(due)
    op, due = link.tick(due + 4.0)
    assert op is Op.CLOSE and due == pytest.approx(109.5)  # 1.0 after its second silence
    link.tick(due)
    link.receive(welcome(), due)
    op, again = link.tick(due + 4.0)
    assert op is Op.CLOSE and again == pytest.approx(due + 4.5)  # 0.5 again


def test_a_silent_broker_before_welcome_gets_the_curve_hint(
        caplog: pytest.LogCaptureFixture) -> None:
    link = dialled(100.0, LinkSettings(1.0, 3, 4.0, curve=True))
    with caplog.at_level("WARNING", logger="scale0.worker.link"):
        assert link.tick(104.0)[0] is Op.CLOSE
    assert "authorized keys" in caplog.text


# ---- BYE from the broker: --> DISCONNECTED, redial at once ---------------------------


@pytest.mark.parametrize("welcome_first", [False, True])
def test_a_brokers_bye_is_lost_and_redials_at_once(welcome_first: bool) -> None:
    link = welcomed(100.0) if welcome_first else dialled(100.0)
    assert link.receive(msg(Cmd.BYE, b"extra"), 101.0) is Inbound.LOST
    assert link.state is State.DISCONNECTED and sent(link) == []
    assert link.tick(101.0)[0] is Op.OPEN  # no backoff
    assert sent(link) == [msg(Cmd.HELLO, HELLO)]


def test_a_bye_neither_counts_nor_resets_the_backoff() -> None:
    link = dialled(100.0)
    assert link.tick(104.0) == (Op.CLOSE, 104.5)
    link.tick(104.5)
    link.receive(msg(Cmd.BYE), 105.0)
    assert link.tick(105.0)[0] is Op.OPEN
    assert link.tick(108.5) == (Op.CLOSE, 109.5)  # the second silence waits 1 s


# ---- ERROR ---------------------------------------------------------------------------


def test_an_error_before_welcome_is_refused_and_after_it_only_logged(
        caplog: pytest.LogCaptureFixture) -> None:
    link = dialled()
    assert link.receive(msg(Cmd.ERROR, b"409", b"route / belongs to app"), 100.0) \
        is Inbound.REFUSED
    assert "route / belongs to app" in caplog.text
    assert link.receive(msg(Cmd.ERROR), 100.0) is Inbound.REFUSED  # no text: still refused
    link = welcomed()
    assert link.receive(msg(Cmd.ERROR, b"400", b"bad READ"), 100.0) is Inbound.NONE
    assert link.state is State.WELCOMED


# ---- draining --------------------------------------------------------------------------


def test_drain_is_sent_now_and_again_after_a_reconnect() -> None:
    link = welcomed(100.0)
    link.drain()
    assert sent(link) == [msg(Cmd.DRAIN)] and not link.drained
    assert link.receive(msg(Cmd.DRAIN), 100.1) is Inbound.NONE  # the ack
    assert link.drain_acked and link.drained
    assert link.receive(msg(Cmd.BYE), 100.2) is Inbound.LOST
    assert not link.drain_acked
    link.tick(100.2)
    assert sent(link) == [msg(Cmd.HELLO, HELLO)]  # no DRAIN before the WELCOME
    assert link.receive(welcome(), 100.3) is Inbound.WELCOMED
    assert sent(link) == [msg(Cmd.DRAIN)] and not link.drained


def test_drain_while_disconnected_waits_for_the_welcome() -> None:
    link = BrokerLink("e", HELLO, SETTINGS)
    link.drain()
    assert sent(link) == [] and link.drained  # never welcomed: nothing to wait for
    link.tick(0.0)
    assert sent(link) == [msg(Cmd.HELLO, HELLO)]
    link.receive(welcome(), 0.1)
    assert sent(link) == [msg(Cmd.DRAIN)]


def test_an_unprompted_drain_asks_the_worker_to_leave() -> None:
    link = welcomed()
    assert link.receive(msg(Cmd.DRAIN), 100.0) is Inbound.DRAIN_ASKED
    assert not link.drain_acked and link.state is State.WELCOMED


# ---- detach: --BYE--> DETACHED --dial--> HELLO_SENT -------------------------------------


@pytest.mark.parametrize("welcome_first", [False, True])
def test_detach_says_bye_even_before_welcome_and_comes_back_when_let(
        welcome_first: bool) -> None:
    link = welcomed(100.0) if welcome_first else dialled(100.0)
    sent(link)
    assert link.detach() is Op.CLOSE
    assert sent(link) == [msg(Cmd.BYE)] and link.state is State.DETACHED
    assert link.tick(200.0, hold=True) == (Op.NONE, math.inf)  # the long request runs
    assert link.state is State.DETACHED and sent(link) == []
    assert link.tick(200.0)[0] is Op.OPEN and link.state is State.HELLO_SENT
    assert sent(link) == [msg(Cmd.HELLO, HELLO)]


def test_detach_of_a_link_without_a_socket_does_nothing() -> None:
    link = BrokerLink("e", HELLO, SETTINGS)
    assert link.detach() is Op.NONE and link.state is State.DISCONNECTED


# ---- close: any --> GONE -----------------------------------------------------------------


def test_close_says_bye_only_to_a_broker_that_welcomed_us() -> None:
    link = welcomed()
    assert link.close() is Op.CLOSE and sent(link) == [msg(Cmd.BYE)]
    assert link.state is State.GONE and not link.connected
    assert link.close() is Op.NONE and sent(link) == []  # idempotent
    assert link.tick(1000.0) == (Op.NONE, math.inf)  # gone for good
    hello_sent = dialled()
    assert hello_sent.close() is Op.CLOSE and sent(hello_sent) == []
    never = BrokerLink("e", HELLO, SETTINGS)
    assert never.close() is Op.NONE and never.state is State.GONE
    detached = dialled()
    detached.detach()
    assert detached.close() is Op.NONE and detached.state is State.GONE


# ---- the tables ---------------------------------------------------------------------


def test_the_transitions_are_those_of_protocol_section_4_1() -> None:
    connected = (State.HELLO_SENT, State.WELCOMED)
    expected = {
        (State.DISCONNECTED, Trigger.DIAL): State.HELLO_SENT,
        (State.DETACHED, Trigger.DIAL): State.HELLO_SENT,
        (State.HELLO_SENT, Trigger.WELCOME): State.WELCOMED,
        (State.WELCOMED, Trigger.WELCOME): State.WELCOMED,
        **{(s, Trigger.SILENCE): State.DISCONNECTED for s in connected},
        **{(s, Trigger.BYE): State.DISCONNECTED for s in connected},
        **{(s, Trigger.DETACH): State.DETACHED for s in connected},
        **{(s, Trigger.CLOSE): State.GONE for s in State if s is not State.GONE},
    }
    assert expected == _TRANSITIONS


def test_a_move_the_table_lacks_is_a_driver_bug() -> None:
    link = BrokerLink("e", HELLO, SETTINGS)
    with pytest.raises(LinkStateError, match="welcome in state disconnected"):
        link._go(Trigger.WELCOME)
    link.close()
    with pytest.raises(LinkStateError):
        link._go(Trigger.DIAL)


def test_wire_input_in_the_wrong_state_is_dropped_not_raised() -> None:
    link = BrokerLink("e", HELLO, SETTINGS)  # no socket: a WELCOME or BYE is for no session
    assert link.receive(welcome(), 1.0) is Inbound.NONE
    assert link.receive(msg(Cmd.BYE), 1.0) is Inbound.NONE
    assert link.state is State.DISCONNECTED


RID = b"\x00" * 7 + b"\x01"


@pytest.mark.parametrize(("frames", "expected"), [
    (msg(Cmd.REQUEST, RID, b"svc", b"", b"m2"), Inbound.REQUEST),
    (msg(Cmd.REQUEST, RID, b"svc", b"", b"m2", b"102400"), Inbound.REQUEST),
    (msg(Cmd.CANCEL, RID), Inbound.CANCEL),
    (msg(Cmd.CREDIT, RID, b"4096"), Inbound.CREDIT),
    (msg(Cmd.BODY, RID, p.BODY_END, b"tail"), Inbound.BODY),
    (msg(Cmd.FRAME, RID, b"m2"), Inbound.FRAME),
    (msg(Cmd.HEARTBEAT, b"extra"), Inbound.NONE),
    # Wrong frame counts, a bad CREDIT, commands a worker never gets, bad framing:
    (msg(Cmd.REQUEST, RID, b"svc", b""), Inbound.NONE),
    (msg(Cmd.REQUEST, RID, b"svc", b"", b"m2", b"1", b"2"), Inbound.NONE),
    (msg(Cmd.CANCEL), Inbound.NONE),
    (msg(Cmd.CREDIT, RID, b"-1"), Inbound.NONE),
    (msg(Cmd.CREDIT, RID, b"9" * 5000), Inbound.NONE),  # int() would refuse it
    (msg(Cmd.CREDIT, RID), Inbound.NONE),
    (msg(Cmd.BODY, RID, b"x"), Inbound.NONE),
    (msg(Cmd.FRAME, RID), Inbound.NONE),
    (msg(Cmd.HELLO, b"{}"), Inbound.NONE),
    (msg(Cmd.REPLY, RID, p.FLAG_LAST), Inbound.NONE),
    (msg(Cmd.READ, RID, b"1"), Inbound.NONE),
    ([p.VERSION, b"\x7f"], Inbound.NONE),
    ([b"S0W2", p.CMD[Cmd.CANCEL], RID], Inbound.NONE),
    ([p.VERSION, b"\x07\x07", RID], Inbound.NONE),
    ([p.VERSION], Inbound.NONE),
    ([], Inbound.NONE),
])
def test_the_command_table(frames: list[bytes], expected: Inbound) -> None:
    link = welcomed(100.0)
    assert link.receive(frames, 101.0) is expected
    assert link.state is State.WELCOMED and sent(link) == []
    assert link.last_seen == 101.0


def test_every_command_a_broker_sends_has_a_row() -> None:
    to_worker = {Cmd.REQUEST, Cmd.HEARTBEAT, Cmd.BYE, Cmd.DRAIN, Cmd.CANCEL, Cmd.CREDIT,
                 Cmd.WELCOME, Cmd.ERROR, Cmd.FRAME, Cmd.BODY, Cmd.RECALL}
    rows = set(link_module._FOR_DRIVER) | set(link_module._LINK_COMMANDS)
    assert rows == to_worker
    assert not set(link_module._FOR_DRIVER) & set(link_module._LINK_COMMANDS)


def test_the_core_imports_no_zmq_socket_or_clock() -> None:
    tree = ast.parse(Path(link_module.__file__).read_text())
    names = {alias.name.split(".")[0] for node in ast.walk(tree)
             if isinstance(node, ast.Import) for alias in node.names}
    names |= {(node.module or "").split(".")[0] for node in ast.walk(tree)
              if isinstance(node, ast.ImportFrom)}
    assert not names & {"zmq", "socket", "time", "asyncio", "threading", "select"}
