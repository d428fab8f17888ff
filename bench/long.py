"""`make bench-long`: memory over 1,000,000 requests and 10,000 open connections.

Both checks run against the shape `make run` starts (Mongrel2 -> relay ->
broker -> `scale0 wsgi` 2 x 4, download.flow_control on, superpoll.max_fd as
in mongrel2/mongrel2.conf), on free loopback ports in a temp folder:

1. Soak: wrk (hello, keep-alive) in segments until BENCH_LONG_REQUESTS
   requests are answered; RSS of every process is read before the load and
   after each segment. Flat = the largest sample after the first segment is
   within 10 % of that first one (the first segment warms up caches, pools
   and allocator arenas).
2. Connections: BENCH_LONG_CONNECTIONS keep-alive connections opened through
   Mongrel2 and held open (bench.conns), one request on each, then a second
   one on each; RSS and Mongrel2's open descriptors with all of them open.

The results go into docs/benchmarks.md, section "long" (kept by `make bench`).
"""

from __future__ import annotations

import os
import shutil
import signal
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from scale0.deploy.m2server import Mongrel2Error, raise_open_files_limit

from . import conns, doc, targets, wrk
from .procs import BenchError, rss_kib, wait_until
from .report import DOC_PATH, machine_table
from .run import _env_int, _raise_interrupt, check_answers, log
from .scenarios import Scenario, start_scale0

# The targets summary's lines about the long check (bench/targets.py `memory`).
MEMORY_LINE_PREFIXES = ("- (last `make bench-long`", "- Memory (RSS flat over")

M2_SETTINGS = {"superpoll.max_fd": 32768}  # as mongrel2/mongrel2.conf
FLAT_WITHIN = 0.10
WATCHED = ("mongrel2", "relay", "broker")
HELLO = b"Hello from Scale0!\n"


@dataclass(slots=True)
class Soak:
    target: int
    connections: int
    segment_s: int
    requests: int = 0
    errors: int = 0
    seconds: float = 0.0
    samples: list[tuple[int, dict[str, int | None]]] = field(default_factory=list)


def rss_by_role(scenario: Scenario) -> dict[str, int | None]:
    return {role: rss_kib(pid) for role, pid in scenario.processes()}


def soak(scenario: Scenario, target: int, connections: int, segment_s: int) -> Soak:
    result = Soak(target, connections, segment_s)
    result.samples.append((0, rss_by_role(scenario)))
    started = time.monotonic()
    while result.requests < target:
        run = wrk.run(scenario.url("/"), connections, min(2, connections), segment_s)
        scenario.check_alive()
        result.requests += run.requests
        result.errors += run.errors
        result.samples.append((result.requests, rss_by_role(scenario)))
        log(f"soak: {result.requests:,} requests ({run.requests_per_s:,.0f} req/s, "
            f"{run.errors} errors); RSS " + ", ".join(
                f"{r} {kib / 1024:.1f} MiB" for r, kib in result.samples[-1][1].items()
                if r in WATCHED and kib is not None))
        if run.requests == 0:
            raise BenchError("soak: a wrk segment got no replies")
    result.seconds = time.monotonic() - started
    return result


def _mib(kib: int | None) -> str:
    return "-" if kib is None else f"{kib / 1024:.1f}"


def soak_table(result: Soak) -> tuple[str, list[str]]:
    """The per-process table, and a met/missed line per watched process."""
    roles = list(result.samples[-1][1])
    lines = ["| process | before load | after first segment | last | max after first "
             "| last / first | max / first |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    verdicts = []
    for role in roles:
        values = [s[1].get(role) for s in result.samples]
        before, after = values[0], values[1:]
        known = [v for v in after if v is not None]
        if not known:
            continue
        first, last, top = known[0], known[-1], max(known)
        lines.append(f"| {role} | {_mib(before)} | {_mib(first)} | {_mib(last)} | {_mib(top)} "
                     f"| {last / first:.3f} | {top / first:.3f} |")
        if role in ("relay", "broker"):
            ok = top / first - 1 <= FLAT_WITHIN
            verdicts.append(f"- {'**met**' if ok else '**missed**'}: {role} RSS flat within "
                            f"{FLAT_WITHIN:.0%} over {result.requests:,} requests: first "
                            f"{_mib(first)} MiB, last {_mib(last)} MiB, max {_mib(top)} MiB "
                            f"({top / first - 1:+.1%}).")
    return "\n".join(lines), verdicts


def _open_fds(pid: int) -> int | None:
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return None


def hold_connections(scenario: Scenario, count: int) -> tuple[conns.HoldResult, str]:
    mongrel2 = next(p.pid for p in scenario.procs if p.name == "mongrel2")
    snapshots: list[tuple[str, dict[str, int | None], int | None]] = [
        ("idle, before", rss_by_role(scenario), _open_fds(mongrel2))]

    def while_open(when: str) -> None:
        snapshots.append((f"{count:,} open, {when}", rss_by_role(scenario), _open_fds(mongrel2)))
        log(f"connections: {when}: Mongrel2 has {snapshots[-1][2]} descriptors open")

    result = conns.hold("127.0.0.1", scenario.http_port, count, "/", HELLO, while_open)
    scenario.check_alive()
    idle_fds = snapshots[0][2] or 0
    try:  # Mongrel2 closes its side as the client's FINs arrive: wait, bounded
        wait_until(lambda: (_open_fds(mongrel2) or 0) <= idle_fds + 10, 60.0,
                   "Mongrel2 to close them")
    except BenchError as exc:
        log(f"connections: {exc}")
    snapshots.append(("after closing them all", rss_by_role(scenario), _open_fds(mongrel2)))
    roles = [r for r in snapshots[0][1] if r in WATCHED or r.startswith("pool worker")]
    lines = ["| when | Mongrel2 open fds | " + " | ".join(f"{r} RSS MiB" for r in roles) + " |",
             "|---|---:|" + "---:|" * len(roles)]
    for when, rss, fds in snapshots:
        lines.append(f"| {when} | {fds if fds is not None else '-'} | "
                     + " | ".join(_mib(rss.get(r)) for r in roles) + " |")
    return result, "\n".join(lines)


def connections_text(result: conns.HoldResult, table: str, nofile: int) -> str:
    failures = ", ".join(f"{k}: {v}" for k, v in result.failures.most_common()) or "none"
    ok = result.opened == result.wanted and result.second_ok == result.wanted
    return (f"- {'**met**' if ok else '**missed**'}: {result.wanted:,} concurrent keep-alive "
            f"connections held open through Mongrel2: {result.opened:,} opened, "
            f"{result.first_ok:,} answered on the first request "
            f"({result.open_s:.1f} s to open them all), {result.second_ok:,} on the second "
            f"with all open ({result.second_s:.1f} s). Failures: {failures}. The bench's own "
            f"open-files limit: {nofile}.\n\n{table}")


def render(soak_result: Soak, soak_rows: str, verdicts: list[str], conns_text: str,
           runtime_s: float) -> str:
    return f"""\
## Long checks (`make bench-long`)

Written by `make bench-long` (`bench/long.py`); `make bench` keeps this
section. The shape `make run` starts: Mongrel2 (download.flow_control=1,
superpoll.max_fd={M2_SETTINGS["superpoll.max_fd"]}) -> relay -> broker ->
`scale0 wsgi examples.hello:app` 2 processes x 4 threads, on loopback. This
run took {runtime_s / 60:.1f} min.

{machine_table()}

### Memory over {soak_result.requests:,} requests

wrk `-c{soak_result.connections}` on `GET /` (keep-alive) in segments of
{soak_result.segment_s} s until {soak_result.target:,} requests were answered
({soak_result.seconds:.0f} s, {soak_result.requests / soak_result.seconds:,.0f} req/s,
{soak_result.errors} errors); VmRSS of every process read before the load and
after each of the {len(soak_result.samples) - 1} segments. "first" is the
sample after the first segment (warm), "max" the largest after it.
Knobs: `BENCH_LONG_REQUESTS`, `BENCH_LONG_SEGMENT`, `BENCH_LONG_WRK_CONNECTIONS`.

{chr(10).join(verdicts)}

{soak_rows}

### Concurrent keep-alive connections

`bench/conns.py` (asyncio) opens the connections (100 connecting at a time:
Mongrel2 listens with a backlog of 128), sends `GET /` on each and reads the
reply, keeps them all open, then sends a second request on each (1000 in
flight at a time). Knob: `BENCH_LONG_CONNECTIONS`. What lets Mongrel2 hold
them: `superpoll.max_fd` (Mongrel2's default, 10240, is one descriptor per
connection plus its own; as root Mongrel2 sets its open-files limit to it)
and, for a Mongrel2 not run as root, the soft open-files limit it inherits:
`scale0 up` raises it to the hard limit.

{conns_text}
"""


def main() -> int:
    started = time.monotonic()
    try:
        target = _env_int("BENCH_LONG_REQUESTS", 1_000_000)
        segment_s = _env_int("BENCH_LONG_SEGMENT", 10)
        wrk_c = _env_int("BENCH_LONG_WRK_CONNECTIONS", 16)
        count = _env_int("BENCH_LONG_CONNECTIONS", 10_000)
        wrk.require_wrk()
        if shutil.which("mongrel2") is None or shutil.which("m2sh") is None:
            raise BenchError("mongrel2/m2sh not found: apt-get install mongrel2-core")
    except BenchError as exc:
        log(f"bench-long: {exc}")
        return 2
    nofile = raise_open_files_limit()  # the client's connections, and Mongrel2's (inherited)
    if nofile < count + 100:
        log(f"bench-long: the open-files limit is {nofile}, below {count} connections; "
            f"raise it (ulimit -Hn) or set BENCH_LONG_CONNECTIONS")
        return 2
    signal.signal(signal.SIGTERM, _raise_interrupt)
    tmp = Path(tempfile.mkdtemp(prefix="scale0-bench-long-"))
    scenario: Scenario | None = None
    keep_logs = False
    try:
        scenario = start_scale0(tmp / "long", relay=True, m2_settings=M2_SETTINGS)
        check_answers([scenario])
        log(f"soak: {target:,} requests at c={wrk_c}")
        soak_result = soak(scenario, target, wrk_c, segment_s)
        soak_rows, verdicts = soak_table(soak_result)
        log(f"connections: holding {count:,}")
        held, table = hold_connections(scenario, count)
        conns_text = connections_text(held, table, nofile)
    except (BenchError, Mongrel2Error) as exc:
        log(f"bench-long: FAILED: {exc}")
        keep_logs = True
        return 1
    except KeyboardInterrupt:
        log("bench-long: interrupted")
        return 130
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        if scenario is not None:
            scenario.stop()
        signal.signal(signal.SIGINT, signal.default_int_handler)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        if keep_logs:
            log(f"bench-long: logs kept in {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    runtime_s = time.monotonic() - started
    text = render(soak_result, soak_rows, verdicts, conns_text, runtime_s)
    print(text)
    doc.write(DOC_PATH, updates={"long": text})
    log(f"wrote section 'long' of {DOC_PATH}")
    if refresh_verdicts(DOC_PATH):
        log("and its verdicts in the targets summary above it")
    return 0


def refresh_verdicts(path: Path) -> bool:
    """Put this run's verdicts into the targets summary `make bench` wrote
    (its lines quoting the last `make bench-long`), so that the summary never
    quotes an older long check than the one below it. Whether it did."""
    text = path.read_text()
    old = [line for line in text.splitlines()
           if line.startswith(MEMORY_LINE_PREFIXES)]
    new = targets.memory(doc.section_body(path, "long"))
    if not old:
        return False
    first = text.index(old[0])
    end = text.index(old[-1]) + len(old[-1])
    path.write_text(text[:first] + "\n".join(new) + text[end:])
    return True


if __name__ == "__main__":
    sys.exit(main())
