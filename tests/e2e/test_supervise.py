"""The pool supervisor on the real stack: reload (SIGHUP), max-requests
recycling, --timeout, and a second SIGTERM forcing the stop, for `scale0 wsgi`
pools and for `scale0 up`."""

from __future__ import annotations

import concurrent.futures
import json
import os
import signal
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import requests

from bench.procs import children
from scale0.ops.control import default_endpoint

from .conftest import APPS_DIR, ROOT, Load, Proc, Stack, ctl_status, wait_for
from .test_up import processes_mentioning, write_stack

APP_TEMPLATE = '''
def app(environ, start_response):
    body = {text!r}.encode()
    start_response("200 OK", [("Content-Type", "text/plain"),
                              ("Content-Length", str(len(body)))])
    return [body]
'''


def _pids(pool: Proc) -> set[int]:
    return set(children(pool.popen.pid))


def _get_pid(stack: Stack) -> int:
    r = requests.get(stack.url("/pid"), timeout=10)
    assert r.status_code == 200, r.status_code
    return int(r.json()["pid"])


def _stop_begun(control: str, loops: int) -> bool:
    """A graceful stop reached the broker: one of the `loops` workers it listed
    drains, or has drained and left already (an idle loop leaves within a
    tick of its DRAIN, so a poll can miss the draining state; a loop inside
    the app sends DRAIN only once the app returns)."""
    workers = ctl_status(control)["workers"]
    return len(workers) < loops or any(w["draining"] for w in workers)


def _worker_pids(control: str) -> set[int]:
    """The pids of the worker processes the broker lists (labels HOST:PID/K)."""
    return {int(w["label"].rpartition("/")[0].rpartition(":")[2])
            for w in ctl_status(control)["workers"]}


def _up_control(config: Path) -> str:
    """The control endpoint of the first broker of a `scale0 up` stack file."""
    return default_endpoint(tomllib.loads(config.read_text())["broker"][0]["bind"])


def _reloaded(pool: Proc, old: set[int], size: int) -> bool:
    """The pool's processes are `size` new ones and none of `old` is left."""
    now = _pids(pool)
    return len(now) == size and not now & old


def test_hup_under_load_replaces_every_process_without_a_failure(fresh_stack: Stack) -> None:
    s = fresh_stack
    s.start_mongrel2()
    s.start_broker("--heartbeat", "0.5")
    pool = s.start_pool("e2e_apps:app", "--heartbeat", "0.5", service="app", processes=2,
                        threads=2)
    s.wait_ok("/pid")
    wait_for(lambda: len(_pids(pool)) == 2, what="two worker processes")
    old = _pids(pool)
    with Load(lambda _: s.url("/sleep?0.02")) as load:
        load.wait_more(30)
        pool.send_signal(signal.SIGHUP)
        wait_for(lambda: _reloaded(pool, old, 2), 30, "the reload to replace both processes")
        load.wait_more(30)
    assert set(load.outcomes) == {"2xx"}, dict(load.outcomes)
    served = {_get_pid(s) for _ in range(20)}
    assert served and not served & old
    assert served <= _pids(pool)


def test_hup_loads_changed_app_code(fresh_stack: Stack, tmp_path: Path) -> None:
    s = fresh_stack
    code = tmp_path / "appdir"
    code.mkdir()
    (code / "reloadme.py").write_text(APP_TEMPLATE.format(text="version one"))
    s.start_mongrel2()
    s.start_broker()
    pool = s.start_pool("reloadme:app", "--chdir", str(code), service="app", processes=2)
    assert s.wait_ok("/").text == "version one"
    old = _pids(pool)
    (code / "reloadme.py").write_text(APP_TEMPLATE.format(text="version two, longer"))
    pool.send_signal(signal.SIGHUP)
    wait_for(lambda: _reloaded(pool, old, 2), 30, "the reload")
    assert {requests.get(s.url("/"), timeout=10).text for _ in range(10)} == {
        "version two, longer"}


def test_hup_to_broken_code_keeps_the_old_processes_serving(fresh_stack: Stack,
                                                            tmp_path: Path) -> None:
    s = fresh_stack
    code = tmp_path / "appdir"
    code.mkdir()
    (code / "reloadme.py").write_text(APP_TEMPLATE.format(text="good"))
    s.start_mongrel2()
    s.start_broker("--heartbeat", "0.5")
    pool = s.start_pool("reloadme:app", "--chdir", str(code), "--heartbeat", "0.5",
                        service="app", processes=2)
    assert s.wait_ok("/").text == "good"
    wait_for(lambda: len(_pids(pool)) == 2, what="two worker processes")
    old = _pids(pool)
    # The new code marks each attempt to import it, then fails on a syntax error.
    attempt = tmp_path / "boot-attempt"
    (code / "reloadme.py").write_text(f"import pathlib\npathlib.Path({str(attempt)!r}).touch()\n"
                                      "import reloadme_broken  # noqa\n")
    (code / "reloadme_broken.py").write_text("def app(:  # a syntax error\n")
    with Load(lambda _: s.url("/")) as load:
        load.wait_more(20)
        pool.send_signal(signal.SIGHUP)
        wait_for(attempt.exists, 30, "a new process to try the broken code")
        load.wait_more(50)
    assert set(load.outcomes) == {"2xx"}, dict(load.outcomes)
    assert pool.popen.poll() is None  # the pool did not halt
    wait_for(lambda: _pids(pool) == old, 15, "only the old processes to be left")
    assert {requests.get(s.url("/"), timeout=10).text for _ in range(10)} == {"good"}
    # fixed code and another HUP: the reload goes through
    (code / "reloadme.py").write_text(APP_TEMPLATE.format(text="fixed, at last"))
    pool.send_signal(signal.SIGHUP)
    wait_for(lambda: _reloaded(pool, old, 2), 30, "the second reload")
    assert requests.get(s.url("/"), timeout=10).text == "fixed, at last"


def test_max_requests_recycles_processes_under_load(fresh_stack: Stack) -> None:
    s = fresh_stack
    s.start_mongrel2()
    s.start_broker("--heartbeat", "0.5")
    pool = s.start_pool("e2e_apps:app", "--heartbeat", "0.5", "--max-requests", "20",
                        "--max-requests-jitter", "5", service="app", processes=2, threads=2)
    s.wait_ok("/")
    wait_for(lambda: len(_pids(pool)) == 2, what="two worker processes")
    first = _pids(pool)
    seen: set[int] = set(first)
    most = 0

    def sample() -> bool:
        nonlocal most
        now = _pids(pool)
        seen.update(now)
        most = max(most, len(now))
        return False

    with Load(lambda _: s.url("/sleep?0.01")) as load:
        target = load.sent() + 300  # about six lifetimes of each process
        # Processes are replaced again and again (as fast as the old ones drain).
        wait_for(lambda: sample() or (load.sent() >= target and len(seen - first) >= 4), 60,
                 "300 answers and 4 replacements")
    assert set(load.outcomes) == {"2xx"}, dict(load.outcomes)
    # bounded: 2 current + at most 2 on their way out (superseded or draining)
    assert most <= 4, most
    assert pool.log_tail(1_000_000).count("asks to be replaced") >= 4
    wait_for(lambda: len(_pids(pool)) == 2, 30, "the pool to settle at two processes")


def test_timeout_kills_a_stuck_process_and_replaces_it(fresh_stack: Stack) -> None:
    s = fresh_stack
    s.start_mongrel2()
    s.start_broker("--heartbeat", "0.5")
    pool = s.start_pool("e2e_apps:app", "--heartbeat", "0.5", "--timeout", "2",
                        service="app", processes=1, threads=2)
    s.wait_ok("/")
    wait_for(lambda: len(_pids(pool)) == 1, what="the worker process")
    (stuck_pid,) = _pids(pool)
    # POST is not retried by the broker: the client's answer is for this one kill
    r = requests.post(s.url("/sleep?30"), data=b"x", timeout=25)
    assert r.status_code in (502, 504), r.status_code
    log = pool.log_tail(1_000_000)
    assert f"killing process {stuck_pid} (slot 0): timed out: request stuck for" in log
    wait_for(lambda: len(_pids(pool)) == 1 and stuck_pid not in _pids(pool), 15,
             "a replacement process")
    assert s.wait_ok("/pid").json()["pid"] != stuck_pid
    assert pool.popen.poll() is None


def test_second_sigterm_forces_a_pool_to_stop(fresh_stack: Stack) -> None:
    s = fresh_stack
    marks = s.tmp / "marks"
    marks.mkdir()
    s.start_mongrel2()
    broker = s.start_broker()
    pool = s.start_pool("e2e_apps:app", "--graceful-timeout", "60", service="app",
                        env={"E2E_MARK_DIR": str(marks)})
    s.wait_ok("/")
    workers = _pids(pool)
    with concurrent.futures.ThreadPoolExecutor(1) as ex:
        slow = ex.submit(requests.get, s.url("/sleep?40"), timeout=30)
        wait_for(lambda: list(marks.iterdir()), what="the slow request at the worker")
        loops = len(ctl_status(broker.control)["workers"])
        pool.send_signal(signal.SIGTERM)  # graceful: would wait for the 40 s request
        wait_for(lambda: _stop_begun(broker.control, loops), what="the workers to drain")
        pool.send_signal(signal.SIGTERM)
        assert pool.popen.wait(10) == 0  # well before the 40 s request or the 60 s grace
        assert slow.result().status_code in (502, 503, 504)
    wait_for(lambda: not any(Path(f"/proc/{pid}").exists() for pid in workers), 10,
             "the worker processes to be gone")


def _write_up_stack(tmp: Path, pool_args: list[str]) -> tuple[Path, int, str]:
    pool = f"""
[[pool]]
app = "e2e_apps:app"
service = "app"
routes = ["/"]
processes = 2
threads = 2
connect = ["{{broker}}"]
args = {json.dumps(pool_args)}
"""
    return write_stack(tmp, pool, graceful_timeout=60.0, broker_args=("--heartbeat", "0.5"))


def _start_up(tmp: Path, config: Path, env: dict[str, str] | None = None) -> Proc:
    up = Proc("up", [sys.executable, "-m", "scale0.cli", "up", "--config", str(config)], tmp,
              {"PYTHONPATH": f"{APPS_DIR}:{ROOT}", **(env or {})})
    up.wait_ready(30, "READY up")
    return up


def test_up_sighup_reloads_pools_under_load_without_a_failure(tmp_path: Path) -> None:
    config, http_port, _ = _write_up_stack(tmp_path, ["--heartbeat", "0.5"])
    base = f"http://127.0.0.1:{http_port}"
    up = _start_up(tmp_path, config)
    try:
        wait_for(lambda: _ok(base + "/pid"), 30, "the stack to answer")
        before = {requests.get(base + "/pid", timeout=10).json()["pid"] for _ in range(10)}
        started = set(children(up.popen.pid))  # Mongrel2, the broker, the pool's arbiter
        with Load(lambda _: base + "/sleep?0.02") as load:
            load.wait_more(30)
            control = _up_control(config)
            old = _worker_pids(control)
            assert len(old) == 2 and before <= old
            up.send_signal(signal.SIGHUP)
            wait_for(lambda: (lambda now: len(now) == 2 and not now & old)(
                _worker_pids(control)), 30, "both old processes to be retired")
            load.wait_more(30)
        assert set(load.outcomes) == {"2xx"}, dict(load.outcomes)
        after = {requests.get(base + "/pid", timeout=10).json()["pid"] for _ in range(10)}
        assert not after & before
        assert set(children(up.popen.pid)) == started  # only the pool's workers changed
        assert up.popen.poll() is None
    finally:
        up.stop()
    assert processes_mentioning(str(tmp_path)) == []


def test_up_second_sigterm_forces_the_stop(tmp_path: Path) -> None:
    marks = tmp_path / "marks"
    marks.mkdir()
    config, http_port, server_uuid = _write_up_stack(tmp_path, ["--graceful-timeout", "60"])
    base = f"http://127.0.0.1:{http_port}"
    up = _start_up(tmp_path, config, {"E2E_MARK_DIR": str(marks)})
    try:
        wait_for(lambda: _ok(base + "/"), 30, "the stack to answer")
        with concurrent.futures.ThreadPoolExecutor(1) as ex:
            slow = ex.submit(_status, base + "/sleep?40")
            wait_for(lambda: list(marks.iterdir()), what="the slow request at a worker")
            control = _up_control(config)
            loops = len(ctl_status(control)["workers"])
            up.send_signal(signal.SIGTERM)  # graceful: the pool waits for the request
            wait_for(lambda: _stop_begun(control, loops), what="the workers to drain")
            up.send_signal(signal.SIGTERM)
            assert up.popen.wait(10) == 0  # well before the 40 s request or the 60 s grace
            assert slow.result() != 200
        wait_for(lambda: not processes_mentioning(str(tmp_path))
                 and not processes_mentioning(server_uuid), 10, "every process to be gone")
    finally:
        up.stop()


def _ok(url: str) -> bool:
    return _status(url) == 200


def _status(url: str) -> int:
    try:
        return requests.get(url, timeout=30).status_code
    except requests.RequestException:
        return 0


@pytest.mark.parametrize("command", ["wsgi", "asgi"])
def test_an_app_that_cannot_be_imported_gives_one_line_no_ready_and_exit_3(
        tmp_path: Path, command: str) -> None:
    (tmp_path / "broken_app.py").write_text("import no_such_module_anywhere\n")
    done = subprocess.run([sys.executable, "-m", "scale0.cli", command, "broken_app:app",
                           "--chdir", str(tmp_path), "--connect", "tcp://127.0.0.1:1"],
                          capture_output=True, text=True, timeout=30, cwd=tmp_path,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert done.returncode == 3, done.stderr
    assert done.stdout == ""  # no READY line
    errors = [line for line in done.stderr.splitlines() if " ERROR " in line]
    assert len(errors) == 2, done.stderr  # the process's reason, the pool's halt
    assert ("cannot load broken_app:app: ModuleNotFoundError: No module named "
            f"'no_such_module_anywhere' (at {tmp_path}/broken_app.py:1)") in errors[0]
    assert "failed to boot and no process serves; stopping the pool" in errors[1]
    assert "Traceback" not in done.stderr
