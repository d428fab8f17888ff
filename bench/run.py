"""`make bench`: Mongrel2 -> direct handler vs Mongrel2 -> Scale0, measured with wrk.

Starts both stacks on free ports in a temp folder, checks they give the same
bytes, warms each case up, runs wrk BENCH_RUNS times per scenario and case
(interleaved), prints Markdown tables (medians) and writes docs/benchmarks.md.
Every process it starts is stopped at the end, also on errors and Ctrl-C.
"""

from __future__ import annotations

import os
import shutil
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path

from scale0.m2server import Mongrel2Error

from . import doc, wrk
from .procs import BenchError, http_get, rss_kib
from .report import (
    DOC_PATH,
    Case,
    Memory,
    Results,
    Settings,
    machine_table,
    memory_table,
    results_table,
    runs_table,
)
from .scenarios import Scenario, start_direct, start_scale0

PAYLOADS = (("hello (19 B)", "/", b"Hello from Scale0!\n"),
            ("64 KiB", "/bytes/65536", b"x" * 65536))
CONNECTIONS = (1, 64)
CASES = [Case(label, path, c) for label, path, _ in PAYLOADS for c in CONNECTIONS]


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    if not raw.isdigit() or int(raw) < 1:
        raise BenchError(f"{name} must be a whole number >= 1, got {raw!r}")
    return int(raw)


def settings_from_env() -> Settings:
    return Settings(duration_s=_env_int("BENCH_DURATION", 5), runs=_env_int("BENCH_RUNS", 3),
                    wrk_threads=_env_int("BENCH_WRK_THREADS", 2))


def log(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def check_answers(scenarios: list[Scenario]) -> None:
    """Every scenario must answer each benchmarked path with the expected bytes."""
    for scenario in scenarios:
        for _, path, expected in PAYLOADS:
            try:
                status, body = http_get(scenario.http_port, path, timeout_s=5.0)
            except OSError as exc:
                raise BenchError(f"{scenario.name}: GET {path} failed: {exc}") from exc
            if status != 200 or body != expected:
                raise BenchError(f"{scenario.name}: GET {path} gave {status} and "
                                 f"{len(body)} bytes ({body[:40]!r}), not the expected "
                                 f"200 and {len(expected)} bytes")


def _wrk(scenario: Scenario, case: Case, settings: Settings, duration_s: int) -> wrk.WrkResult:
    result = wrk.run(scenario.url(case.path), case.connections,
                     settings.threads(case.connections), duration_s)
    scenario.check_alive()  # a crash during the run fails loudly, with the logs
    return result


def measure(scenarios: list[Scenario], settings: Settings) -> Results:
    for scenario in scenarios:
        log(f"warming up {scenario.name} ({settings.warmup_s} s per case)")
        for case in CASES:
            _wrk(scenario, case, settings, settings.warmup_s)
    results: Results = {(case, s.name): [] for case in CASES for s in scenarios}
    total, done = settings.runs * len(CASES) * len(scenarios), 0
    for run in range(settings.runs):
        for case in CASES:
            for scenario in scenarios:
                result = _wrk(scenario, case, settings, settings.duration_s)
                results[case, scenario.name].append(result)
                done += 1
                flag = f"  ERRORS: {result.non_2xx} non-2xx, {result.socket_errors} socket" \
                    if result.errors else ""
                log(f"[{done}/{total}] run {run + 1} {scenario.name:6} {case.payload:12} "
                    f"c={case.connections:<3} {result.requests_per_s:9,.0f} req/s  "
                    f"p50 {result.p50_ms:.2f} ms  p99 {result.p99_ms:.2f} ms{flag}")
    return results


def memory(scenarios: list[Scenario]) -> Memory:
    return [(s.name, role, pid, rss_kib(pid)) for s in scenarios for role, pid in s.memory_pids()]


def _ratio(results: Results, case: Case) -> float:
    direct = statistics.median(r.requests_per_s for r in results[case, "direct"])
    scale0 = statistics.median(r.requests_per_s for r in results[case, "scale0"])
    return scale0 / direct if direct else 0.0


def report(results: Results, mem: Memory, settings: Settings) -> None:
    names = ["direct", "scale0", "scale0+relay"]
    table = results_table(results, CASES, names)
    per_run = runs_table(results, CASES, names)
    mem_table = memory_table(mem)
    print(f"\n{table}\n\n{mem_table}\n")
    hello_c1, hello_c64 = CASES[0], CASES[1]
    direct_c1 = statistics.median(r.requests_per_s for r in results[hello_c1, "direct"])
    text = doc.render(machine=machine_table(), settings=settings,
                      cpus=str(len(os.sched_getaffinity(0))), results=table, runs=per_run,
                      memory=mem_table,
                      summary=doc.summary(direct_c1, _ratio(results, hello_c1),
                                          _ratio(results, hello_c64)))
    DOC_PATH.parent.mkdir(parents=True, exist_ok=True)
    DOC_PATH.write_text(text)
    log(f"wrote {DOC_PATH}")


def _raise_interrupt(*_: object) -> None:
    raise KeyboardInterrupt


def main() -> int:
    started = time.monotonic()
    try:
        settings = settings_from_env()
        wrk.require_wrk()
        if shutil.which("mongrel2") is None or shutil.which("m2sh") is None:
            raise BenchError("mongrel2/m2sh not found: apt-get install mongrel2-core")
    except BenchError as exc:
        log(f"bench: {exc}")
        return 2
    signal.signal(signal.SIGTERM, _raise_interrupt)  # stop the stacks on SIGTERM too
    tmp = Path(tempfile.mkdtemp(prefix="scale0-bench-"))
    scenarios: list[Scenario] = []
    keep_logs = False
    try:
        log(f"starting stacks in {tmp}")
        scenarios.append(start_direct(tmp / "direct"))
        scenarios.append(start_scale0(tmp / "scale0"))
        scenarios.append(start_scale0(tmp / "scale0-relay", relay=True))
        check_answers(scenarios)
        results = measure(scenarios, settings)
        mem = memory(scenarios)
    except (BenchError, Mongrel2Error) as exc:
        log(f"bench: FAILED: {exc}")
        keep_logs = True
        return 1
    except KeyboardInterrupt:
        log("bench: interrupted")
        return 130
    finally:
        # A second Ctrl-C or a SIGTERM must not cut the cleanup short.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        for scenario in reversed(scenarios):
            scenario.stop()
        signal.signal(signal.SIGINT, signal.default_int_handler)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        if keep_logs:
            log(f"bench: logs kept in {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    report(results, mem, settings)
    log(f"total runtime {time.monotonic() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
