"""End-to-end harness: a real Mongrel2, real broker and worker processes.

Every process a test starts is tracked and stopped (SIGTERM, then SIGKILL)
when the fixture ends; readiness is a READY line or an HTTP answer, polled
with a deadline, never a fixed sleep. Ports are picked free.
"""

from __future__ import annotations

import os
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
import zmq

from scale0.deploy.m2server import Mongrel2Server
from tests.mongrel2_helpers import config_text

ROOT = Path(__file__).resolve().parents[2]
APPS_DIR = Path(__file__).resolve().parent
SENDER = "5ca1e000-0000-4000-8000-0000000e2e01"

pytestmark = pytest.mark.e2e


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for(predicate: Callable[[], Any], timeout_s: float = 15.0, what: str = "condition",
             interval_s: float = 0.05) -> Any:
    """Poll `predicate` until truthy; fail the test after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s}s waiting for {what}")
        time.sleep(interval_s)


def ctl_status(control: str) -> dict[str, Any]:
    """What `scale0 ctl --control CONTROL status --json` prints, as a dict (the
    same call, made in this process: cheaper to poll than a new interpreter)."""
    from scale0.ops.ctl import call

    result: dict[str, Any] = call(control, ["status"], timeout_s=10.0)
    return result


def service_status(status: dict[str, Any], name: str) -> dict[str, Any]:
    """One service's row of a broker's status ({} while the broker has none)."""
    return next((sv for sv in status["services"] if sv["name"] == name), {})


class Proc:
    """A child process whose stdout we read for its READY line."""

    def __init__(self, name: str, argv: list[str], cwd: Path, env: dict[str, str] | None = None):
        self.name = name
        self.log_path = cwd / f"{name}.log"
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.popen = subprocess.Popen(argv, cwd=cwd, stdout=subprocess.PIPE, stderr=self._log,
                                      env={**os.environ, **(env or {})}, start_new_session=True)
        self.ready_line = ""
        self._buf = b""  # stdout read, short of a whole line
        self._lines: list[str] = []  # stdout's whole lines so far

    def wait_ready(self, timeout_s: float = 15.0, prefix: str = "READY") -> str:
        """Read stdout lines until one starts with `prefix`; fail after `timeout_s`."""
        assert self.popen.stdout is not None
        deadline = time.monotonic() + timeout_s
        while True:
            for line in self._new_lines():
                if line.startswith(prefix):
                    self.ready_line = line
                    return self.ready_line
            left = deadline - time.monotonic()
            if left <= 0 or self.popen.poll() is not None:
                raise AssertionError(f"{self.name} not ready: {self.log_tail()}")
            if select.select([self.popen.stdout], [], [], left)[0]:
                self._buf += os.read(self.popen.stdout.fileno(), 4096)

    def stdout_lines(self) -> list[str]:
        """Every line it printed on stdout so far (read without waiting)."""
        assert self.popen.stdout is not None
        while select.select([self.popen.stdout], [], [], 0)[0]:
            chunk = os.read(self.popen.stdout.fileno(), 4096)
            if not chunk:
                break
            self._buf += chunk
        self._new_lines()
        return list(self._lines)

    def _new_lines(self) -> list[str]:
        *done, self._buf = self._buf.split(b"\n")
        lines = [line.decode(errors="replace") for line in done]
        self._lines += lines
        return lines

    @property
    def control(self) -> str:
        """A broker's control endpoint, as its READY line gives it."""
        words = [w for w in self.ready_line.split() if w.startswith("control=")]
        assert words, f"{self.name}: no control= in its READY line {self.ready_line!r}"
        return words[0].removeprefix("control=")

    def status(self) -> dict[str, Any]:
        """A broker's `scale0 ctl status --json`, through its control socket."""
        return ctl_status(self.control)

    def log_tail(self, n: int = 3000) -> str:
        self._log.flush()
        return self.log_path.read_bytes()[-n:].decode("utf-8", "replace")

    def send_signal(self, sig: int) -> None:
        if self.popen.poll() is None:
            self.popen.send_signal(sig)

    def kill_group(self, sig: int = signal.SIGKILL) -> None:
        try:
            os.killpg(self.popen.pid, sig)
        except ProcessLookupError:
            pass

    def stop(self, timeout_s: float = 10.0) -> int:
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.kill_group()
                self.popen.wait(5)
        self.kill_group()  # pre-forked children, if any are left
        if self.popen.stdout is not None:
            self.popen.stdout.close()
        self._log.close()
        return int(self.popen.returncode)


class Stack:
    """Mongrel2 + brokers + worker pools in a temporary folder, on free ports."""

    def __init__(self, tmp: Path, recv_ident: str = "",
                 m2_settings: dict[str, int] | None = None) -> None:
        if shutil.which("mongrel2") is None:
            pytest.fail("mongrel2 is not installed: run `make test` (installs mongrel2-core)")
        self.tmp = tmp
        self.http_port = free_port()
        self.send_spec = f"tcp://127.0.0.1:{free_port()}"
        self.recv_spec = f"tcp://127.0.0.1:{free_port()}"
        self.broker_endpoints: list[str] = []
        self.procs: list[Proc] = []
        conf = tmp / "mongrel2.conf"
        conf.write_text(config_text(http_port=self.http_port, send_spec=self.send_spec,
                                    recv_spec=self.recv_spec, send_ident=SENDER,
                                    recv_ident=recv_ident, settings=m2_settings))
        self.link = f"{self.send_spec},{self.recv_spec}" + (f",{recv_ident}" if recv_ident else "")
        self.m2 = Mongrel2Server(conf, tmp / "m2", "f400bf85-4538-4f7a-8908-67e313d515c2")
        self.mongrel2: Proc | None = None

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    def url(self, path: str) -> str:
        return self.base + path

    def start_mongrel2(self) -> Proc:
        self.m2.prepare()
        proc = Proc("mongrel2", self.m2.argv(), self.m2.runtime_dir)
        proc.ready_line = "READY"
        self.procs.append(proc)
        self.mongrel2 = proc

        def accepts() -> bool:
            try:
                with socket.create_connection(("127.0.0.1", self.http_port), timeout=0.2):
                    return True
            except OSError:
                return False

        wait_for(accepts, what="Mongrel2 to accept connections")
        return proc

    def start_relay(self, port: int | None = None, *, replies: bool = False,
                    args: tuple[str, ...] = ()) -> Proc:
        """A relay in front of this stack's Mongrel2; brokers started after it
        take their requests from the relay. `replies`: they send their replies
        through it too (linked as relay+ENDPOINT alone)."""
        endpoint = f"tcp://127.0.0.1:{port or free_port()}"
        also = ["--mongrel2-recv", self.recv_spec] if replies else []
        proc = Proc("relay", [sys.executable, "-m", "scale0.cli", "relay", "--mongrel2",
                              self.send_spec, "--bind", endpoint, *also, *args], self.tmp)
        self.procs.append(proc)
        proc.wait_ready()
        self.link = f"relay+{endpoint}" if replies else f"relay+{endpoint},{self.recv_spec}"
        return proc

    def start_broker(self, *args: str, port: int | None = None,
                     also: tuple[Stack, ...] = ()) -> Proc:
        """A broker for this stack's Mongrel2 (and those of the stacks in `also`)."""
        endpoint = f"tcp://127.0.0.1:{port or free_port()}"
        argv = [sys.executable, "-m", "scale0.cli", "broker", "--bind", endpoint,
                "--mongrel2", self.link, *args]
        for other in also:
            argv += ["--mongrel2", other.link]
        proc = Proc(f"broker{len(self.broker_endpoints)}", argv, self.tmp)
        self.procs.append(proc)
        proc.wait_ready()
        if endpoint not in self.broker_endpoints:
            self.broker_endpoints.append(endpoint)
        return proc

    def start_pool(self, app: str, *args: str, service: str | None = None,
                   routes: tuple[str, ...] = ("/",), processes: int = 1, threads: int = 2,
                   env: dict[str, str] | None = None, connect: list[str] | None = None,
                   upload_dir: bool = True, ready: bool = True) -> Proc:
        """A worker pool; `upload_dir`: given Mongrel2's upload folder (shared disk).
        `ready`: wait for its READY line (its processes are WELCOMEd by the
        brokers); False for a pool that is never let in."""
        return self._start_workers("wsgi", "pool", app, ["--threads", str(threads), *args],
                                   service, routes, processes, env, connect, upload_dir, ready)

    def start_asgi(self, app: str, *args: str, service: str | None = None,
                   routes: tuple[str, ...] = ("/",), processes: int = 1,
                   concurrency: int = 50, env: dict[str, str] | None = None,
                   ready: bool = True) -> Proc:
        """A `scale0 asgi` pool (apps from tests/e2e/asgi_apps.py); `ready` as
        for start_pool."""
        return self._start_workers("asgi", "asgi", app,
                                   ["--concurrency", str(concurrency), *args],
                                   service, routes, processes, env, None, True, ready)

    def _start_workers(self, command: str, label: str, app: str, args: list[str],
                       service: str | None, routes: tuple[str, ...], processes: int,
                       env: dict[str, str] | None, connect: list[str] | None,
                       upload_dir: bool, ready: bool) -> Proc:
        """`scale0 wsgi|asgi APP`: what start_pool and start_asgi share."""
        argv = [sys.executable, "-m", "scale0.cli", command, app,
                "--processes", str(processes),
                *(("--upload-dir", str(self.m2.upload_dir)) if upload_dir else ()), *args]
        for endpoint in connect or self.broker_endpoints:
            argv += ["--connect", endpoint]
        if service:
            argv += ["--service", service]
        for route in routes:
            argv += ["--route", route]
        env = {"PYTHONPATH": f"{APPS_DIR}{os.pathsep}{ROOT}", **(env or {})}
        proc = Proc(f"{label}-{service or app.replace(':', '-')}-{len(self.procs)}", argv,
                    self.tmp, env)
        self.procs.append(proc)
        if ready:
            proc.wait_ready()
        return proc

    @property
    def marks(self) -> Path:
        """The folder where e2e_apps marks what reached the app (E2E_MARK_DIR)."""
        marks = self.tmp / "marks"
        marks.mkdir(exist_ok=True)
        return marks

    def wait_ok(self, path: str, timeout_s: float = 15.0) -> requests.Response:
        last = ["no answer yet"]  # what the last try got, for the failure message

        def ok() -> requests.Response | None:
            try:
                r = requests.get(self.url(path), timeout=2)
            except requests.RequestException as exc:
                last[0] = f"{type(exc).__name__}: {exc}"
                return None
            last[0] = f"{r.status_code}: {r.text[:200]!r}"
            return r if r.status_code == 200 else None

        try:
            return wait_for(ok, timeout_s, f"200 from {path}")  # type: ignore[no-any-return]
        except AssertionError as exc:
            raise AssertionError(f"{exc} (last: {last[0]})") from None

    def stop(self) -> None:
        for proc in reversed(self.procs):
            proc.stop()
        self.procs.clear()
        self.m2.remove_pid_file()


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """One shared stack for a module's tests that do not disturb it."""
    s = Stack(tmp_path_factory.mktemp("stack"))
    try:
        yield s
    finally:
        s.stop()


@pytest.fixture
def control() -> Iterator[str]:
    """A broker control socket path short enough for a unix socket."""
    path = Path(tempfile.mkdtemp(prefix="s0ctl-", dir="/tmp"))
    try:
        yield f"ipc://{path}/b.ctl"
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def fresh_stack(tmp_path: Path) -> Iterator[Stack]:
    """A stack of its own, for tests that kill or restart parts of it."""
    s = Stack(tmp_path)
    try:
        yield s
    finally:
        s.stop()


class Load:
    """Client threads looping GETs, bounded in time, counting outcomes.

    Outcomes: "2xx", the status code for anything else, "hanging" (no answer
    within `timeout_s`) and "connection error".
    """

    def __init__(self, url_for: Callable[[int], str], *, clients: int = 4,
                 max_s: float = 60.0, timeout_s: float = 20.0) -> None:
        self.url_for = url_for
        self.max_s = max_s
        self.timeout_s = timeout_s
        self.outcomes: Counter[str] = Counter()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._client, args=(n,))
                         for n in range(clients)]

    def __enter__(self) -> Load:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(self.timeout_s + 5)

    @property
    def clients(self) -> int:
        return len(self._threads)

    def sent(self) -> int:
        with self._lock:
            return sum(self.outcomes.values())

    def wait_more(self, n: int, timeout_s: float = 30.0) -> None:
        target = self.sent() + n
        wait_for(lambda: self.sent() >= target, timeout_s, f"{n} more answers")

    def _client(self, n: int) -> None:
        session = requests.Session()
        deadline = time.monotonic() + self.max_s
        while not self._stop.is_set() and time.monotonic() < deadline:
            try:
                status = session.get(self.url_for(n), timeout=self.timeout_s).status_code
                outcome = "2xx" if 200 <= status < 300 else str(status)
            except requests.ReadTimeout:
                outcome, session = "hanging", requests.Session()
            except requests.RequestException:
                outcome, session = "connection error", requests.Session()
            with self._lock:
                self.outcomes[outcome] += 1


class FakeMongrel2:
    """The handler-facing half of a Mongrel2, bound here: a PUSH that sends
    requests and a SUB that receives replies. `link` is the broker's
    --mongrel2 argument. Use as a context manager; it closes its sockets."""

    def __init__(self, sub_hwm: int = 1000) -> None:
        self.ctx = zmq.Context()
        self.push = self.ctx.socket(zmq.PUSH)
        self.sub = self.ctx.socket(zmq.SUB)
        for sock in (self.push, self.sub):
            sock.setsockopt(zmq.LINGER, 0)
        self.sub.setsockopt(zmq.RCVHWM, sub_hwm)
        send_spec = f"tcp://127.0.0.1:{free_port()}"
        recv_spec = f"tcp://127.0.0.1:{free_port()}"
        self.push.bind(send_spec)
        self.sub.bind(recv_spec)
        self.sub.setsockopt(zmq.SUBSCRIBE, b"")
        self.link = f"{send_spec},{recv_spec}"

    def wait_subscribed(self, broker: Proc, links_before: int = 0) -> None:
        """ZeroMQ sends a SUB's subscription from the thread that uses the
        socket (real Mongrel2 polls its SUB all the time): poll ours, reading
        nothing, until the broker's status shows more subscribed links than
        `links_before` (it reads a link only after that)."""
        wait_for(lambda: self.sub.poll(10) == 0
                 and sum(link["subscribed"] for link in broker.status()["links"])
                 > links_before,
                 what="the broker to see the fake Mongrel2's subscription")

    def __enter__(self) -> FakeMongrel2:
        return self

    def __exit__(self, *_: object) -> None:
        self.push.close(0)
        self.sub.close(0)
        self.ctx.term()
