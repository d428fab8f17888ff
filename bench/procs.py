"""Child processes for the benchmark: own session, log file, bounded stop, RSS.

Every process runs in a session of its own (so a Ctrl-C at the terminal
reaches only the harness, which then stops them in order) and gets SIGTERM
if the harness dies (scale0.pool.lifeline: PR_SET_PDEATHSIG). `stop()` signals
the process, waits a bounded time, then SIGKILLs its whole process group
(pre-forked children too).
"""

from __future__ import annotations

import http.client
import os
import signal
import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

from scale0.pool import lifeline


class BenchError(RuntimeError):
    """Something the harness cannot measure around; the text says what and why."""


class WaitTimeout(BenchError):
    """`wait_until` gave up."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Proc:
    """A child process whose stdout and stderr go to `<log_dir>/<name>.log`."""

    def __init__(self, name: str, argv: list[str], cwd: Path, log_dir: Path,
                 stop_signal: int = signal.SIGTERM, extra_logs: tuple[Path, ...] = (),
                 child_role: str = "child", env: dict[str, str] | None = None) -> None:
        self.name = name
        self.child_role = child_role  # what its forked processes are called in the tables
        self.stop_signal = stop_signal
        self.log_path = log_dir / f"{name}.log"
        self.extra_logs = extra_logs
        with open(self.log_path, "wb") as log:
            self.popen = subprocess.Popen(argv, cwd=cwd, stdin=subprocess.DEVNULL, stdout=log,
                                          stderr=subprocess.STDOUT, start_new_session=True,
                                          preexec_fn=lifeline.preexec(),
                                          env=None if env is None else {**os.environ, **env})

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def log_tail(self, lines: int = 15) -> str:
        parts = []
        for path in (self.log_path, *self.extra_logs):
            try:
                text = path.read_bytes()[-20000:].decode("utf-8", "replace")
            except OSError:
                continue
            tail = "\n".join(text.splitlines()[-lines:])
            parts.append(f"--- {self.name}: {path} (last {lines} lines) ---\n{tail}")
        return "\n".join(parts)

    def stop(self, timeout_s: float = 10.0) -> None:
        if self.alive():
            self.popen.send_signal(self.stop_signal)
            try:
                self.popen.wait(timeout_s)
            except subprocess.TimeoutExpired:
                pass
        try:  # the process if it is still there, and anything it forked
            os.killpg(self.popen.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        try:
            self.popen.wait(5.0)
        except subprocess.TimeoutExpired:
            pass


def wait_until(predicate: Callable[[], bool], timeout_s: float, what: str,
               check: Callable[[], None] = lambda: None, interval_s: float = 0.05) -> None:
    """Poll `predicate` until true; `check` may raise early (e.g. a process died)."""
    deadline = time.monotonic() + timeout_s
    while not predicate():
        check()
        if time.monotonic() > deadline:
            raise WaitTimeout(f"timed out after {timeout_s:.0f}s waiting for {what}")
        time.sleep(interval_s)


def http_get(port: int, path: str, timeout_s: float = 2.0) -> tuple[int, bytes]:
    """(status, body) of GET http://127.0.0.1:port/path; OSError if it fails."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout_s)
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        return response.status, response.read()
    except http.client.HTTPException as exc:
        raise OSError(str(exc)) from exc
    finally:
        conn.close()


def answers_200(port: int, path: str = "/") -> bool:
    try:
        return http_get(port, path, timeout_s=1.0)[0] == 200
    except OSError:
        return False


def rss_kib(pid: int) -> int | None:
    """VmRSS of `pid` in KiB, from /proc/PID/status; None if it is gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return None


def children(pid: int) -> list[int]:
    """Pids whose parent is `pid` (scans /proc: no CONFIG_PROC_CHILDREN needed)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # "pid (comm) state ppid ...": comm may hold spaces and ')'; split after the last ')'.
        fields = stat.rpartition(")")[2].split()
        if len(fields) > 1 and fields[1] == str(pid):
            found.append(int(entry.name))
    return sorted(found)


def descendants(pid: int) -> list[int]:
    """Every process below `pid` (children, their children, ...), in pid order per level."""
    found: list[int] = []
    level = children(pid)
    while level:
        found += level
        level = [grandchild for child in level for grandchild in children(child)]
    return found


CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float | None:
    """utime + stime of `pid` (all its threads) from /proc/PID/stat; None if it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat.rpartition(")")[2].split()  # fields[0] is field 3 (state)
    try:
        return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS  # fields 14 and 15
    except (IndexError, ValueError):
        return None
