"""`make bench`: Scale0 against Mongrel2's ceiling and against nginx -> gunicorn / granian.

Starts every scenario on free ports in a temp folder, checks they all give
the same bytes, warms each case up, runs wrk BENCH_RUNS times per scenario
and case (interleaved) while reading every process's CPU time before and
after each run, prints Markdown tables (medians) and writes
docs/benchmarks.md (keeping its `make bench-long` and `make profile`
sections). Every process it starts is stopped at the end, also on errors and
Ctrl-C.
"""

from __future__ import annotations

import os
import resource
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from scale0.m2server import Mongrel2Error

from . import doc, peers, targets, wrk
from .procs import BenchError, cpu_seconds, http_get, rss_kib
from .report import (
    DOC_PATH,
    WRK_ROLE,
    Case,
    Memory,
    Results,
    Run,
    Settings,
    cpu_table,
    machine_table,
    memory_table,
    ratio_table,
    results_table,
    runs_table,
)
from .scenarios import Scenario, start_direct, start_scale0

PAYLOADS = (("hello (19 B)", "/", b"Hello from Scale0!\n"),
            ("64 KiB", "/bytes/65536", b"x" * 65536),
            ("1 MiB", "/bytes/1048576", b"x" * 1048576))
CONNECTIONS = {"/": (1, 16, 128), "/bytes/65536": (1, 16), "/bytes/1048576": (1, 16)}
CASES = [Case(label, path, c) for label, path, _ in PAYLOADS for c in CONNECTIONS[path]]

STARTERS: dict[str, Callable[[Path], Scenario]] = {
    "direct": start_direct,
    "scale0": start_scale0,
    "scale0+relay": lambda tmp: start_scale0(tmp, relay=True),
    "scale0+relay fc-off": lambda tmp: start_scale0(tmp, relay=True, flow_control=False,
                                                    name="scale0+relay fc-off"),
    "gunicorn": peers.start_gunicorn,
    "granian": peers.start_granian,
}
PEERS = ("gunicorn", "granian")


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


def scenario_names_from_env() -> list[str]:
    raw = os.environ.get("BENCH_SCENARIOS", "").strip()
    if not raw:
        return list(STARTERS)
    names = [n.strip() for n in raw.split(",") if n.strip()]
    unknown = [n for n in names if n not in STARTERS]
    if unknown:
        raise BenchError(f"BENCH_SCENARIOS: unknown {', '.join(unknown)}; "
                         f"known: {', '.join(STARTERS)}")
    return [n for n in STARTERS if n in names]


def log(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def check_answers(scenarios: list[Scenario]) -> None:
    """Every scenario must answer each benchmarked path with the same, expected bytes."""
    for scenario in scenarios:
        for _, path, expected in PAYLOADS:
            try:
                status, body = http_get(scenario.http_port, path, timeout_s=10.0)
            except OSError as exc:
                raise BenchError(f"{scenario.name}: GET {path} failed: {exc}") from exc
            if status != 200 or body != expected:
                raise BenchError(f"{scenario.name}: GET {path} gave {status} and "
                                 f"{len(body)} bytes ({body[:40]!r}), not the expected "
                                 f"200 and {len(expected)} bytes")


def _cpu(processes: list[tuple[str, int]]) -> dict[int, float]:
    found = {}
    for _, pid in processes:
        seconds = cpu_seconds(pid)
        if seconds is not None:
            found[pid] = seconds
    return found


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def measured_run(scenario: Scenario, case: Case, settings: Settings, duration_s: int) -> Run:
    """One wrk run, with the CPU every process of the scenario (and wrk) spent in it."""
    processes = scenario.processes()
    before, wrk_before = _cpu(processes), _children_cpu()
    result = wrk.run(scenario.url(case.path), case.connections,
                     settings.threads(case.connections), duration_s)
    after, wrk_after = _cpu(processes), _children_cpu()
    scenario.check_alive()  # a crash during the run fails loudly, with the logs
    per_request: dict[str, float] = {}
    if result.requests:
        for role, pid in processes:
            if pid in before and pid in after:
                per_request[role] = (after[pid] - before[pid]) * 1e6 / result.requests
        per_request[WRK_ROLE] = (wrk_after - wrk_before) * 1e6 / result.requests
    return Run(result, per_request)


def measure(scenarios: list[Scenario], settings: Settings) -> Results:
    for scenario in scenarios:
        log(f"warming up {scenario.name} ({settings.warmup_s} s per case)")
        for case in CASES:
            measured_run(scenario, case, settings, settings.warmup_s)
    results: Results = {(case, s.name): [] for case in CASES for s in scenarios}
    total, done = settings.runs * len(CASES) * len(scenarios), 0
    for run in range(settings.runs):
        for case in CASES:
            for scenario in scenarios:
                one = measured_run(scenario, case, settings, settings.duration_s)
                results[case, scenario.name].append(one)
                done += 1
                r = one.wrk
                flag = f"  ERRORS: {r.non_2xx} non-2xx, {r.socket_errors} socket" \
                    if r.errors else ""
                server_cpu = sum(v for k, v in one.cpu_us.items() if k != WRK_ROLE)
                log(f"[{done}/{total}] run {run + 1} {scenario.name:19} {case.payload:12} "
                    f"c={case.connections:<3} {r.requests_per_s:9,.0f} req/s  "
                    f"p50 {r.p50_ms:.2f} ms  p99 {r.p99_ms:.2f} ms  "
                    f"cpu {server_cpu:,.0f} us/req{flag}")
    return results


def memory(scenarios: list[Scenario]) -> Memory:
    return [(s.name, role, pid, rss_kib(pid)) for s in scenarios for role, pid in s.processes()]


def report(results: Results, mem: Memory, settings: Settings, names: list[str],
           runtime_s: float) -> None:
    subject = targets.SUBJECT
    others = [n for n in ("granian", "gunicorn", "direct", "scale0", targets.FC_OFF)
              if n != subject]
    summary = targets.summary(results, CASES, doc.section_body(DOC_PATH, "long"))
    ratios = ratio_table(results, CASES, subject, others) if subject in names else "-"
    table = results_table(results, CASES, names)
    cpu = cpu_table(results, CASES, names)
    per_run = runs_table(results, CASES, names)
    mem_table = memory_table(mem)
    print(f"\n{summary}\n\n{ratios}\n\n{table}\n\n{cpu}\n\n{mem_table}\n")
    has_peers = any(n in names for n in PEERS)
    extra = peers.versions() if has_peers else []
    text = doc.render(machine=machine_table(extra), settings=settings,
                      cpus=str(len(os.sched_getaffinity(0))),
                      cells=settings.runs * len(CASES) * len(STARTERS),
                      no_control_socket=has_peers and peers.gunicorn_has_no_control_socket(),
                      summary=summary, ratios=ratios, results=table, cpu=cpu, runs=per_run,
                      memory=mem_table, runtime_s=runtime_s)
    doc.write(DOC_PATH, main=text)
    log(f"wrote {DOC_PATH}")


def _raise_interrupt(*_: object) -> None:
    raise KeyboardInterrupt


def main() -> int:
    started = time.monotonic()
    try:
        settings = settings_from_env()
        names = scenario_names_from_env()
        wrk.require_wrk()
        if shutil.which("mongrel2") is None or shutil.which("m2sh") is None:
            raise BenchError("mongrel2/m2sh not found: apt-get install mongrel2-core")
        if any(n in names for n in PEERS):
            peers.require_peers()
    except BenchError as exc:
        log(f"bench: {exc}")
        return 2
    signal.signal(signal.SIGTERM, _raise_interrupt)  # stop the stacks on SIGTERM too
    tmp = Path(tempfile.mkdtemp(prefix="scale0-bench-"))
    tmp.chmod(0o755)  # nginx's workers (`nobody` when run as root) write temp files below it
    scenarios: list[Scenario] = []
    keep_logs = False
    try:
        log(f"starting {', '.join(names)} in {tmp}")
        for name in names:
            scenarios.append(STARTERS[name](tmp / name.replace(" ", "-").replace("+", "-")))
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
    runtime_s = time.monotonic() - started
    report(results, mem, settings, names, runtime_s)
    log(f"total runtime {runtime_s:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
