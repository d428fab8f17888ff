"""Running wrk and reading its `--latency` report."""

from __future__ import annotations

import re
import shutil
import subprocess
from dataclasses import dataclass

from .procs import BenchError

WRK_TIMEOUT = "2s"  # wrk's own default, stated: a reply slower than this is a socket error
_UNITS_MS = {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60_000.0, "h": 3_600_000.0}
_TIME = r"([\d.]+)(us|ms|s|m|h)\b"


@dataclass(frozen=True, slots=True)
class WrkResult:
    requests_per_s: float
    p50_ms: float
    p99_ms: float
    requests: int
    non_2xx: int  # "Non-2xx or 3xx responses"
    socket_errors: int  # connect + read + write + timeout

    @property
    def errors(self) -> int:
        return self.non_2xx + self.socket_errors


def require_wrk() -> str:
    path = shutil.which("wrk")
    if path is None:
        raise BenchError("wrk not found: install it with `apt-get install wrk` "
                         "(`make bench` does that when run as root)")
    return path


def to_ms(value: str, unit: str) -> float:
    return float(value) * _UNITS_MS[unit]


def parse(output: str) -> WrkResult:
    """Requests/sec, the 50% and 99% latency lines, and the error counts."""
    rps = re.search(r"^Requests/sec:\s+([\d.]+)", output, re.M)
    p50 = re.search(r"^\s+50%\s+" + _TIME, output, re.M)
    p99 = re.search(r"^\s+99%\s+" + _TIME, output, re.M)
    total = re.search(r"^\s+(\d+) requests in ", output, re.M)
    if not (rps and total):
        raise BenchError(f"cannot read wrk's report:\n{output}")
    requests = int(total.group(1))
    if requests and not (p50 and p99):
        raise BenchError(f"no latency distribution in wrk's report:\n{output}")
    non_2xx = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", output)
    sock = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)",
                     output)
    return WrkResult(
        requests_per_s=float(rps.group(1)),
        p50_ms=to_ms(*p50.groups()) if p50 else float("nan"),
        p99_ms=to_ms(*p99.groups()) if p99 else float("nan"),
        requests=requests,
        non_2xx=int(non_2xx.group(1)) if non_2xx else 0,
        socket_errors=sum(int(n) for n in sock.groups()) if sock else 0,
    )


def argv(url: str, connections: int, threads: int, duration_s: int) -> list[str]:
    return ["wrk", f"-t{threads}", f"-c{connections}", f"-d{duration_s}s",
            f"--timeout={WRK_TIMEOUT}", "--latency", url]


def run(url: str, connections: int, threads: int, duration_s: int) -> WrkResult:
    """One wrk run; BenchError if wrk fails, hangs or prints no report."""
    cmd = argv(url, connections, threads, duration_s)
    limit = duration_s + 30
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True) as proc:
        try:
            out, err = proc.communicate(timeout=limit)
        except BaseException as exc:  # a hang, Ctrl-C, SIGTERM: wrk must not outlive us
            proc.kill()
            proc.wait(5)
            if isinstance(exc, subprocess.TimeoutExpired):
                raise BenchError(f"wrk did not finish in {limit}s: {' '.join(cmd)}") from exc
            raise
    if proc.returncode != 0:
        raise BenchError(f"{' '.join(cmd)} exited with {proc.returncode}:\n{out}{err}")
    return parse(out)
