"""docs/benchmarks.md: written whole on every `make bench` run."""

from __future__ import annotations

from .report import Settings

ANCHOR_DIRECT_C1 = 5001  # /work/shared/BENCH-ANCHORS.md, c=1

HEADER = """\
# Scale0 benchmarks

> **Generated file**: `make bench` (`bench/run.py`) overwrites it completely on
> every run. Do not edit by hand; change `bench/doc.py` instead.

## Machine

{machine}

## Method

Two stacks are measured in the same run, each with its own Mongrel2 on free
loopback ports in a temporary folder (config from
`scale0.m2server.config_text`: tnetstring protocol,
`download.flow_control=1`, access log on, as in `mongrel2/mongrel2.conf`):

- **direct**: Mongrel2 -> `bench/direct_handler.py`, one Python process that
  is itself the Mongrel2 handler (PULL from send_spec, XPUB to recv_spec after
  the subscription arrived, drains the PULL until EAGAIN per wake-up, builds
  each reply itself with `scale0.mongrel2.parse_message`/`reply`). Nothing
  behind Mongrel2 can be faster: this is the ceiling.
- **scale0**: Mongrel2 -> `scale0 broker` -> `scale0 wsgi examples.hello:app
  --processes 2 --threads 4` (one broker, one pool, flow control on).
- **scale0+relay**: the same with `scale0 relay` between Mongrel2 and the
  broker: the shape of the hello stack in `scale0.toml`. The difference to
  **scale0** is the relay's cost.

All give the same bytes (checked before measuring): `GET /` is the 19-byte
`Hello from Scale0!\\n`, `GET /bytes/65536` is 64 KiB; HTTP/1.1 keep-alive with
Content-Length. 64 KiB fits in Mongrel2's initial download credits (102400
bytes per request), so the direct handler sends it as one message.

- Load: `wrk -t1 -c1 -d{duration}s --timeout=2s --latency URL` and the same
  with `-t{threads} -c64` (wrk threads = min(`BENCH_WRK_THREADS`, connections)).
  wrk, Mongrel2 and the Python processes share the {cpus} CPUs, so more wrk
  threads than cores would only take CPU from the servers under test. A check
  at c=64 on this machine gave `-t1` and `-t2` equal within noise for hello,
  and `-t2` up to ~10 % more for direct 64 KiB, where one wrk thread reading
  ~450 MB/s starts to limit the ceiling; hence 2 threads at c=64. (The anchor
  figures used `-t1` throughout; at c=1 it is the same here.)
- Warm-up: {warmup} s of the same load per scenario and case, discarded.
- Then {runs} runs of {duration} s per scenario and case, interleaved (run 1
  of every case and scenario, then run 2, ...) so that drift hits both
  stacks alike. Tables give the **median** of requests/s, of p50 and of p99
  (each median taken on its own), from wrk's `Requests/sec` and `Latency
  Distribution` lines.
- Errors: wrk's `Non-2xx or 3xx responses` plus `Socket errors`
  (connect + read + write + timeout), summed over the runs; anything
  non-zero shows in bold with its run numbers.
- Memory: VmRSS from `/proc/PID/status` of every process, after the runs.
- Knobs: `BENCH_DURATION` (seconds per run, default 5), `BENCH_RUNS`
  (default 3), `BENCH_WRK_THREADS` (default 2).

## How to read it

Absolute numbers move between machines and between runs (wrk shares the
CPUs with what it measures); the **ratios within one run** are what count.
Reference figures from `/work/shared/BENCH-ANCHORS.md` (same kind of 2-vCPU
machine, `wrk -t1`, 13-byte hello, medians of 3 runs): Mongrel2 + one pyzmq
handler answering directly did **5001 req/s at c=1** (p50 192 µs, p99 569 µs;
34577 at c=16); Mongrel2 -> a **bare forwarding broker** (ROUTER/DEALER) -> 1
worker did **2677-2940 req/s at c=1** (0.54-0.59x of direct; ~21000 at c=16,
0.61x); **nginx -> gunicorn** (2 sync workers) did **2894 req/s at c=1**
(0.58x) and **~5559 at c=16** (0.16x). So a scale0/direct ratio near 0.55 at
c=1 means the broker + WSGI worker cost about what a bare forwarding hop
costs; under load (c=64 here, every scenario CPU-bound) the ratio shows how
much CPU per request Scale0's broker and worker add on top of Mongrel2. To
set this machine against the anchor machine, compare the direct c=1 hello
figure below with 5001.
"""


def render(*, machine: str, settings: Settings, cpus: str, results: str, runs: str,
           memory: str, summary: str) -> str:
    header = HEADER.format(machine=machine, threads=settings.wrk_threads,
                           duration=settings.duration_s, warmup=settings.warmup_s,
                           runs=settings.runs, cpus=cpus)
    return (f"{header}\n## Results\n\n{summary}\n\n{results}\n\n"
            f"Requests/s of each run (outliers show here):\n\n{runs}\n\n"
            f"### Memory (RSS after the runs)\n\n{memory}\n")


def summary(direct_c1: float, ratio_c1: float, ratio_c64: float) -> str:
    return (f"This run: direct, hello, c=1 = {direct_c1:,.0f} req/s "
            f"({direct_c1 / ANCHOR_DIRECT_C1:.2f}x the anchor's {ANCHOR_DIRECT_C1}). "
            f"scale0/direct, hello: {ratio_c1:.2f}x at c=1 (anchors at c=1: bare forwarding "
            f"broker 0.54-0.59x, nginx -> gunicorn 0.58x), {ratio_c64:.2f}x at c=64.")
