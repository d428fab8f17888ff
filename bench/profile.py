"""`make profile`: where the broker, the relay and a pool worker spend their CPU under load.

Starts the shape `make run` starts (Mongrel2 -> relay -> broker -> `scale0
wsgi examples.hello:app` 2 x 4), warms it up, then runs wrk (hello,
keep-alive, c=BENCH_PROFILE_CONNECTIONS) while `py-spy record --nonblocking`
samples the broker, the relay and pool worker 1 at the same time for
BENCH_PROFILE_DURATION seconds. py-spy leaves idle threads out, so every
sample is a moment that thread was running (or ready to). Own time of a
function = the samples where it is the innermost frame.

The summary (top functions by own time, per process, and CPU µs per request
of each process during the profile) replaces section "profile" of
docs/benchmarks.md; the section it replaces becomes "profile-previous", so a
run before and one after a change sit side by side.

BENCH_PROFILE_PATH (default `/`) profiles another URL of examples.hello, e.g.
`/bytes/1048576`; BENCH_PROFILE_DOC=0 prints the summary without writing it
to docs/benchmarks.md (for a look at a case the doc does not keep).
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from scale0.deploy.m2server import Mongrel2Error

from . import doc, wrk
from .procs import BenchError
from .report import DOC_PATH, Case, Settings, machine_table
from .run import _env_int, _raise_interrupt, check_answers, log, measured_run
from .scenarios import Scenario, start_scale0

PROFILED = ("broker", "relay", "pool worker 1")
TOP = 12
_FRAME = re.compile(r"^(?P<func>.*) \((?P<file>.*?)(?::(?P<line>\d+))?\)$")


@dataclass(frozen=True, slots=True)
class Profile:
    role: str
    samples: int
    own: list[tuple[str, int]]  # "function (file)", samples, most first
    inclusive: list[tuple[str, int]]


def _frame_key(frame: str) -> str:
    """'func (path/to/file.py:12)' -> 'func (file.py)'; site-packages paths shortened."""
    match = _FRAME.match(frame.strip())
    if match is None:
        return frame.strip()
    path = match.group("file")
    for marker in ("site-packages/", "lib/python3"):
        if marker in path:
            path = path.split(marker, 1)[1]
    root = str(Path(__file__).resolve().parents[1]) + "/"
    return f"{match.group('func')} ({path.removeprefix(root)})"


def parse_raw(text: str, role: str) -> Profile:
    """py-spy's raw (collapsed stacks) output: 'frame;frame;... COUNT' per line."""
    own: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    total = 0
    for line in text.splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        frames = [_frame_key(f) for f in stack.split(";") if f]
        if not frames:
            continue
        total += n
        own[frames[-1]] += n
        for key in set(frames):
            inclusive[key] += n
    # Frames on (nearly) every stack are entry points (main, run loops): leave them out.
    below_entry = Counter({k: v for k, v in inclusive.items() if v < 0.99 * total})
    return Profile(role, total, own.most_common(TOP), below_entry.most_common(TOP))


def py_spy() -> str:
    beside = Path(sys.executable).parent / "py-spy"
    found = str(beside) if beside.exists() else shutil.which("py-spy")
    if found is None:
        raise BenchError("py-spy not found: install the bench extras with "
                         f"`{sys.executable} -m pip install -e '.[bench]'` (`make profile` does)")
    return found


def _py_spy_version() -> str:
    try:
        done = subprocess.run([py_spy(), "--version"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired, BenchError):
        return "unknown"
    return done.stdout.strip().removeprefix("py-spy ") or "unknown"


def profile_table(profile: Profile) -> str:
    if not profile.samples:
        return f"#### {profile.role}\n\nno samples"
    lines = [f"#### {profile.role} ({profile.samples:,} samples)", "",
             "| own % | function (file) | | inclusive % | function (file) |",
             "|---:|---|---|---:|---|"]
    for i in range(max(len(profile.own), len(profile.inclusive))):
        left = profile.own[i] if i < len(profile.own) else None
        right = profile.inclusive[i] if i < len(profile.inclusive) else None
        lcell = f"{100 * left[1] / profile.samples:.1f} | `{left[0]}`" if left else " | "
        rcell = f"{100 * right[1] / profile.samples:.1f} | `{right[0]}`" if right else " | "
        lines.append(f"| {lcell} | | {rcell} |")
    return "\n".join(lines)


def render(profiles: list[Profile], cpu: dict[str, float], rps: float, connections: int,
           duration_s: int, rate: int, path: str = "/") -> str:
    cpu_rows = "\n".join(f"| {role} | {us:.0f} |" for role, us in cpu.items())
    tables = "\n\n".join(profile_table(p) for p in profiles)
    return f"""\
## Profile of the hot path (`make profile`)

Written by `make profile` (`bench/profile.py`); `make bench` keeps this
section, and the next `make profile` moves it to "Previous profile". The
shape `make run` starts under `wrk -c{connections}` on `GET {path}` (keep-alive)
for {duration_s} s: {rps:,.0f} req/s while profiled. `py-spy
record --nonblocking --rate {rate}` sampled the broker, the relay and pool
worker 1 at the same time (py-spy itself takes CPU from the same 2 cores, so
req/s and CPU here are lower and higher than in the tables above). Idle
threads are left out: own % is the share of the process's running samples
in which that function was the innermost frame; inclusive % the share in
which it was anywhere on the stack (entry points, on 99 % or more of the
stacks, left out).

{machine_table([("py-spy", _py_spy_version())])}

CPU µs per request of each process during the profiled run (utime+stime from
/proc, divided by wrk's requests):

| process | CPU µs/request |
|---|---:|
{cpu_rows}

{tables}
"""


def main() -> int:
    try:
        duration_s = _env_int("BENCH_PROFILE_DURATION", 20)
        connections = _env_int("BENCH_PROFILE_CONNECTIONS", 16)
        rate = _env_int("BENCH_PROFILE_RATE", 200)
        path = os.environ.get("BENCH_PROFILE_PATH", "/")
        to_doc = os.environ.get("BENCH_PROFILE_DOC", "1") != "0"
        if not path.startswith("/"):
            raise BenchError(f"BENCH_PROFILE_PATH must start with '/': {path!r}")
        spy = py_spy()
        wrk.require_wrk()
    except BenchError as exc:
        log(f"profile: {exc}")
        return 2
    signal.signal(signal.SIGTERM, _raise_interrupt)
    tmp = Path(tempfile.mkdtemp(prefix="scale0-profile-"))
    scenario: Scenario | None = None
    spies: list[subprocess.Popen[bytes]] = []
    keep_logs = False
    try:
        scenario = start_scale0(tmp / "profile", relay=True)
        check_answers([scenario])
        case = Case("hello (19 B)" if path == "/" else path, path, connections)
        settings = Settings(duration_s=duration_s, runs=1, wrk_threads=2)
        measured_run(scenario, case, settings, 2)  # warm-up
        pids = dict(scenario.processes())
        outputs = {role: tmp / f"{role.replace(' ', '-')}.txt" for role in PROFILED}
        for role in PROFILED:
            if role not in pids:
                raise BenchError(f"profile: no {role} process")
            spies.append(subprocess.Popen(
                [spy, "record", "--pid", str(pids[role]), "--duration", str(duration_s),
                 "--rate", str(rate), "--nonblocking", "--format", "raw",
                 "--output", str(outputs[role])],
                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE))
        time.sleep(0.5)  # py-spy attaches; the wrk run below outlasts its sampling
        run = measured_run(scenario, case, settings, duration_s + 1)
        for proc in spies:
            _, err = proc.communicate(timeout=duration_s + 30)
            if proc.returncode != 0:
                raise BenchError(f"py-spy failed ({proc.returncode}): {err.decode()[-2000:]}")
        profiles = [parse_raw(outputs[role].read_text(), role) for role in PROFILED]
    except (BenchError, Mongrel2Error, subprocess.TimeoutExpired) as exc:
        log(f"profile: FAILED: {exc}")
        keep_logs = True
        return 1
    except KeyboardInterrupt:
        log("profile: interrupted")
        return 130
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        for proc in spies:
            if proc.poll() is None:
                proc.kill()
                proc.wait(5)
        if scenario is not None:
            scenario.stop()
        signal.signal(signal.SIGINT, signal.default_int_handler)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        if keep_logs:
            log(f"profile: logs kept in {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    text = render(profiles, run.cpu_us, run.wrk.requests_per_s, connections, duration_s, rate,
                  path)
    print(text)
    if not to_doc:
        return 0
    previous = doc.section_body(DOC_PATH, "profile")
    updates = {"profile": text}
    if previous is not None:
        updates["profile-previous"] = previous.replace(
            "## Profile of the hot path (`make profile`)",
            "## Previous profile (the `make profile` before the one above)", 1)
    doc.write(DOC_PATH, updates=updates)
    log(f"wrote section 'profile' of {DOC_PATH}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
