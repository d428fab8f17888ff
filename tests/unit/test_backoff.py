"""The crash-loop policy (scale0/core/backoff.py): exact delays with a fixed random source."""

from __future__ import annotations

import pytest

from scale0.core.backoff import CRASH_POLICY, Backoff, CrashPolicy


def test_delays_double_from_first_up_to_the_cap() -> None:
    policy = CrashPolicy(first_s=0.5, max_s=4.0, healthy_s=10.0, jitter=0.0)
    b = Backoff(policy, rand=lambda: 0.0)
    now = 100.0
    delays = []
    for _ in range(6):
        delays.append(b.exited(now, 1.0))
        assert b.retry_at == now + delays[-1]
        now += 1.0
    assert delays == [0.5, 1.0, 2.0, 4.0, 4.0, 4.0]
    assert b.crashes == 6


def test_jitter_cuts_each_delay_by_up_to_its_fraction_and_never_exceeds_the_cap() -> None:
    policy = CrashPolicy(first_s=1.0, max_s=8.0, jitter=0.25)
    assert policy.delay_s(1, 0.0) == 1.0
    assert policy.delay_s(1, 0.5) == 0.875
    assert policy.delay_s(2, 0.999) == pytest.approx(2.0 * (1 - 0.25 * 0.999))
    assert all(policy.delay_s(n, r) <= 8.0 for n in range(1, 100) for r in (0.0, 0.5, 0.99))
    assert policy.delay_s(10_000, 0.0) == 8.0  # no overflow far past the cap
    assert policy.delay_s(0) == 0.0


def test_the_random_source_is_drawn_once_per_crash() -> None:
    draws = iter([0.0, 1.0 - 1e-9, 0.5])
    b = Backoff(CrashPolicy(first_s=1.0, max_s=100.0, jitter=0.5), rand=lambda: next(draws))
    assert b.exited(0.0, 0.0) == 1.0
    assert b.exited(1.0, 0.0) == pytest.approx(1.0)  # 2.0 cut by (almost) half
    assert b.exited(2.0, 0.0) == 3.0  # 4.0 cut by a quarter


def test_a_healthy_run_starts_the_count_over() -> None:
    b = Backoff(CrashPolicy(first_s=0.1, max_s=10.0, healthy_s=5.0, jitter=0.0))
    for _ in range(4):
        b.exited(0.0, 0.1)
    assert b.crashes == 4
    assert b.exited(50.0, 5.0) == pytest.approx(0.1)  # it ran 5 s: a first crash again
    assert b.crashes == 1
    assert b.exited(51.0, 4.99) == pytest.approx(0.2)


def test_crash_loop_after_loop_after_quick_crashes_in_a_row() -> None:
    b = Backoff(CrashPolicy(loop_after=3, jitter=0.0))
    b.exited(0.0, 0.0)
    b.exited(1.0, 0.0)
    assert not b.crash_loop
    b.exited(2.0, 0.0)
    assert b.crash_loop
    b.exited(100.0, 60.0)  # healthy before this crash
    assert not b.crash_loop


def test_a_clean_exit_is_counted_and_restarted_at_once() -> None:
    b = Backoff(CrashPolicy(jitter=0.0))
    assert b.exited(7.0, 0.0, crashed=False) == 0.0
    assert b.crashes == 1 and b.retry_at == 7.0 and b.due(7.0)


def test_due_and_reset() -> None:
    b = Backoff(CrashPolicy(first_s=2.0, max_s=2.0, jitter=0.0))
    assert b.due(0.0)  # never crashed: start now
    b.exited(10.0, 0.0)
    assert not b.due(11.9) and b.due(12.0)
    b.reset()
    assert b.crashes == 0 and b.due(0.0)


def test_the_default_policy_has_jitter_and_a_cap() -> None:
    b = Backoff()
    assert b.policy is CRASH_POLICY
    delays = [b.exited(float(n), 0.0) for n in range(20)]
    assert all(0 < d <= CRASH_POLICY.max_s for d in delays)
    assert 0 < CRASH_POLICY.jitter < 1


@pytest.mark.parametrize("kwargs", [{"first_s": 0.0}, {"first_s": 2.0, "max_s": 1.0},
                                    {"jitter": 1.0}, {"jitter": -0.1}, {"loop_after": 0},
                                    {"healthy_s": -1.0}])
def test_a_policy_that_makes_no_sense_is_refused(kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        CrashPolicy(**kwargs)  # type: ignore[arg-type]
