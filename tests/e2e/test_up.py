"""`scale0 up` and `make run`: the whole stack from one command, and a clean stop."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import requests

from bench.procs import children
from scale0.deploy.malloc import TUNABLES
from tests.mongrel2_helpers import config_text

from .conftest import ROOT, Proc, free_port, wait_for


def processes_mentioning(marker: str) -> list[int]:
    """Pids whose command line contains `marker`."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        if marker.encode() in cmdline:
            pids.append(int(entry.name))
    return pids


def descendants(root: int) -> set[int]:
    """Pids of every process below `root`."""
    found: set[int] = set()
    todo = [root]
    while todo:
        for child in children(todo.pop()):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found


def alive(pids: set[int]) -> set[int]:
    return {pid for pid in pids if Path(f"/proc/{pid}").exists()
            and "Z" not in _state(pid)}


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
    except OSError:
        return "Z"


EXAMPLE_POOLS = """
[[pool]]
app = "examples.hello:app"
service = "hello"
routes = ["/"]
processes = 2
connect = ["{broker}"]
[[pool]]
app = "examples.flask_app:app"
service = "flask"
routes = ["/flask"]
processes = 2
connect = ["{broker}"]
"""


def write_stack(tmp: Path, pools: str = EXAMPLE_POOLS, *, graceful_timeout: float = 10.0,
                broker_args: tuple[str, ...] = ()) -> tuple[Path, int, str]:
    """A `scale0 up` stack file (and its Mongrel2 config) on free ports: one
    broker and `pools`, TOML in which {broker} is the broker's endpoint."""
    http_port, send_port, recv_port, broker_port = (free_port() for _ in range(4))
    server_uuid = str(uuid.uuid4())
    (tmp / "mongrel2.conf").write_text(config_text(
        http_port=http_port, send_spec=f"tcp://127.0.0.1:{send_port}",
        recv_spec=f"tcp://127.0.0.1:{recv_port}", send_ident=str(uuid.uuid4()),
        uuid=server_uuid))
    broker = f"tcp://127.0.0.1:{broker_port}"
    config = tmp / "stack.toml"
    config.write_text(f"""
graceful_timeout = {graceful_timeout}
[mongrel2]
config = "mongrel2.conf"
runtime_dir = "var"
http = "127.0.0.1:{http_port}"
[[broker]]
bind = "{broker}"
mongrel2 = ["tcp://127.0.0.1:{send_port},tcp://127.0.0.1:{recv_port}"]
args = {json.dumps(list(broker_args))}
""" + pools.replace("{broker}", broker))
    return config, http_port, server_uuid


def wait_200(url: str) -> None:
    def ok() -> bool:
        try:
            return requests.get(url, timeout=2).status_code == 200
        except requests.RequestException:
            return False

    wait_for(ok, 20, f"200 from {url}")


@pytest.mark.parametrize("stop_signal", [signal.SIGINT, signal.SIGTERM])
def test_up_serves_both_examples_and_stops_clean(tmp_path: Path, stop_signal: int) -> None:
    config, http_port, server_uuid = write_stack(tmp_path)
    for attempt in range(2):  # the second start proves nothing stale blocks it
        up = Proc(f"up{attempt}", [sys.executable, "-m", "scale0.cli", "up", "--config",
                                   str(config)], tmp_path, {"PYTHONPATH": str(ROOT)})
        try:
            assert up.wait_ready(30, "READY up").startswith("READY up")
            # READY means every pool's processes are WELCOMEd: served at once.
            for path in ("/", "/flask/"):
                r = requests.get(f"http://127.0.0.1:{http_port}{path}", timeout=10)
                assert r.status_code == 200, (path, r.status_code, r.text)
            assert processes_mentioning(server_uuid)  # mongrel2 runs
            mongrel2 = [pid for pid in processes_mentioning(server_uuid)
                        if Path(f"/proc/{pid}/comm").read_text().strip() == "mongrel2"]
            assert mongrel2
            for pid in mongrel2:  # with malloc thresholds
                # (glibc before 2.39 turns each ':' of GLIBC_TUNABLES into a NUL
                # as it reads it: compare with both ':' and NUL as separators)
                environ = b"\0" + Path(f"/proc/{pid}/environ").read_bytes().replace(b":", b"\0")
                assert b"\0GLIBC_TUNABLES=" in environ, pid
                assert TUNABLES.encode().replace(b":", b"\0") in environ, pid
            assert len(processes_mentioning(str(tmp_path))) >= 6  # pools and children
            up.send_signal(stop_signal)
            assert up.popen.wait(30) == 0
        finally:
            up.stop()
        assert processes_mentioning(server_uuid) == []
        assert processes_mentioning(str(tmp_path)) == []
        assert not (tmp_path / "var" / "run" / "mongrel2.pid").exists()


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def test_make_run_answers_curl_and_sigterm_stops_everything() -> None:
    if not all(_port_free(p) for p in (6767, 6780, 6790, 9996, 9997)):
        pytest.skip("make run's fixed ports (6767, 6780, 6790, 9996, 9997) are in use")
    make = subprocess.Popen(["make", "--no-print-directory", "run"], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    try:
        def curl_ok(path: str = "/") -> bool:
            out = subprocess.run(["curl", "-s", "-m", "2", "-o", "/dev/null", "-w",
                                  "%{http_code}", "http://127.0.0.1:6767" + path],
                                 capture_output=True, text=True)
            return out.stdout == "200"

        wait_for(curl_ok, 60, "make run to answer curl")
        wait_for(lambda: curl_ok("/chat"), 60, "make run to serve the ASGI chat page")
        metrics = requests.get("http://127.0.0.1:6790/metrics", timeout=5)
        assert metrics.status_code == 200 and "scale0_requests_total" in metrics.text
        tree = descendants(make.pid)
        assert len(tree) >= 8  # up, mongrel2, broker, 2 pools x (arbiter + 2 processes)
        make.send_signal(signal.SIGTERM)  # make does not forward it: --exit-with-parent
        make.wait(30)
        wait_for(lambda: not alive(tree), 30, "every process make run started to stop")
        wait_for(lambda: _port_free(6767), 10, "port 6767 to be released")
        assert not (ROOT / "var" / "mongrel2" / "run" / "mongrel2.pid").exists()
    finally:
        if make.poll() is None:
            os.killpg(make.pid, signal.SIGKILL)
            make.wait()


def test_a_pool_that_cannot_boot_answers_503_not_404(tmp_path: Path) -> None:
    # `scale0 up` gives the broker each pool's routes as configured routes:
    # while the pool's app fails to boot (and the stack restarts it in a
    # crash loop), its route answers 503 with Retry-After and the page.
    (tmp_path / "down.html").write_text("<h1>broken is down</h1>")
    pools = EXAMPLE_POOLS.split("[[pool]]\napp = \"examples.flask_app")[0] + """
[[pool]]
app = "no_such_module_anywhere:app"
service = "broken"
routes = ["/broken"]
connect = ["{broker}"]
"""
    config, http_port, _ = write_stack(
        tmp_path, pools, broker_args=("--maintenance-page", "broken=down.html"))
    up = Proc("up", [sys.executable, "-m", "scale0.cli", "up", "--config", str(config)],
              tmp_path, {"PYTHONPATH": str(ROOT)})
    try:
        # No READY line: one of its pools never is. The others serve.
        wait_200(f"http://127.0.0.1:{http_port}/")  # the stack serves: the broker is up
        r = requests.get(f"http://127.0.0.1:{http_port}/broken/x", timeout=10)
        assert r.status_code == 503, r.text
        assert int(r.headers["Retry-After"]) > 0
        assert r.text == "<h1>broken is down</h1>"
        assert not [line for line in up.stdout_lines() if line.startswith("READY")]
    finally:
        up.stop()
