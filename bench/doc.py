"""docs/benchmarks.md: `make bench` writes the main part; `make bench-long` and
`make profile` each write a section of their own, which a later `make bench`
keeps (and a new profile moves the last one to "previous").

A section is the text between `<!-- section NAME -->` and `<!-- end NAME -->`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from .report import Settings

SECTIONS = ("long", "profile", "profile-previous")


@dataclass(frozen=True, slots=True)
class Plan:
    """How much load the run planned: measured runs, warm-ups, seconds."""

    cells: int  # measured runs of all scenarios
    warmups: int
    load_s: int  # with this run's settings
    default_load_s: int  # with the defaults (5 s, 3 runs)
    ws_connections: int


@dataclass(frozen=True, slots=True)
class AsgiTables:
    ratios: str
    results: str
    cpu: str
    ws: str
    ws_cpu: str

HEADER = """\
# Scale0 benchmarks

> **Generated file**: `make bench` (`bench/run.py`) writes everything above the
> sections of `make bench-long` and `make profile`, which it keeps. Do not
> edit by hand; change `bench/doc.py` instead.

## Machine

{machine}

## Method

Every scenario runs on free loopback ports in a temporary folder, all started
by the bench and stopped at its end, all in the same run:

- **direct**: Mongrel2 -> `bench/direct_handler.py`, one Python process that
  is itself the Mongrel2 handler (PULL from send_spec, XPUB to recv_spec,
  drains the PULL until EAGAIN per wake-up, builds each reply itself). Nothing
  behind Mongrel2 can be faster: the ceiling. Its Mongrel2 runs with
  `download.flow_control=0`, so it sends every reply as one message (with it
  on, it keeps Mongrel2's per-connection window of 102400 bytes and sends
  bigger replies in pieces, each waiting for credits).
- Every Mongrel2 of the bench gets the glibc malloc thresholds `scale0 up`
  gives it (GLIBC_TUNABLES, scale0/deploy/malloc.py), and the direct handler
  sets them as Scale0's processes do, so the ceiling stays one. nginx,
  gunicorn and granian run as their users would run them.
- **scale0**: Mongrel2 -> `scale0 broker` -> `scale0 wsgi examples.hello:app
  --processes 2 --threads 4` (with its default `--prefetch 8`: up to 8 GETs
  may wait at each thread while every thread is busy, docs/protocol.md 4.6).
- **scale0+relay**: the same with `scale0 relay` between Mongrel2 and the
  broker: the shape `make run` starts (`scale0.toml`). Mongrel2 has
  `download.flow_control=1` in scale0 and scale0+relay, as
  `mongrel2/mongrel2.conf` has.
- **scale0+relay fc-off**: scale0+relay with Mongrel2's
  `download.flow_control=0`: the difference is what flow control costs.
- **scale0+relay no-prefetch**: scale0+relay with `--prefetch 0` (a thread
  holds only the request it runs, as before prefetch): the difference is
  what prefetch gives. Hello cases only.
- **scale0+relay-replies**: scale0+relay with the replies through the relay
  too: the broker is linked as `relay+tcp://HOST:PORT` alone and the relay
  runs with `--mongrel2-recv RECV_SPEC`, so replies go broker -> relay ->
  Mongrel2, the path of a broker on another host than Mongrel2. Hello cases
  only; its cost against scale0+relay is in the ratios table.
- **gunicorn**: nginx -> gunicorn `-w 2 -k sync{no_control_socket}`
  `examples.hello:app`.
- **granian**: nginx -> granian `--interface wsgi --workers 2 --no-ws`
  `examples.hello:app`.
- nginx (both peers): `worker_processes auto`, `daemon off`, a plain
  `proxy_pass http://127.0.0.1:PORT;` (HTTP/1.0 upstream, a new upstream
  connection per request, default buffering: a 1 MiB reply goes through a
  temp file), `keepalive_requests 1000000`, default access log (to the temp
  folder; Mongrel2 keeps its access log too).

Mongrel2 config for the Mongrel2 scenarios: `tests/mongrel2_helpers.py` (`config_text`)
(tnetstring protocol, access log on). Every scenario serves the same app
bytes, checked before measuring: `GET /` is the 19-byte `Hello from
Scale0!\\n`, `GET /bytes/65536` 64 KiB, `GET /bytes/1048576` 1 MiB, with
Content-Length, HTTP/1.1 keep-alive from the client.

- Load: `wrk -t{{T}} -c{{C}} -d{duration}s --timeout=2s --latency URL` with
  T = min({threads}, C) (`BENCH_WRK_THREADS`). wrk shares the {cpus} CPUs with
  what it measures, so from 16 connections on every scenario is CPU-bound and
  its req/s is the inverse of the CPU all its processes spend per request.
- Warm-up: {warmup} s of the same load per scenario and case, discarded.
- Then {runs} runs of {duration} s per scenario and case, interleaved (run 1
  of every case and scenario, then run 2, ...) so that drift hits all
  alike. Tables give **medians** over the runs (each column's median taken
  on its own).
- Errors: wrk's `Non-2xx or 3xx responses` plus `Socket errors`, summed over
  the runs; anything non-zero shows in bold with its run numbers.
- **CPU per request**: utime+stime from `/proc/PID/stat` of every process of
  the scenario (each started process and everything it forked: nginx master
  and workers, gunicorn arbiter and workers, granian's processes, Mongrel2,
  relay, broker, pool supervisor and each pool worker), read just before and
  just after each measured run, the difference divided by the requests wrk
  counted in that run; median over runs. `wrk (client)` is wrk's own CPU
  (`getrusage` of the finished child). Resolution: one clock tick (10 ms) per
  run, divided by its requests.
- Memory: VmRSS from `/proc/PID/status` of every process, after the runs.
- Knobs: `BENCH_DURATION` (seconds per run, default 5), `BENCH_RUNS`
  (default 3), `BENCH_WRK_THREADS` (default 2), `BENCH_SCENARIOS` (a
  comma-separated subset of the scenario names). With these settings and
  all scenarios: {cells} measured runs of {duration} s and {warmups}
  warm-ups, about {planned} min of load plus start-up and sampling (the
  defaults, 5 s and 3 runs: {default_load_s} s of load; `make bench` prints
  its plan when it starts).

ASGI scenarios (own section below), all serving `examples/asgi_hello.py`, a
plain ASGI app (`GET /` is the same 19 bytes, a WebSocket on `/ws` echoes each
message), hello cases only plus one WebSocket echo case:

- **scale0 asgi**: Mongrel2 -> `scale0 relay` -> `scale0 broker` -> `scale0
  asgi examples.asgi_hello:app --processes 2 --concurrency 100`
  (`download.flow_control=1`).
- **uvicorn**: nginx -> `uvicorn --workers 2 --no-access-log --ws websockets`.
- **granian asgi**: nginx -> `granian --interface asgi --workers 2`.
- Both peers sit behind nginx like the WSGI peers (as scale0 sits behind
  Mongrel2); their nginx has a `location /ws` passing the WebSocket upgrade
  through (`proxy_http_version 1.1`, `Upgrade`/`Connection` headers).
- **WebSocket echo**: `bench/ws_echo.py` (the `websockets` library, asyncio,
  one process): {ws_connections} connections, each sending a 23-byte text
  message and awaiting its echo, then the next, for {duration} s. Messages/s
  counts echoes equal to what was sent; p50/p99 are of the round trips; a
  wrong echo or a dropped connection is an error. CPU per message is counted
  like CPU per request (the client's own CPU as `wrk (client)`). Every server
  is checked to echo before measuring.

Absolute numbers move between machines and between runs; the **ratios within
one run** are what count.
"""


def render(*, machine: str, settings: Settings, cpus: str, plan: Plan,
           no_control_socket: bool, summary: str, ratios: str, results: str, cpu: str,
           runs: str, memory: str, runtime_s: float, asgi: AsgiTables) -> str:
    header = HEADER.format(machine=machine, threads=settings.wrk_threads,
                           duration=settings.duration_s, warmup=settings.warmup_s,
                           runs=settings.runs, cpus=cpus, cells=plan.cells,
                           warmups=plan.warmups, planned=f"{plan.load_s / 60:.0f}",
                           default_load_s=plan.default_load_s,
                           ws_connections=plan.ws_connections,
                           no_control_socket=" --no-control-socket" if no_control_socket else "")
    return (f"{header}\n## Results\n\nThis run took {runtime_s / 60:.1f} min in all.\n\n"
            f"### Targets of issue 9, judged on this run\n\n{summary}\n\n"
            f"### Ratios: scale0+relay's req/s against each\n\n{ratios}\n\n"
            f"### Throughput, latency, errors\n\n{results}\n\n"
            f"### CPU µs per request, every process (median over runs)\n\n{cpu}\n\n"
            f"## ASGI\n\n### Ratios: scale0 asgi's req/s (msg/s) against each\n\n"
            f"{asgi.ratios}\n\n### ASGI: throughput, latency, errors\n\n{asgi.results}\n\n"
            f"### ASGI: CPU µs per request, every process\n\n{asgi.cpu}\n\n"
            f"### WebSocket echo\n\n{asgi.ws}\n\n"
            f"### WebSocket echo: CPU µs per message, every process\n\n{asgi.ws_cpu}\n\n"
            f"### Requests/s of each run (outliers show here)\n\n{runs}\n\n"
            f"### Memory (RSS after the runs)\n\n{memory}\n")


def _pattern(name: str) -> re.Pattern[str]:
    return re.compile(rf"<!-- section {re.escape(name)} -->\n.*?<!-- end {re.escape(name)} -->\n",
                      re.S)


def sections(text: str) -> dict[str, str]:
    """The kept sections of a benchmarks.md, by name (markers included)."""
    found = {}
    for name in SECTIONS:
        match = _pattern(name).search(text)
        if match:
            found[name] = match.group(0)
    return found


def section(name: str, body: str) -> str:
    return f"<!-- section {name} -->\n{body.rstrip()}\n<!-- end {name} -->\n"


def _main_part(text: str) -> str:
    start = text.find("<!-- section ")
    return text if start < 0 else text[:start]


def merge(old: str, main: str | None = None, updates: dict[str, str] | None = None) -> str:
    """`main` (or the old main part) followed by the sections, old ones kept
    unless `updates` replaces them (body text, without markers)."""
    kept = sections(old)
    for name, body in (updates or {}).items():
        kept[name] = section(name, body)
    text = (main if main is not None else _main_part(old)).rstrip() + "\n"
    for name in SECTIONS:
        if name in kept:
            text += "\n" + kept[name]
    return text


def write(path: Path, main: str | None = None, updates: dict[str, str] | None = None) -> None:
    old = path.read_text() if path.exists() else ""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(merge(old, main, updates))


def section_body(path: Path, name: str) -> str | None:
    """The body of section `name` in the file at `path`, without markers."""
    if not path.exists():
        return None
    found = sections(path.read_text()).get(name)
    if found is None:
        return None
    return found.split("\n", 1)[1].rsplit("<!-- end ", 1)[0].rstrip()
