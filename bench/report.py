"""Markdown tables for the terminal and for docs/benchmarks.md."""

from __future__ import annotations

import math
import os
import platform
import re
import statistics
import subprocess
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import zmq

from .wrk import WrkResult

DOC_PATH = Path(__file__).resolve().parents[1] / "docs" / "benchmarks.md"


@dataclass(frozen=True, slots=True)
class Case:
    payload: str  # label, e.g. "hello (19 B)"
    path: str
    connections: int


@dataclass(frozen=True, slots=True)
class Settings:
    duration_s: int
    runs: int
    wrk_threads: int  # at most this many wrk threads, never more than connections
    warmup_s: int = 1

    def threads(self, connections: int) -> int:
        return min(self.wrk_threads, connections)


Results = dict[tuple[Case, str], list[WrkResult]]  # (case, scenario) -> one per run
Memory = list[tuple[str, str, int, int | None]]  # scenario, process, pid, RSS KiB


def _ms(value: float) -> str:
    if math.isnan(value):
        return "-"
    return f"{value:.2f}" if value < 10 else f"{value:.1f}"


def _cell(runs: list[WrkResult]) -> str:
    rps = statistics.median(r.requests_per_s for r in runs)
    p50 = statistics.median(r.p50_ms for r in runs)
    p99 = statistics.median(r.p99_ms for r in runs)
    return f"{rps:,.0f} ({_ms(p50)} / {_ms(p99)} ms)"


def _errors(results: Results, case: Case, scenarios: list[str]) -> str:
    parts = []
    for name in scenarios:
        runs = results[case, name]
        non_2xx = sum(r.non_2xx for r in runs)
        sock = sum(r.socket_errors for r in runs)
        empty = sum(1 for r in runs if r.requests == 0)
        if non_2xx or sock or empty:
            bad = [str(i + 1) for i, r in enumerate(runs) if r.errors or r.requests == 0]
            text = f"**{name}: {non_2xx} non-2xx, {sock} socket"
            text += f", {empty} empty run(s)" if empty else ""
            parts.append(text + f" (run {', '.join(bad)})**")
    return "; ".join(parts) or "0"


def results_table(results: Results, cases: list[Case], scenarios: list[str]) -> str:
    """One row per case: the baseline (first scenario), then each other with
    its ratio to the baseline measured in the same run."""
    base, others = scenarios[0], scenarios[1:]
    head = f"| payload | connections | {base} req/s (p50 / p99) | "
    head += "".join(f"{o} req/s (p50 / p99) | {o}/{base} | " for o in others)
    lines = [head + "errors |", "|---|---:|---:|" + "---:|---:|" * len(others) + "---|"]
    for case in cases:
        a = statistics.median(r.requests_per_s for r in results[case, base])
        row = f"| {case.payload} | {case.connections} | {_cell(results[case, base])} | "
        for other in others:
            b = statistics.median(r.requests_per_s for r in results[case, other])
            ratio = f"{b / a:.2f}x" if a > 0 else "-"
            row += f"{_cell(results[case, other])} | {ratio} | "
        lines.append(row + f"{_errors(results, case, scenarios)} |")
    return "\n".join(lines)


def runs_table(results: Results, cases: list[Case], scenarios: list[str]) -> str:
    lines = ["| payload | connections | " + " | ".join(f"{s} req/s, each run"
                                                    for s in scenarios) + " |",
             "|---|---:|" + "---:|" * len(scenarios)]
    for case in cases:
        cells = [" / ".join(f"{r.requests_per_s:,.0f}" for r in results[case, s])
                 for s in scenarios]
        lines.append(f"| {case.payload} | {case.connections} | " + " | ".join(cells) + " |")
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


def machine() -> list[tuple[str, str]]:
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
        ("Scale0 source", f"git {rev}" + (" (uncommitted changes)" if "dirty" in rev else "")),
    ]


def machine_table() -> str:
    return "\n".join(["| | |", "|---|---|", *(f"| {k} | {v} |" for k, v in machine())])
