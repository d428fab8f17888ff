"""A supervisor killed with SIGKILL takes its children with it (scale0/pool/lifeline.py):
`scale0 up` (Mongrel2, relay, broker, pool and its processes) and a pool's arbiter."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import uuid
from pathlib import Path

from bench.procs import children
from tests.mongrel2_helpers import config_text

from .conftest import ROOT, Proc, Stack, free_port, wait_for
from .test_up import alive, descendants, processes_mentioning, wait_200


def _write_relay_stack(tmp: Path) -> tuple[Path, int, str, list[int]]:
    """Mongrel2 -> relay -> broker -> a pool of 2 processes, on free ports."""
    http, send, recv, relay, broker = (free_port() for _ in range(5))
    server_uuid = str(uuid.uuid4())
    (tmp / "mongrel2.conf").write_text(config_text(
        http_port=http, send_spec=f"tcp://127.0.0.1:{send}",
        recv_spec=f"tcp://127.0.0.1:{recv}", send_ident=str(uuid.uuid4()), uuid=server_uuid))
    config = tmp / "stack.toml"
    config.write_text(f"""
graceful_timeout = 10
[mongrel2]
config = "mongrel2.conf"
runtime_dir = "var"
http = "127.0.0.1:{http}"
[[relay]]
mongrel2 = "tcp://127.0.0.1:{send}"
bind = "tcp://127.0.0.1:{relay}"
[[broker]]
bind = "tcp://127.0.0.1:{broker}"
mongrel2 = {json.dumps([f"relay+tcp://127.0.0.1:{relay},tcp://127.0.0.1:{recv}"])}
[[pool]]
app = "examples.hello:app"
service = "hello"
routes = ["/"]
processes = 2
connect = ["tcp://127.0.0.1:{broker}"]
""")
    return config, http, server_uuid, [http, relay, broker]


def _listenable(port: int) -> bool:
    """A new server could listen on `port` (as Mongrel2 and ZeroMQ do, with
    SO_REUSEADDR: the connections the dead ones closed may be in TIME_WAIT)."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
            s.listen()
        except OSError:
            return False
    return True


def _at_least(pids: set[int], n: int) -> set[int] | None:
    return pids if len(pids) >= n else None


def test_sigkill_of_up_stops_every_process_it_started(tmp_path: Path) -> None:
    config, http, server_uuid, ports = _write_relay_stack(tmp_path)
    up = Proc("up", [sys.executable, "-m", "scale0.cli", "up", "--config", str(config)],
              tmp_path, {"PYTHONPATH": str(ROOT)})
    tree: set[int] = set()
    try:
        up.wait_ready(20, "READY up")
        wait_200(f"http://127.0.0.1:{http}/")
        # mongrel2 (as root under the lifeline watcher too), relay, broker, the
        # pool's arbiter and its 2 processes: all of them up before the kill.
        tree = wait_for(lambda: _at_least(descendants(up.popen.pid), 6), 20,
                        "6 processes under scale0 up")
        m2 = set(processes_mentioning(server_uuid))
        assert m2 and m2 <= tree, (m2, tree)
        os.kill(up.popen.pid, signal.SIGKILL)  # the supervisor only, not its group
        up.popen.wait(10)
        wait_for(lambda: not alive(tree), 30, f"every process of {sorted(tree)} to stop")
        for port in ports:
            wait_for(lambda p=port: _listenable(p), 10, f"port {port} to be free")
    finally:
        up.stop()
        for pid in alive(tree):  # orphans, if the test failed
            os.kill(pid, signal.SIGKILL)


def test_sigkill_of_a_pools_arbiter_stops_its_processes(fresh_stack: Stack) -> None:
    s = fresh_stack
    s.start_mongrel2()
    s.start_broker()
    pool = s.start_pool("e2e_apps:app", service="app", processes=2)
    s.wait_ok("/pid")
    workers = wait_for(lambda: _at_least(set(children(pool.popen.pid)), 2), 20,
                       "the pool's two processes")
    os.kill(pool.popen.pid, signal.SIGKILL)
    wait_for(lambda: not alive(workers), 30, f"the pool's processes {sorted(workers)} to stop")


def test_the_watcher_forwards_signals_and_its_childs_status(tmp_path: Path) -> None:
    # What `scale0 up` runs Mongrel2 under as root: SIGINT reaches the
    # program, and the watcher exits as the program did (128 + signal).
    watcher = subprocess.Popen([sys.executable, "-m", "scale0.pool.lifeline", "--", "sleep", "60"],
                               cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        child = wait_for(lambda: children(watcher.pid), 10, "the watcher's child")[0]
        watcher.send_signal(signal.SIGINT)
        assert watcher.wait(10) == 128 + signal.SIGINT
        wait_for(lambda: not alive({child}), 10, "the child to stop")
    finally:
        if watcher.poll() is None:
            watcher.kill()
            watcher.wait()


def test_a_child_whose_parent_is_already_gone_exits_at_once() -> None:
    # The race die_with_parent closes: the parent died before the prctl.
    code = ("import os, sys; from scale0.pool.lifeline import die_with_parent; "
            "die_with_parent(os.getppid() + 1); sys.exit(0)")
    out = subprocess.run([sys.executable, "-c", code], env={**os.environ,
                                                            "PYTHONPATH": str(ROOT)},
                         timeout=30)
    assert out.returncode == 1
