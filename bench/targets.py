"""Issue 9's targets, judged from the numbers of one `make bench` run (never hard-coded).

Each line says met or missed and gives the figures it was judged on. A target
whose scenarios or cases were not measured in this run says so instead.
"""

from __future__ import annotations

import math
from collections.abc import Callable

from .report import Case, Results, cpu_us, p50_ms, rps

SUBJECT = "scale0+relay"  # the shape `make run` starts, flow control on
FC_OFF = "scale0+relay fc-off"
REPLIES = "scale0+relay-replies"  # replies broker -> relay -> Mongrel2 (issue 12)
NO_PREFETCH = "scale0+relay no-prefetch"  # the workers with --prefetch 0
ASGI = "scale0 asgi"  # Mongrel2 -> relay -> broker -> scale0 asgi (issue 13)
DIRECT, GRANIAN, GUNICORN = "direct", "granian", "gunicorn"

HELLO, KIB64, MIB1 = "/", "/bytes/65536", "/bytes/1048576"
MIN_VS_GRANIAN, MIN_VS_GUNICORN = 1.2, 3.0
MAX_P50_OVER_DIRECT_US = 150.0
BUDGET_US = {"broker": 25.0, "relay": 10.0, "WSGI workers": 40.0}
MAX_FLOW_CONTROL_COST = 0.10
# What nothing behind Mongrel2 can beat, said next to the targets it bounds.
CEILING = "the direct handler (Mongrel2 and one Python process, no Scale0), the ceiling"


def _verdict(ok: bool) -> str:
    return "**met**" if ok else "**missed**"


def _find(cases: list[Case], path: str, connections: int) -> Case | None:
    return next((c for c in cases if c.path == path and c.connections == connections), None)


def _have(results: Results, case: Case | None, *names: str) -> bool:
    return case is not None and all((case, n) in results for n in names)


def _role_match(label: str) -> Callable[[str], bool]:
    if label == "WSGI workers":
        return lambda role: role.startswith("pool worker")
    return label.__eq__


def throughput(results: Results, cases: list[Case]) -> str:
    parts, ok, seen = [], True, False
    for c in (16, 128):
        case = _find(cases, HELLO, c)
        if case is None or not _have(results, case, SUBJECT, GRANIAN, GUNICORN):
            continue
        seen = True
        mine = rps(results, case, SUBJECT)
        vs_granian = mine / rps(results, case, GRANIAN)
        vs_gunicorn = mine / rps(results, case, GUNICORN)
        ok = ok and vs_granian >= MIN_VS_GRANIAN and vs_gunicorn >= MIN_VS_GUNICORN
        parts.append(f"c={c}: {mine:,.0f} req/s = {vs_granian:.2f}x granian, "
                     f"{vs_gunicorn:.2f}x gunicorn")
    target = (f"hello, {SUBJECT} >= {MIN_VS_GRANIAN}x nginx -> granian and "
              f">= {MIN_VS_GUNICORN:.0f}x nginx -> gunicorn at c=16 and c=128")
    if not seen:
        return f"- {target}: not measured in this run"
    return f"- {_verdict(ok)}: {target}. " + "; ".join(parts) + "."


def latency_c1(results: Results, cases: list[Case]) -> str:
    case = _find(cases, HELLO, 1)
    target = (f"hello, c=1: {SUBJECT} p50 within {MAX_P50_OVER_DIRECT_US:.0f} µs of direct's "
              "and req/s >= granian's")
    if case is None or not _have(results, case, SUBJECT, DIRECT, GRANIAN):
        return f"- {target}: not measured in this run"
    mine, direct = p50_ms(results, case, SUBJECT) * 1000, p50_ms(results, case, DIRECT) * 1000
    over = mine - direct
    my_rps, granian_rps = rps(results, case, SUBJECT), rps(results, case, GRANIAN)
    ok = over <= MAX_P50_OVER_DIRECT_US and my_rps >= granian_rps
    direct_rps = rps(results, case, DIRECT)
    return (f"- {_verdict(ok)}: {target}. p50 {mine:.0f} µs vs {direct:.0f} µs "
            f"({over:+.0f} µs); {my_rps:,.0f} vs {granian_rps:,.0f} req/s "
            f"({my_rps / granian_rps:.2f}x). For comparison, {CEILING}: {direct_rps:,.0f} req/s "
            f"({direct_rps / granian_rps:.2f}x granian).")


def cpu_budget(results: Results, cases: list[Case], connections: int = 16) -> str:
    case = _find(cases, HELLO, connections)
    limits = ", ".join(f"{k} <= {v:.0f}" for k, v in BUDGET_US.items())
    target = f"CPU per request, hello c={connections}, {SUBJECT}: {limits} µs"
    if case is None or not _have(results, case, SUBJECT):
        return f"- {target}: not measured in this run"
    parts, ok = [], True
    for label, limit in BUDGET_US.items():
        value = cpu_us(results, case, SUBJECT, _role_match(label))
        ok = ok and not math.isnan(value) and value <= limit
        parts.append(f"{label} {value:.0f} µs")
    return (f"- {_verdict(ok)}: {target} (WSGI workers: all pool worker processes "
            f"together). Measured: " + ", ".join(parts) + ".")


def flow_control(results: Results, cases: list[Case]) -> str:
    target = (f"download.flow_control on costs at most {MAX_FLOW_CONTROL_COST:.0%} "
              f"req/s ({SUBJECT} against {FC_OFF}, every case; cost = 1 - on/off)")
    costs = []
    for case in cases:
        if _have(results, case, SUBJECT, FC_OFF):
            on, off = rps(results, case, SUBJECT), rps(results, case, FC_OFF)
            if off > 0:
                costs.append((1 - on / off, case))
    if not costs:
        return f"- {target}: not measured in this run"
    worst, where = max(costs, key=lambda item: item[0])
    each = ", ".join(f"{c.label} {cost:+.1%}" for cost, c in costs)
    return (f"- {_verdict(worst <= MAX_FLOW_CONTROL_COST)}: {target}. Worst {worst:+.1%} "
            f"({where.label}); each: {each}.")


def big_responses(results: Results, cases: list[Case]) -> str:
    target = f"1 MiB: {SUBJECT} not slower than nginx -> granian"
    parts, ok = [], True
    for case in cases:
        if case.path == MIB1 and _have(results, case, SUBJECT, GRANIAN):
            granian = rps(results, case, GRANIAN)
            ratio = rps(results, case, SUBJECT) / granian
            ok = ok and ratio >= 1.0
            ceiling = (f" ({DIRECT} {rps(results, case, DIRECT) / granian:.2f}x)"
                       if _have(results, case, DIRECT) else "")
            parts.append(f"c={case.connections}: {ratio:.2f}x{ceiling}")
    if not parts:
        return f"- {target}: not measured in this run"
    kib = [f"c={c.connections}: {rps(results, c, SUBJECT) / rps(results, c, GRANIAN):.2f}x"
           for c in cases if c.path == KIB64 and _have(results, c, SUBJECT, GRANIAN)]
    extra = f" (64 KiB, reported only: {', '.join(kib)})" if kib else ""
    return (f"- {_verdict(ok)}: {target}. " + ", ".join(parts) + f"{extra}. "
            f"In brackets: {CEILING}.")


def memory(long_section: str | None) -> list[str]:
    """The verdicts of the last `make bench-long` (its own section), marked as such."""
    lines = [line for line in (long_section or "").splitlines()
             if line.startswith(("- **met**", "- **missed**"))]
    if not lines:
        return ["- Memory (RSS flat over 1,000,000 requests; 10,000 connections): not "
                "measured yet: `make bench-long`."]
    return [line.replace("- ", "- (last `make bench-long`, section below) ", 1) for line in lines]


def summary(results: Results, cases: list[Case], long_section: str | None = None) -> str:
    return "\n".join([throughput(results, cases), latency_c1(results, cases),
                      cpu_budget(results, cases), flow_control(results, cases),
                      big_responses(results, cases), *memory(long_section)])
