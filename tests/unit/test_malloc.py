"""scale0.deploy.malloc: glibc malloc thresholds, and the operator's choice winning."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest

from scale0.deploy import malloc
from scale0.deploy.m2server import Mongrel2Server

ROOT = Path(__file__).resolve().parents[2]

# Three 1 MiB bodies and two of 8 MiB built and dropped, over and over, as a
# process on a large reply's path does; prints whether it tuned and the pages
# faulted per round.
CHURN = """
import os, resource, sys
from scale0.deploy import malloc
tuned = malloc.tune_this_process(os.environ) if sys.argv[1] == "tune" else False
def churn():
    bodies = [b"x" * (1 << 20) for _ in range(3)]  # every page written
    bodies += [b"x" * (8 << 20) for _ in range(2)]  # apps' bodies in one block
    del bodies
churn()  # the first round faults its pages in whatever the thresholds
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(20):
    churn()
print(tuned, (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 20)
"""


def churn(mode: str, **env: str) -> tuple[bool, float]:
    clean = {k: v for k, v in os.environ.items()
             if k != "GLIBC_TUNABLES" and not k.startswith("MALLOC_")}
    out = subprocess.run([sys.executable, "-c", CHURN, mode], capture_output=True, text=True,
                         timeout=60, check=True, cwd=ROOT,
                         env={**clean, "PYTHONPATH": str(ROOT), **env}).stdout.split()
    return out[0] == "True", float(out[1])


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's mallopt")
def test_a_tuned_process_keeps_large_buffers_mapped_and_an_untuned_one_does_not() -> None:
    tuned, faults = churn("tune")
    assert tuned and faults < 8  # each round's 4,864 pages stay mapped
    untuned, faults = churn("leave")  # glibc's defaults: the control
    assert not untuned and faults > 256  # at least one body's pages faulted in again


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's mallopt")
@pytest.mark.parametrize("env", [{"MALLOC_TRIM_THRESHOLD_": "131072"},
                                 {"GLIBC_TUNABLES": "glibc.malloc.mmap_threshold=131072"}])
def test_the_operators_own_thresholds_are_left_alone(env: dict[str, str]) -> None:
    tuned, _ = churn("tune", **env)
    assert not tuned


@pytest.mark.parametrize(("environ", "chose"), [
    ({}, False),
    ({"MALLOC_ARENA_MAX": "2"}, False),  # another setting: ours still apply
    ({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"}, False),
    ({"MALLOC_MMAP_THRESHOLD_": "1"}, True),
    ({"MALLOC_TRIM_THRESHOLD_": "1"}, True),
    ({"GLIBC_TUNABLES": "glibc.malloc.trim_threshold=1"}, True),
    ({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2:glibc.malloc.mmap_threshold=1"}, True),
])
def test_operator_chose_means_either_threshold_is_set(environ: dict[str, str],
                                                       chose: bool) -> None:
    assert malloc.operator_chose(environ) is chose


def test_mongrel2_gets_the_thresholds_added_to_the_tunables_it_has() -> None:
    assert malloc.child_overrides({}) == {"GLIBC_TUNABLES": malloc.TUNABLES}
    assert malloc.child_overrides({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"}) == {
        "GLIBC_TUNABLES": f"glibc.malloc.arena_max=2:{malloc.TUNABLES}"}
    assert malloc.child_overrides({"MALLOC_TRIM_THRESHOLD_": "1"}) == {}
    assert "glibc.malloc.mmap_threshold=33554432" in malloc.TUNABLES
    assert "glibc.malloc.trim_threshold=33554432" in malloc.TUNABLES


def test_mongrel2s_command_line_passes_them_on(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("GLIBC_TUNABLES", "MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_THRESHOLD_"):
        monkeypatch.delenv(name, raising=False)
    server = Mongrel2Server(Path("mongrel2.conf"), Path("m2"), "u")
    assert server.argv() == ["env", f"GLIBC_TUNABLES={malloc.TUNABLES}",
                             "mongrel2", "config.sqlite", "u"]
    monkeypatch.setenv("MALLOC_TRIM_THRESHOLD_", "131072")
    assert server.argv() == ["mongrel2", "config.sqlite", "u"]
