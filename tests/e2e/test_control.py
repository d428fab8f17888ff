"""`scale0 ctl` against a real broker, Mongrel2 and workers: status, drain,
undrain, recycle, routes, tap, shutdown, and who may reach the control socket."""

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

from scale0.ops.control import default_endpoint, ipc_path, tap_endpoint

from .conftest import ROOT, Load, Proc, Stack, wait_for
from .metrics_scrape import metrics_url, scrape, value


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


def test_status_shows_service_route_and_workers_with_growing_served_count(
        app_stack: tuple[Stack, str]) -> None:
    stack, control = app_stack
    st = status(control)
    (service,) = [s for s in st["services"] if s["name"] == "app"]
    # --threads 2: two loops, each a worker of capacity 1 labelled host:pid/k.
    assert service["routes"] == ["/app"] and service["workers"] == 2
    workers = st["workers"]
    assert [(w["services"], w["capacity"]) for w in workers] == [(["app"], 1)] * 2
    assert sorted(w["label"].rpartition("/")[2] for w in workers) == ["0", "1"]
    assert len({w["label"].rpartition("/")[0] for w in workers}) == 1  # one process
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
    rows = [line.split() for line in lines
            if line.startswith(tuple(w["label"] for w in workers))]
    assert [row[2:5] for row in rows] == [["app", "0/1+8", "ready"]] * 2  # --prefetch 8
    assert sum(int(row[-1]) for row in rows) == before + 5


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
    workers = {w["label"] for w in status(control)["workers"]}
    assert [(ln[1], ln[2], ln[5]) for ln in lines] == [
        ("200", "GET", "/app/x?one"), ("500", "GET", "/app/fail"),
        ("200", "GET", "/app/echo?three")]
    assert {ln[4] for ln in lines} <= workers  # each line names the loop that served it


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
    assert missing.stderr.startswith("scale0 ctl: no broker control socket at ")
    assert missing.stderr.count("\n") == 1  # one line, no traceback
    stale = short_dir / "stale.ctl"  # a socket file nobody listens on (a crashed broker's)
    with socket.socket(socket.AF_UNIX) as sock:
        sock.bind(str(stale))
    done = ctl(f"ipc://{stale}", "--timeout", "1", "status")
    assert done.returncode == 3 and done.stderr.count("\n") == 1
    assert f"nothing listens on {stale}: the broker is not running" in done.stderr
    tcp = ctl("tcp://127.0.0.1:1", "status")
    assert tcp.returncode == 2 and "expected ipc:///PATH" in tcp.stderr


def _as_nobody(*argv: str) -> subprocess.CompletedProcess[str]:
    if os.geteuid() != 0:
        pytest.skip("needs root to run ctl as another user")
    return subprocess.run(["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups",
                           *argv], capture_output=True, text=True, timeout=30, cwd="/",
                          check=False)


def test_a_user_who_may_not_reach_the_socket_gets_one_line(app_stack: tuple[Stack, str],
                                                           short_dir: Path) -> None:
    _, control = app_stack  # /run/scale0/broker-PORT.ctl: 0600 in a 0700 folder
    done = _as_nobody(*ctl_argv(control, "status", "--json"))
    assert done.returncode == 3, done
    assert done.stderr == (f"scale0 ctl: permission denied on {ipc_path(control)}: run "
                           "scale0 ctl as the broker's user (or root), or pass --control\n")
    # nobody's own default socket (in its runtime folder) does not exist
    done = _as_nobody(sys.executable, "-m", "scale0.cli", "ctl", "status")
    assert done.returncode == 3 and done.stderr.count("\n") == 1, done
    assert done.stderr.startswith("scale0 ctl: no broker control socket at ")


def test_options_after_the_command(app_stack: tuple[Stack, str]) -> None:
    _, control = app_stack
    done = subprocess.run([sys.executable, "-m", "scale0.cli", "ctl", "status", "--json",
                           "--control", control, "--log-level", "info"],
                          capture_output=True, text=True, timeout=30, check=False)
    assert done.returncode == 0, done.stderr
    assert [s["name"] for s in json.loads(done.stdout)["services"]] == ["app"]


def _two_pools(stack: Stack, short_dir: Path, *broker_args: str) -> str:
    control = f"ipc://{short_dir}/b.ctl"
    stack.start_mongrel2()
    stack.start_broker("--control", control, *broker_args)
    for _ in range(2):
        # One thread each: each pool is one worker (a thread is a worker, host:pid/k).
        stack.start_pool("e2e_apps:app", service="app", routes=("/app",), threads=1)
    wait_for(lambda: len(status(control)["workers"]) == 2, what="two workers")
    stack.wait_ok("/app/pid")
    return control


def _worker(control: str, label: str) -> dict[str, Any] | None:
    return next((w for w in status(control)["workers"] if w["label"] == label), None)


def test_drain_under_load_keeps_the_worker_listed_and_sends_it_nothing_until_undrain(
        fresh_stack: Stack, short_dir: Path) -> None:
    control = _two_pools(fresh_stack, short_dir, "--metrics", "127.0.0.1:0")
    metrics = metrics_url(fresh_stack.procs[1])
    label = status(control)["workers"][0]["label"]
    with Load(lambda n: fresh_stack.url(f"/app/pid?{n}"), clients=4) as load:
        load.wait_more(40)
        done = ctl(control, "drain", label)
        assert done.returncode == 0, done.stderr
        assert done.stdout.splitlines() == [
            f"worker {label}: 1 worker(s) draining: no new request, the ones in progress "
            "finish (undrain to undo)", f"  {label}"]
        w = wait_for(lambda: (x := _worker(control, label)) and not x["in_flight"] and x,
                     what="the drained worker to finish what it had")
        assert (w["state"], w["draining"]) == ("draining", True)
        load.wait_more(60)  # meanwhile only the other worker is sent requests
        after = _worker(control, label)
        assert after is not None and after["served"] == w["served"], (w, after)
        assert after["state"] == "draining"
        wait_for(lambda: value(scrape(metrics), "scale0_workers", service="app",
                               state="draining") == 1, 10, "metrics to show it draining")
        page = requests.get(metrics.removesuffix("metrics") + "status.json", timeout=5).json()
        assert [(w["draining"], w["state"]) for w in page["workers"]
                if w["label"] == label] == [(True, "draining")]
        text = ctl(control, "status")
        assert any(line.split()[:1] == [label] and "draining" in line.split()
                   for line in text.stdout.splitlines()), text.stdout
        done = ctl(control, "undrain", label)
        assert done.returncode == 0, done.stderr
        wait_for(lambda: (x := _worker(control, label)) and x["served"] > w["served"],
                 30, "the undrained worker to serve again")
        load.wait_more(20)
    assert set(load.outcomes) == {"2xx"}, load.outcomes
    assert _worker(control, label)["state"] == "ready"  # type: ignore[index]


def test_recycle_worker_is_replaced_by_its_pool_with_no_failed_request(
        fresh_stack: Stack, short_dir: Path) -> None:
    control = _two_pools(fresh_stack, short_dir)
    before = {w["label"] for w in status(control)["workers"]}
    recycled = sorted(before)[0]
    recycled_pid = int(recycled.rpartition(":")[2].partition("/")[0])  # host:pid/k
    with Load(lambda n: fresh_stack.url(f"/app/pid?{n}"), clients=4) as load:
        load.wait_more(40)
        done = ctl(control, "recycle", recycled)
        assert done.returncode == 0, done.stderr
        assert done.stdout.splitlines() == [
            f"worker {recycled}: 1 worker(s) asked to finish and leave (their pool starts "
            "new ones)", f"  {recycled}"]
        labels = wait_for(lambda: (now := {w["label"] for w in status(control)["workers"]})
                          and recycled not in now and len(now) == 2 and now,
                          30, "the pool to replace the recycled worker")
        load.wait_more(40)
    assert set(load.outcomes) == {"2xx"}, load.outcomes
    assert len(labels - before) == 1  # a new process, in the pool of the recycled one
    pids = {requests.get(fresh_stack.url("/app/pid"), timeout=10).json()["pid"]
            for _ in range(20)}
    assert recycled_pid not in pids


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
