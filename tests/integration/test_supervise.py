"""Pool's rules with fake workers (pool_harness.py): real forks and signals,
no sockets, no Mongrel2."""

from __future__ import annotations

import signal
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from bench.procs import children
from tests.e2e.conftest import ROOT, Proc, wait_for

HARNESS = Path(__file__).with_name("pool_harness.py")


class FakePool:
    def __init__(self, folder: Path, size: int, *kwargs: str, ready: bool = True) -> None:
        self.folder = folder
        self.proc = Proc("pool", [sys.executable, str(HARNESS), str(folder), str(size),
                                  *kwargs], folder, {"PYTHONPATH": str(ROOT)})
        if ready:  # the pool's READY: every slot holds a ready process
            self.proc.wait_ready()

    def pids(self) -> set[int]:
        return set(children(self.proc.popen.pid))

    def log(self) -> str:
        return self.proc.log_tail(1_000_000)

    def marked(self, what: str, pids: set[int]) -> bool:
        """Every one of `pids` left its `what-PID` file (pool_harness.py)."""
        return all((self.folder / f"{what}-{pid}").exists() for pid in pids)

    def wait_pids(self, size: int) -> set[int]:
        wait_for(lambda: len(pids := self.pids()) == size and self.marked("ready", pids),
                 10, f"{size} ready processes")
        return self.pids()


@pytest.fixture
def pools(tmp_path: Path) -> Iterator[list[FakePool]]:
    started: list[FakePool] = []
    try:
        yield started
    finally:
        for pool in started:
            pool.proc.stop()


def start(pools: list[FakePool], folder: Path, size: int, *kwargs: str,
          ready: bool = True) -> FakePool:
    pool = FakePool(folder, size, *kwargs, ready=ready)
    pools.append(pool)
    return pool


def test_hup_replaces_every_process_after_its_replacement_is_ready(
        pools: list[FakePool], tmp_path: Path) -> None:
    pool = start(pools, tmp_path, 3)
    old = pool.wait_pids(3)
    pool.proc.send_signal(signal.SIGHUP)
    wait_for(lambda: len(pool.pids()) == 3 and not pool.pids() & old, 15, "the reload")
    log = pool.log()
    for pid in old:  # each old one was stopped only once a new one was ready
        stop_line = log.index(f"stopping process {pid} ")
        assert log.count("is ready", 0, stop_line) >= 4
        assert "its replacement is ready" in log[stop_line:].splitlines()[0]


def test_hup_during_a_reload_starts_it_over(pools: list[FakePool], tmp_path: Path) -> None:
    pool = start(pools, tmp_path, 2)
    old = pool.wait_pids(2)
    pool.proc.send_signal(signal.SIGHUP)
    pool.proc.send_signal(signal.SIGHUP)
    pool.proc.send_signal(signal.SIGHUP)
    wait_for(lambda: len(pool.pids()) == 2 and not pool.pids() & old, 15, "the reload")
    pool.wait_pids(2)  # the new processes are ready
    assert pool.proc.popen.poll() is None


def test_reload_to_code_that_cannot_boot_keeps_the_old_processes(
        pools: list[FakePool], tmp_path: Path) -> None:
    pool = start(pools, tmp_path, 2)
    old = pool.wait_pids(2)
    (tmp_path / "broken").touch()
    pool.proc.send_signal(signal.SIGHUP)
    wait_for(lambda: list(tmp_path.glob("boot-failed-*")), 10, "the failed boot")
    wait_for(lambda: pool.pids() == old, 10, "only the old processes to be left")
    assert pool.proc.popen.poll() is None
    (tmp_path / "broken").unlink()
    pool.proc.send_signal(signal.SIGHUP)
    wait_for(lambda: len(pool.pids()) == 2 and not pool.pids() & old, 15, "the next reload")


def test_a_pool_that_cannot_boot_halts(pools: list[FakePool], tmp_path: Path) -> None:
    (tmp_path / "broken").touch()
    pool = start(pools, tmp_path, 2, ready=False)
    assert pool.proc.popen.wait(10) == 3
    assert "no process serves; stopping the pool" in pool.log()
    assert pool.proc.stdout_lines() == []  # no READY line


def _most_alive_until_replaced(pool: FakePool, replacements: int, what: str) -> int:
    """Watch a 2-process pool until `replacements` new processes have come;
    return the most that were alive at once."""
    first = pool.wait_pids(2)
    seen, most = set(first), 0

    def sample() -> bool:
        nonlocal most
        now = pool.pids()
        seen.update(now)
        most = max(most, len(now))
        return len(seen - first) >= replacements

    wait_for(sample, 30, what)
    return most


def test_max_requests_recycles_each_process_once_replaced(pools: list[FakePool],
                                                          tmp_path: Path) -> None:
    pool = start(pools, tmp_path, 2, "max_requests=25", "max_requests_jitter=10")
    most = _most_alive_until_replaced(pool, 6, "three rounds of replacements")
    assert most <= 4  # 2 serving + 2 replacements (a fake worker stops at once)
    limits = [int(line.rsplit("max ", 1)[1].split()[0])
              for line in pool.log().splitlines() if "started process" in line]
    assert all(25 <= n <= 35 for n in limits) and len(set(limits)) > 1


def test_processes_on_their_way_out_are_bounded_when_they_drain_slowly(
        pools: list[FakePool], tmp_path: Path) -> None:
    # A request limit reached every ~60 ms, a drain of 1 s: without a bound,
    # retired processes pile up (one more every ~60 ms per slot).
    (tmp_path / "slow-stop").touch()
    pool = start(pools, tmp_path, 2, "max_requests=3")
    # It keeps recycling, as fast as they leave.
    most = _most_alive_until_replaced(pool, 6, "six replacements")
    assert most <= 4, most  # 2 current + at most 2 superseded or stopping


def test_timeout_kills_a_wedged_process_and_replaces_it(pools: list[FakePool],
                                                        tmp_path: Path) -> None:
    pool = start(pools, tmp_path, 1, "timeout_s=1.0")
    (wedged,) = pool.wait_pids(1)
    (tmp_path / "wedge").touch()
    wait_for(lambda: wedged not in pool.pids(), 10, "the timeout")
    assert f"killing process {wedged} (slot 0): timed out: main loop stuck" in pool.log()
    (tmp_path / "wedge").unlink()
    wait_for(lambda: len(pool.pids()) == 1 and wedged not in pool.pids(), 10,
             "a replacement")


def test_ttin_and_ttou_resize_the_pool(pools: list[FakePool], tmp_path: Path) -> None:
    pool = start(pools, tmp_path, 1)
    pool.wait_pids(1)
    pool.proc.send_signal(signal.SIGTTIN)
    wait_for(lambda: len(pool.pids()) == 2, 10, "two processes")
    pool.proc.send_signal(signal.SIGTTOU)
    wait_for(lambda: len(pool.pids()) == 1, 10, "one process")


def test_second_sigterm_kills_processes_that_do_not_stop(pools: list[FakePool],
                                                         tmp_path: Path) -> None:
    (tmp_path / "stubborn").touch()
    pool = start(pools, tmp_path, 2, "graceful_timeout_s=60.0")
    pids = pool.wait_pids(2)
    pool.proc.send_signal(signal.SIGTERM)
    wait_for(lambda: pool.marked("term", pids), 5, "the first SIGTERM to reach both")
    assert pool.proc.popen.poll() is None  # waits for its stubborn processes
    pool.proc.send_signal(signal.SIGTERM)
    assert pool.proc.popen.wait(10) == 0
    assert "forced stop: killing 2 processes" in pool.log()
    wait_for(lambda: not any(Path(f"/proc/{pid}").exists() for pid in pids), 10,
             "the processes to be gone")
