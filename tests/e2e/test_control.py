"""`scale0 ctl` against a real broker, Mongrel2 and workers: status, drain,
routes, tap, shutdown, and who may reach the control socket."""

from __future__ import annotations

import json
import os
import shutil
import socket
import stat
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests

from scale0.control import default_endpoint, ipc_path, tap_endpoint

from .conftest import ROOT, Load, Proc, Stack, wait_for


def ctl_argv(control: str, *words: str) -> list[str]:
    return [sys.executable, "-m", "scale0.cli", "ctl", "--control", control, *words]


def ctl(control: str, *words: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(ctl_argv(control, *words), capture_output=True, text=True,
                          timeout=30, cwd=ROOT, check=False)


def status(control: str) -> dict[str, Any]:
    done = ctl(control, "--json", "status")
    assert done.returncode == 0, done.stderr
    result: dict[str, Any] = json.loads(done.stdout)
    return result


def served(control: str) -> int:
    return sum(w["served"] for w in status(control)["workers"])


@pytest.fixture
def short_dir() -> Iterator[Path]:
    """pytest's tmp paths can pass the 107 bytes a unix socket path may have."""
    path = Path(tempfile.mkdtemp(prefix="s0ctl-", dir="/tmp"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="module")
def app_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Stack, str]]:
    """A broker on its default control socket (derived from its --bind) and
    one pool of service `app` on /app."""
    s = Stack(tmp_path_factory.mktemp("control"))
    try:
        s.start_mongrel2()
        broker = s.start_broker()
        control = default_endpoint(s.broker_endpoints[0])
        assert f"control={control}" in broker.ready_line
        s.start_pool("e2e_apps:app", service="app", routes=("/app",), threads=2)
        s.wait_ok("/app/x")
        yield s, control
    finally:
        s.stop()


def test_status_shows_service_route_and_worker_with_growing_served_count(
        app_stack: tuple[Stack, str]) -> None:
    stack, control = app_stack
    st = status(control)
    (service,) = [s for s in st["services"] if s["name"] == "app"]
    assert service["routes"] == ["/app"] and service["workers"] == 1
    (worker,) = st["workers"]
    assert worker["services"] == ["app"] and worker["capacity"] == 2
    assert st["broker"]["workers_endpoint"] == stack.broker_endpoints[0]
    assert st["links"][0]["subscribed"] is True
    before = served(control)
    for _ in range(5):
        assert requests.get(stack.url("/app/x"), timeout=10).status_code == 200
    assert served(control) == before + 5

    table = ctl(control, "status")
    assert table.returncode == 0, table.stderr
    lines = table.stdout.splitlines()
    assert any(line.split()[:2] == ["app", "/app"] for line in lines)
    (row,) = [line.split() for line in lines if line.startswith(worker["label"])]
    assert row[2:5] == ["app", "0/2", "ready"] and int(row[-1]) == before + 5


def test_routes_add_and_remove_at_run_time(app_stack: tuple[Stack, str]) -> None:
    stack, control = app_stack
    assert requests.get(stack.url("/extra/x"), timeout=10).status_code == 404
    added = ctl(control, "routes", "add", "/extra", "app")
    assert added.returncode == 0 and "route /extra -> app added" in added.stdout
    r = requests.get(stack.url("/extra/x"), timeout=10)
    assert r.status_code == 200 and r.text == "e2e hello\n"
    listed = ctl(control, "routes").stdout.splitlines()
    assert listed[0].split() == ["ROUTE", "SERVICE", "ORIGIN"]
    assert ["/extra", "app", "broker"] in [line.split() for line in listed]
    assert ["/app", "app", "worker"] in [line.split() for line in listed]
    removed = ctl(control, "routes", "remove", "/extra")
    assert removed.returncode == 0, removed.stderr
    assert requests.get(stack.url("/extra/x"), timeout=10).status_code == 404
    again = ctl(control, "routes", "remove", "/extra")
    assert again.returncode == 1 and "no route '/extra'" in again.stderr


def test_tap_shows_requests_with_statuses_and_takes_none_from_workers(
        app_stack: tuple[Stack, str]) -> None:
    stack, control = app_stack
    tap = Proc("tap", ctl_argv(control, "tap", "app", "--count", "3"), stack.tmp)
    try:
        tap.wait_ready(prefix="TIME")  # printed once the tap's subscription is in place
        assert requests.get(stack.url("/nope"), timeout=10).status_code == 404  # not app
        ok = requests.get(stack.url("/app/x?one"), timeout=10)
        fail = requests.get(stack.url("/app/fail"), timeout=10)
        echo = requests.get(stack.url("/app/echo?three"), timeout=10)
        # Every request was answered by the app itself, tap or not.
        assert (ok.status_code, ok.text) == (200, "e2e hello\n")
        assert fail.status_code == 500
        assert echo.status_code == 200 and echo.json()["query"] == "three"
        assert tap.popen.wait(15) == 0
        assert tap.popen.stdout is not None
        lines = [line.split() for line in tap.popen.stdout.read().decode().splitlines()]
    finally:
        tap.stop()
    worker = status(control)["workers"][0]["label"]
    assert [(ln[1], ln[2], ln[4], ln[5]) for ln in lines] == [
        ("200", "GET", worker, "/app/x?one"), ("500", "GET", worker, "/app/fail"),
        ("200", "GET", worker, "/app/echo?three")]


def test_control_and_tap_sockets_are_private(app_stack: tuple[Stack, str]) -> None:
    _, control = app_stack
    for path in (ipc_path(control), ipc_path(tap_endpoint(control))):
        st = path.stat()
        assert stat.S_ISSOCK(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o600
    directory = ipc_path(control).parent.stat()
    assert stat.S_IMODE(directory.st_mode) == 0o700 and directory.st_uid == os.geteuid()


def test_unreachable_broker_is_a_clear_error(short_dir: Path) -> None:
    missing = ctl(f"ipc://{short_dir}/none.ctl", "status")
    assert missing.returncode == 3
    assert "no broker control socket at" in missing.stderr and "Traceback" not in missing.stderr
    stale = short_dir / "stale.ctl"  # a socket file nobody listens on (a crashed broker's)
    with socket.socket(socket.AF_UNIX) as sock:
        sock.bind(str(stale))
    done = ctl(f"ipc://{stale}", "--timeout", "1", "status")
    assert done.returncode == 3 and "no answer from" in done.stderr
    tcp = ctl("tcp://127.0.0.1:1", "status")
    assert tcp.returncode == 2 and "expected ipc:///PATH" in tcp.stderr


def test_drain_worker_moves_traffic_to_the_other_with_no_failed_request(
        fresh_stack: Stack, short_dir: Path) -> None:
    control = f"ipc://{short_dir}/b.ctl"
    fresh_stack.start_mongrel2()
    fresh_stack.start_broker("--control", control)
    for _ in range(2):
        fresh_stack.start_pool("e2e_apps:app", service="app", routes=("/app",), threads=2)
    wait_for(lambda: len(status(control)["workers"]) == 2, what="two workers")
    fresh_stack.wait_ok("/app/pid")
    drained = status(control)["workers"][0]["label"]
    drained_pid = int(drained.rpartition(":")[2])
    with Load(lambda n: fresh_stack.url(f"/app/pid?{n}"), clients=4) as load:
        load.wait_more(40)
        done = ctl(control, "drain", drained)
        assert done.returncode == 0, done.stderr
        assert done.stdout.splitlines() == [
            f"worker {drained}: 1 worker(s) asked to finish and leave", f"  {drained}"]
        wait_for(lambda: drained not in [w["label"] for w in status(control)["workers"]],
                 what="the drained worker to leave")
        load.wait_more(40)
    assert set(load.outcomes) == {"2xx"}, load.outcomes
    pids = {requests.get(fresh_stack.url("/app/pid"), timeout=10).json()["pid"]
            for _ in range(20)}
    assert drained_pid not in pids


def _shutdown_with_a_request_at_the_app(stack: Stack, short_dir: Path, sleep_s: int,
                                        *shutdown: str
                                        ) -> tuple[str, Any, list[requests.Response]]:
    """A broker with a control socket, a request sleeping `sleep_s` at the
    app, and `ctl shutdown [*shutdown]` sent while it runs; the broker must
    exit 0. Returns the control endpoint, ctl's result and the answers."""
    control = f"ipc://{short_dir}/b.ctl"
    marks = stack.tmp / "marks"
    marks.mkdir()
    stack.start_mongrel2()
    broker = stack.start_broker("--control", control)
    stack.start_pool("e2e_apps:app", service="app", routes=("/app",), threads=2,
                     env={"E2E_MARK_DIR": str(marks)})
    stack.wait_ok("/app/x")
    answers: list[requests.Response] = []
    client = threading.Thread(target=lambda: answers.append(
        requests.get(stack.url(f"/app/sleep?{sleep_s}"), timeout=30)))
    client.start()
    try:
        wait_for(lambda: any(marks.iterdir()), what="the request to reach the app")
        done = ctl(control, "shutdown", *shutdown)
        assert done.returncode == 0, done.stderr
        assert broker.popen.wait(20) == 0
    finally:
        client.join(35)
    return control, done, answers


def test_shutdown_graceful_finishes_requests_in_flight(fresh_stack: Stack,
                                                       short_dir: Path) -> None:
    control, done, answers = _shutdown_with_a_request_at_the_app(
        fresh_stack, short_dir, 2, "--graceful")
    assert "stopping gracefully" in done.stdout
    assert [(r.status_code, r.json()) for r in answers] == [(200, {"slept": 2.0})]
    assert not ipc_path(control).exists()  # the broker removed its socket files
    assert ctl(control, "status").returncode == 3


def test_shutdown_without_graceful_answers_requests_in_flight_with_503(
        fresh_stack: Stack, short_dir: Path) -> None:
    _, done, answers = _shutdown_with_a_request_at_the_app(fresh_stack, short_dir, 10)
    assert "stopping now" in done.stdout
    assert [r.status_code for r in answers] == [503]
