"""RateLimitedLog: one line at once, then a count and a sample per interval."""

from __future__ import annotations

import logging

import pytest

from scale0.core.ratelog import RateLimitedLog


def test_a_flood_is_one_sample_and_one_summary_per_interval(
        caplog: pytest.LogCaptureFixture) -> None:
    logger = logging.getLogger("test.ratelog")
    rl = RateLimitedLog(logger, interval_s=10.0)
    with caplog.at_level(logging.WARNING, logger="test.ratelog"):
        for i in range(1000):
            rl.warning("bad", i * 0.01, "bad message %d", i)  # 0 .. 9.99 s
        assert [r.getMessage() for r in caplog.records] == ["bad message 0"]
        rl.warning("other", 5.0, "other %s", "x")  # another kind is not held back
        rl.flush(9.99)
        assert len(caplog.records) == 2
        rl.flush(10.0)
        assert [r.getMessage() for r in caplog.records][2] == (
            "999 more bad warnings in 10 s (last: bad message 999)")
        rl.warning("bad", 10.5, "bad message %d", 1000)  # a new interval: logged at once
    assert [r.getMessage() for r in caplog.records][3] == "bad message 1000"
    assert rl.logged == 4 and rl.suppressed == 999
    assert caplog.records[0].filename == "test_ratelog.py"  # the caller's line, not ours


def test_the_summary_comes_with_the_next_warning_after_the_interval(
        caplog: pytest.LogCaptureFixture) -> None:
    rl = RateLimitedLog(logging.getLogger("test.ratelog2"), interval_s=1.0)
    with caplog.at_level(logging.WARNING, logger="test.ratelog2"):
        rl.warning("k", 0.0, "a")
        rl.warning("k", 0.5, "b")
        rl.warning("k", 2.0, "c")
    assert [r.getMessage() for r in caplog.records] == [
        "a", "1 more k warnings in 1 s (last: b)", "c"]
