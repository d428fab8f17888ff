"""Markdown tables for the terminal and for docs/benchmarks.md (pure functions of results)."""

from __future__ import annotations

import math
import os
import platform
import re
import statistics
import subprocess
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import zmq

from .wrk import WrkResult

DOC_PATH = Path(__file__).resolve().parents[1] / "docs" / "benchmarks.md"
WRK_ROLE = "wrk (client)"


@dataclass(frozen=True, slots=True)
class Case:
    payload: str  # label, e.g. "hello (19 B)"
    path: str
    connections: int

    @property
    def label(self) -> str:
        return f"{self.payload}, c={self.connections}"


@dataclass(frozen=True, slots=True)
class Settings:
    duration_s: int
    runs: int
    wrk_threads: int  # at most this many wrk threads, never more than connections
    warmup_s: int = 1

    def threads(self, connections: int) -> int:
        return min(self.wrk_threads, connections)


@dataclass(frozen=True, slots=True)
class Run:
    """One wrk run against one scenario, with the CPU each process spent in it."""

    wrk: WrkResult
    cpu_us: dict[str, float] = field(default_factory=dict)  # role -> CPU µs per request


Results = dict[tuple[Case, str], list[Run]]  # (case, scenario) -> one per run
Memory = list[tuple[str, str, int, int | None]]  # scenario, process, pid, RSS KiB


def median_of(runs: list[Run], get: Callable[[Run], float]) -> float:
    values = [v for v in (get(r) for r in runs) if not math.isnan(v)]
    return statistics.median(values) if values else math.nan


def rps(results: Results, case: Case, name: str) -> float:
    return median_of(results.get((case, name), []), lambda r: r.wrk.requests_per_s)


def p50_ms(results: Results, case: Case, name: str) -> float:
    return median_of(results.get((case, name), []), lambda r: r.wrk.p50_ms)


def cpu_roles(runs: list[Run]) -> list[str]:
    """Roles in the order they first appear (the scenario's start order)."""
    roles: list[str] = []
    for run in runs:
        roles += [role for role in run.cpu_us if role not in roles]
    return roles


def cpu_us(results: Results, case: Case, name: str, match: Callable[[str], bool]) -> float:
    """Median over runs of the CPU µs per request of the roles `match` picks, summed per run."""
    runs = results.get((case, name), [])
    sums = [sum(v for role, v in r.cpu_us.items() if match(role)) for r in runs
            if any(match(role) for role in r.cpu_us)]
    return statistics.median(sums) if sums else math.nan


def _ms(value: float) -> str:
    if math.isnan(value):
        return "-"
    return f"{value:.2f}" if value < 10 else f"{value:.1f}"


def _us(value: float) -> str:
    return "-" if math.isnan(value) else f"{value:,.0f}" if value >= 10 else f"{value:.1f}"


def _errors(runs: list[Run]) -> str:
    non_2xx = sum(r.wrk.non_2xx for r in runs)
    sock = sum(r.wrk.socket_errors for r in runs)
    empty = sum(1 for r in runs if r.wrk.requests == 0)
    if not (non_2xx or sock or empty):
        return "0"
    bad = [str(i + 1) for i, r in enumerate(runs) if r.wrk.errors or r.wrk.requests == 0]
    text = f"**{non_2xx} non-2xx, {sock} socket"
    text += f", {empty} empty run(s)" if empty else ""
    return text + f" (run {', '.join(bad)})**"


def _not_wrk(role: str) -> bool:
    return role != WRK_ROLE


def results_table(results: Results, cases: list[Case], scenarios: list[str],
                  unit: str = "req") -> str:
    """One row per case and scenario: medians of req/s, p50, p99; errors; server CPU.
    `unit` "msg" for WebSocket echoes: messages/s, round trips, CPU per message."""
    lines = [f"| payload | c | scenario | {unit}/s | p50 ms | p99 ms | errors "
             f"| server CPU µs/{unit} |",
             "|---|---:|---|---:|---:|---:|---|---:|"]
    for case in cases:
        for name in scenarios:
            runs = results.get((case, name), [])
            if not runs:
                continue
            p99 = median_of(runs, lambda r: r.wrk.p99_ms)
            lines.append(f"| {case.payload} | {case.connections} | {name} "
                         f"| {rps(results, case, name):,.0f} | {_ms(p50_ms(results, case, name))} "
                         f"| {_ms(p99)} | {_errors(runs)} "
                         f"| {_us(cpu_us(results, case, name, _not_wrk))} |")
    return "\n".join(lines)


def ratio_table(results: Results, cases: list[Case], subject: str, others: list[str]) -> str:
    """req/s of `subject` divided by each other scenario's, measured in the same run."""
    present = [o for o in others if any((c, o) in results for c in cases)]
    lines = [f"| payload | c | {subject} req/s | " + " | ".join(f"/ {o}" for o in present) + " |",
             "|---|---:|---:|" + "---:|" * len(present)]
    for case in cases:
        mine = rps(results, case, subject)
        if math.isnan(mine):
            continue
        cells = []
        for other in present:
            theirs = rps(results, case, other)
            cells.append(f"{mine / theirs:.2f}x" if theirs > 0 else "-")
        lines.append(f"| {case.payload} | {case.connections} | {mine:,.0f} | "
                     + " | ".join(cells) + " |")
    return "\n".join(lines)


def cpu_table(results: Results, cases: list[Case], scenarios: list[str]) -> str:
    """CPU µs per request of every process (median over runs), one column per case."""
    lines = ["| scenario | process | " + " | ".join(c.label for c in cases) + " |",
             "|---|---|" + "---:|" * len(cases)]
    for name in scenarios:
        runs = [r for c in cases for r in results.get((c, name), [])]
        if not runs:
            continue
        roles = [r for r in cpu_roles(runs) if r != WRK_ROLE]
        for role in [*roles, "all server processes", WRK_ROLE]:
            if role == "all server processes":
                match: Callable[[str], bool] = _not_wrk
            else:
                match = role.__eq__
            cells = [_us(cpu_us(results, c, name, match)) for c in cases]
            label = f"**{role}**" if role == "all server processes" else role
            lines.append(f"| {name} | {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def runs_table(results: Results, cases: list[Case], scenarios: list[str]) -> str:
    lines = ["| payload | c | scenario | req/s, each run |", "|---|---:|---|---|"]
    for case in cases:
        for name in scenarios:
            runs = results.get((case, name), [])
            if runs:
                each = " / ".join(f"{r.wrk.requests_per_s:,.0f}" for r in runs)
                lines.append(f"| {case.payload} | {case.connections} | {name} | {each} |")
    return "\n".join(lines)


def memory_table(memory: Memory) -> str:
    lines = ["| scenario | process | pid | RSS (MiB) |", "|---|---|---:|---:|"]
    for scenario, process, pid, kib in memory:
        rss = "gone" if kib is None else f"{kib / 1024:.1f}"
        lines.append(f"| {scenario} | {process} | {pid} | {rss} |")
    return "\n".join(lines)


def _command(argv: list[str]) -> str:
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return ""
    return (done.stdout + done.stderr).strip()


def mongrel2_version() -> str:
    found = re.search(r"Mongrel2/?\s*v?(\d+\.\d+\.\d+)", _command(["mongrel2", "-V"]))
    if found:
        return found.group(1)
    dpkg = _command(["dpkg-query", "-W", "-f", "${Version}", "mongrel2-core"])
    return f"{dpkg} (Debian mongrel2-core)" if dpkg else "unknown"


def machine(extra: list[tuple[str, str]] | None = None) -> list[tuple[str, str]]:
    model = "unknown"
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text()
        found = re.search(r"^model name\s*:\s*(.+)$", cpuinfo, re.M)
        model = found.group(1).strip() if found else model
    except OSError:
        pass
    root = str(Path(__file__).resolve().parents[1])
    rev = _command(["git", "-C", root, "describe", "--always", "--dirty"]) or "unknown"
    return [
        ("date (UTC)", datetime.now(UTC).strftime("%Y-%m-%d %H:%M")),
        ("CPUs (nproc)", str(len(os.sched_getaffinity(0)))),
        ("CPU model", model),
        ("kernel", platform.release()),
        ("Python", platform.python_version()),
        ("pyzmq / libzmq", f"{zmq.__version__} / {zmq.zmq_version()}"),
        ("Mongrel2", mongrel2_version()),
        ("wrk", (_command(["wrk", "-v"]).split(" Copyright")[0] or "unknown")),
        *(extra or []),
        ("Scale0 source", f"git {rev}" + (" (uncommitted changes)" if "dirty" in rev else "")),
    ]


def machine_table(extra: list[tuple[str, str]] | None = None) -> str:
    return "\n".join(["| | |", "|---|---|", *(f"| {k} | {v} |" for k, v in machine(extra))])
