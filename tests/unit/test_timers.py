"""net/timers.py: a loop's timers as a table, driven with a fake `now`."""

from __future__ import annotations

from scale0.net.timers import NEVER, Timer, Timers, poll_timeout_ms


def test_due_timers_fire_in_table_order_once_per_plan_and_wake_only_ones_never() -> None:
    fired: list[tuple[str, float]] = []
    state = {"beat": 1.0, "tick": 3.0}

    def beat(now: float) -> None:
        fired.append(("beat", now))
        state["beat"] = now + 1.0

    timers = Timers([
        Timer("beat", lambda now: state["beat"], beat),
        Timer("wake", lambda now: now + 0.02),  # only bounds the poll
        Timer("tick", lambda now: state["tick"], lambda now: fired.append(("tick", now))),
        Timer("off", lambda now: NEVER, lambda now: fired.append(("off", now))),
    ])
    assert timers.plan(0.0) == 0.02
    timers.fire(0.5)
    assert fired == []
    assert timers.plan(0.5) == 0.52
    timers.fire(3.0)  # both due as planned at 0.5: in table order
    assert fired == [("beat", 3.0), ("tick", 3.0)]
    timers.fire(3.0)  # fired timers wait for the next plan
    assert len(fired) == 2
    assert timers.plan(3.0) == 3.0  # tick is still due (it did not move its time)
    assert Timers([Timer("off", lambda now: NEVER)]).plan(0.0) == NEVER


def test_poll_timeout_rounds_up_never_negative_and_none_for_never() -> None:
    assert poll_timeout_ms(1.0001, 1.0) == 1  # rounding down would wake early and spin
    assert poll_timeout_ms(1.0, 2.0) == 0
    assert poll_timeout_ms(3.5, 1.0) == 2500
    assert poll_timeout_ms(NEVER, 1.0) is None
