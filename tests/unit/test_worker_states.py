"""The broker's S0W1 state machine (scale0/core/worker_states.py) against
docs/protocol.md: its states are section 4.2's, its commands the ones a worker
sends (section 3), its transition table the one written in section 4.2; and
the Dispatcher handles every command in every state as that table says."""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

import pytest

from scale0.core.worker_states import (
    BUSY,
    DRAINING,
    EJECTED,
    READY,
    REMOVED,
    TRANSITIONS,
    WorkerState,
    state_of,
)
from scale0.wire import s0w1 as p

from .test_dispatch import SENDER, Cmd, Harness, ok_reply

PROTOCOL = (Path(__file__).resolve().parents[2] / "docs" / "protocol.md").read_text()


def _section(title: str) -> str:
    start = PROTOCOL.index(f"\n{title}\n")
    end = PROTOCOL.find("\n#", start + len(title) + 2)
    return PROTOCOL[start:end]


def _table_rows(text: str) -> list[list[str]]:
    return [[cell.strip() for cell in line.strip().strip("|").split("|")]
            for line in text.splitlines() if line.startswith("|")]


def test_the_states_are_those_of_section_4_2() -> None:
    names = re.findall(r"^- \*\*([a-z]+)\*\*:", _section("### 4.2 Broker, per worker identity"),
                       re.MULTILINE)
    assert names == [s.value for s in WorkerState]


def test_the_commands_are_those_a_worker_sends_in_section_3() -> None:
    rows = _table_rows(_section("## 3. Commands"))
    sent_by_workers = {row[1] for row in rows[2:] if row[2] in ("W -> B", "both")}
    assert sent_by_workers == {command.name for command in TRANSITIONS}


def test_the_transition_table_is_the_one_in_section_4_2() -> None:
    rows = _table_rows(_section("### 4.2 Broker, per worker identity"))
    header, body = rows[0], rows[2:]
    assert header[0] == "Command"
    states = [WorkerState(name) for name in header[1:]]
    written: dict[str, dict[WorkerState, frozenset[WorkerState]]] = {}
    for row in body:
        cells = {}
        for state, cell in zip(states, row[1:], strict=True):
            if cell != "-":
                cell = cell.removesuffix(" (ignored)")
                cells[state] = frozenset(WorkerState(name) for name in cell.split(", "))
        written[row[0]] = cells
    assert written == {command.name: row for command, row in TRANSITIONS.items()}


# ---- the Dispatcher follows the table --------------------------------------------

W = b"w1"


def _removed() -> Harness:
    return Harness()


def _ready() -> Harness:
    h = Harness()
    h.hello(W, capacity=2)
    return h


def _busy() -> Harness:
    h = Harness()
    h.hello(W)
    h.request(1)
    h.take_one_request()
    return h


def _draining() -> Harness:
    h = Harness()
    h.hello(W)
    h.worker(W, Cmd.DRAIN)
    assert [m.command for m in h.take_workers()] == [Cmd.DRAIN]
    return h


def _ejected() -> Harness:
    h = Harness(eject_after=1, request_timeout_s=1.0)
    h.hello(W)
    h.request(1)
    h.take_one_request()
    h.tick(2.0)  # 504: one timeout in a row ejects it
    h.take_workers()  # the CANCEL
    h.take_mongrel2()
    return h


SETUPS: dict[WorkerState, Callable[[], Harness]] = {
    REMOVED: _removed, READY: _ready, BUSY: _busy, DRAINING: _draining, EJECTED: _ejected}
RID = p.encode_request_id(123456789)  # no request of the broker's: a late reply
ARGS: dict[p.Command, tuple[bytes, ...]] = {
    p.Command.HELLO: (p.Hello((p.ServiceSpec("app", ("/app",)),), 1, worker="w1",
                              heartbeat_ms=100_000).encode(),),
    p.Command.REPLY: (RID, p.FLAG_LAST, ok_reply(SENDER, 1)),
    p.Command.HEARTBEAT: (),
    p.Command.READ: (RID, b"10"),
    p.Command.RETURN: (RID,),
    p.Command.DRAIN: (),
    p.Command.BYE: (),
}


@pytest.mark.parametrize("state", list(WorkerState), ids=lambda s: s.value)
def test_the_setups_are_in_their_states(state: WorkerState) -> None:
    assert state_of(SETUPS[state]().d.workers.get(W)) is state


@pytest.mark.parametrize("command", list(TRANSITIONS), ids=lambda c: c.name)
@pytest.mark.parametrize("state", list(WorkerState), ids=lambda s: s.value)
def test_each_command_in_each_state_goes_where_the_table_says(
        state: WorkerState, command: p.Command) -> None:
    h = SETUPS[state]()  # its Harness checks each step against TRANSITIONS too
    h.worker(W, command, *ARGS[command])
    row = TRANSITIONS[command]
    out = [m for m in h.take_workers() if m.ident == W]
    if state in row:
        assert state_of(h.d.workers.get(W)) in row[state]
        assert Cmd.ERROR not in [m.command for m in out]
        if state is REMOVED and command is p.Command.BYE:
            assert out == []  # ignored: BYEs never ping-pong (section 3.6)
    else:
        assert state is REMOVED, "every registered state takes every worker command"
        assert [m.command for m in out] == [Cmd.BYE]  # "HELLO again" (section 3.6)
        assert h.d.workers.get(W) is None


@pytest.mark.parametrize("byte", [p.Command.REQUEST, p.Command.WELCOME, p.Command.CANCEL,
                                  0x7F], ids=lambda b: f"{int(b):#x}")
@pytest.mark.parametrize("state", list(WorkerState), ids=lambda s: s.value)
def test_a_command_no_worker_sends_is_error_400_or_bye(state: WorkerState, byte: int) -> None:
    h = SETUPS[state]()
    before = state_of(h.d.workers.get(W))
    h.frames(W, [p.VERSION, bytes((byte,))])
    out = [m for m in h.take_workers() if m.ident == W]
    if state is REMOVED:
        assert [m.command for m in out] == [Cmd.BYE]
    else:
        assert [(m.command, m.args[0]) for m in out] == [(Cmd.ERROR, b"400")]
    assert state_of(h.d.workers.get(W)) is before


def test_a_state_change_against_the_table_is_caught(monkeypatch: pytest.MonkeyPatch) -> None:
    """The Harness's transition check can fail: a table that says DRAIN keeps
    a ready worker ready does not hold."""
    monkeypatch.setitem(TRANSITIONS, p.Command.DRAIN,
                        {**TRANSITIONS[p.Command.DRAIN], READY: frozenset({READY})})
    h = _ready()  # its Dispatcher reads the table when it is made
    with pytest.raises(AssertionError, match="DRAIN took worker"):
        h.worker(W, Cmd.DRAIN)
