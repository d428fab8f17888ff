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
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from scale0.deploy.m2server import Mongrel2Error

from . import doc, peers, targets, wrk, ws_echo
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
from .wrk import WrkResult

REPLIES, ASGI, NO_PREFETCH = targets.REPLIES, targets.ASGI, targets.NO_PREFETCH

PAYLOADS = (("hello (19 B)", "/", b"Hello from Scale0!\n"),
            ("64 KiB", "/bytes/65536", b"x" * 65536),
            ("1 MiB", "/bytes/1048576", b"x" * 1048576))
CONNECTIONS = {"/": (1, 16, 128), "/bytes/65536": (1, 16), "/bytes/1048576": (1, 16)}
CASES = [Case(label, path, c) for label, path, _ in PAYLOADS for c in CONNECTIONS[path]]
HELLO_CASES = [c for c in CASES if c.path == "/"]
WS_CONNECTIONS = 16
WS_CASES = [Case(f"ws echo ({len(ws_echo.MESSAGE)} B)", "/ws", WS_CONNECTIONS)]

STARTERS: dict[str, Callable[[Path], Scenario]] = {
    "direct": start_direct,
    "scale0": start_scale0,
    "scale0+relay": lambda tmp: start_scale0(tmp, relay=True),
    "scale0+relay fc-off": lambda tmp: start_scale0(tmp, relay=True, flow_control=False,
                                                    name="scale0+relay fc-off"),
    REPLIES: lambda tmp: start_scale0(tmp, relay=True, replies=True, name=REPLIES),
    NO_PREFETCH: lambda tmp: start_scale0(tmp, relay=True, prefetch=0, name=NO_PREFETCH),
    "gunicorn": peers.start_gunicorn,
    "granian": peers.start_granian,
    ASGI: lambda tmp: start_scale0(tmp, relay=True, asgi=True, name=ASGI),
    "uvicorn": peers.start_uvicorn,
    "granian asgi": peers.start_granian_asgi,
}
PEERS = ("gunicorn", "granian")
ASGI_NAMES = (ASGI, "uvicorn", "granian asgi")
# The HTTP cases each scenario runs: replies-through-the-relay and the ASGI
# servers only the hello ones (the cost of the path shows there; it keeps
# `make bench` short). The ASGI servers also run WS_CASES.
CASES_OF: dict[str, list[Case]] = {n: HELLO_CASES if n in (REPLIES, NO_PREFETCH) or n in ASGI_NAMES
                                   else CASES for n in STARTERS}


def cases_of(name: str) -> list[Case]:
    return CASES_OF[name]


def ws_cases_of(name: str) -> list[Case]:
    return WS_CASES if name in ASGI_NAMES else []


def planned_load_s(names: list[str], settings: Settings) -> int:
    """Seconds of load (measured runs and warm-ups) the scenarios `names` will take."""
    cells = sum(len(cases_of(n)) + len(ws_cases_of(n)) for n in names)
    return cells * (settings.runs * settings.duration_s + settings.warmup_s)


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    if not raw.isdigit() or int(raw) < 1:
        raise BenchError(f"{name} must be a whole number >= 1, got {raw!r}")
    return int(raw)


DEFAULTS = Settings(duration_s=5, runs=3, wrk_threads=2)


def settings_from_env() -> Settings:
    return Settings(duration_s=_env_int("BENCH_DURATION", DEFAULTS.duration_s),
                    runs=_env_int("BENCH_RUNS", DEFAULTS.runs),
                    wrk_threads=_env_int("BENCH_WRK_THREADS", DEFAULTS.wrk_threads))


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
        paths = {c.path for c in cases_of(scenario.name)}
        for _, path, expected in PAYLOADS:
            if path not in paths:
                continue
            try:
                status, body = http_get(scenario.http_port, path, timeout_s=10.0)
            except OSError as exc:
                raise BenchError(f"{scenario.name}: GET {path} failed: {exc}") from exc
            if status != 200 or body != expected:
                raise BenchError(f"{scenario.name}: GET {path} gave {status} and "
                                 f"{len(body)} bytes ({body[:40]!r}), not the expected "
                                 f"200 and {len(expected)} bytes")
        for case in ws_cases_of(scenario.name):
            ws_echo.check(scenario.ws_url(case.path))


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


def ws_run(url: str, connections: int, duration_s: int) -> WrkResult:
    """One bench.ws_echo run in a child process (its CPU is the client's, like
    wrk's), as a WrkResult: messages for requests, echo errors as socket errors."""
    cmd = [sys.executable, "-m", "bench.ws_echo", url, "--connections", str(connections),
           "--duration", str(duration_s)]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=duration_s + 30,
                              cwd=Path(__file__).resolve().parents[1])
    except subprocess.TimeoutExpired as exc:
        raise BenchError(f"bench.ws_echo did not finish: {' '.join(cmd)}") from exc
    if done.returncode != 0:
        raise BenchError(f"{' '.join(cmd)} exited with {done.returncode}:\n{done.stderr}")
    echo = ws_echo.parse(done.stdout)
    return WrkResult(requests_per_s=echo.messages_per_s, p50_ms=echo.p50_ms,
                     p99_ms=echo.p99_ms, requests=echo.messages, non_2xx=0,
                     socket_errors=echo.errors)


def measured_run(scenario: Scenario, case: Case, settings: Settings, duration_s: int) -> Run:
    """One wrk run, with the CPU every process of the scenario (and wrk) spent in it."""
    processes = scenario.processes()
    before, wrk_before = _cpu(processes), _children_cpu()
    if case.path in {c.path for c in WS_CASES}:
        result = ws_run(scenario.ws_url(case.path), case.connections, duration_s)
    else:
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
        for case in [*cases_of(scenario.name), *ws_cases_of(scenario.name)]:
            measured_run(scenario, case, settings, settings.warmup_s)
    all_cases = [*CASES, *WS_CASES]
    results: Results = {(case, s.name): [] for s in scenarios
                        for case in [*cases_of(s.name), *ws_cases_of(s.name)]}
    total, done = settings.runs * len(results), 0
    for run in range(settings.runs):
        for case in all_cases:
            for scenario in scenarios:
                if (case, scenario.name) not in results:
                    continue
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
    others = [n for n in ("granian", "gunicorn", "direct", "scale0", targets.FC_OFF, REPLIES,
                          NO_PREFETCH) if n != subject]
    wsgi_names = [n for n in names if n not in ASGI_NAMES]
    asgi_names = [n for n in names if n in ASGI_NAMES]
    summary = targets.summary(results, CASES, doc.section_body(DOC_PATH, "long"))
    ratios = ratio_table(results, CASES, subject, others) if subject in names else "-"
    table = results_table(results, CASES, wsgi_names)
    cpu = cpu_table(results, CASES, wsgi_names)
    asgi_others = [n for n in ASGI_NAMES if n != ASGI]
    asgi = doc.AsgiTables(
        ratios=ratio_table(results, [*HELLO_CASES, *WS_CASES], ASGI, asgi_others)
        if ASGI in names else "-",
        results=results_table(results, HELLO_CASES, asgi_names) if asgi_names else "-",
        cpu=cpu_table(results, HELLO_CASES, asgi_names) if asgi_names else "-",
        ws=results_table(results, WS_CASES, asgi_names, unit="msg") if asgi_names else "-",
        ws_cpu=cpu_table(results, WS_CASES, asgi_names) if asgi_names else "-")
    per_run = runs_table(results, [*CASES, *WS_CASES], names)
    mem_table = memory_table(mem)
    print(f"\n{summary}\n\n{ratios}\n\n{table}\n\n{cpu}\n\n{asgi.ratios}\n\n"
          f"{asgi.results}\n\n{asgi.ws}\n\n{mem_table}\n")
    has_peers = any(n in names for n in (*PEERS, *asgi_others))
    extra = peers.versions() if has_peers else []
    text = doc.render(machine=machine_table(extra), settings=settings,
                      cpus=str(len(os.sched_getaffinity(0))),
                      plan=doc.Plan(cells=settings.runs * len(results_cells(list(STARTERS))),
                                    warmups=len(results_cells(list(STARTERS))),
                                    load_s=planned_load_s(list(STARTERS), settings),
                                    default_load_s=planned_load_s(list(STARTERS), DEFAULTS),
                                    ws_connections=WS_CONNECTIONS),
                      no_control_socket=has_peers and peers.gunicorn_has_no_control_socket(),
                      summary=summary, ratios=ratios, results=table, cpu=cpu, runs=per_run,
                      memory=mem_table, runtime_s=runtime_s, asgi=asgi)
    doc.write(DOC_PATH, main=text)
    log(f"wrote {DOC_PATH}")


def results_cells(names: list[str]) -> list[tuple[Case, str]]:
    """Every (case, scenario) the scenarios `names` measure."""
    return [(c, n) for n in names for c in [*cases_of(n), *ws_cases_of(n)]]


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
        if any(n in names for n in ASGI_NAMES if n != ASGI):
            peers.require_asgi_peers()
    except BenchError as exc:
        log(f"bench: {exc}")
        return 2
    signal.signal(signal.SIGTERM, _raise_interrupt)  # stop the stacks on SIGTERM too
    tmp = Path(tempfile.mkdtemp(prefix="scale0-bench-"))
    tmp.chmod(0o755)  # nginx's workers (`nobody` when run as root) write temp files below it
    scenarios: list[Scenario] = []
    keep_logs = False
    try:
        load_s = planned_load_s(names, settings)
        log(f"planned: {len(results_cells(names))} scenario/case cells x {settings.runs} runs "
            f"of {settings.duration_s} s + {settings.warmup_s} s warm-up each = {load_s} s "
            f"of load (~{load_s / 60:.1f} min), plus start-up and sampling")
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
