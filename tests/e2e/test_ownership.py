"""Broker state learned from workers, end to end: route ownership, the route
lifecycle (BYE vs crash, grace), outlier ejection, a HELLO flood, negotiated
heartbeats, and a relay closing the connections of a broker that was killed.

Real Mongrel2, relay, broker and `scale0 wsgi` processes; rogue and silent
workers are raw ZeroMQ DEALERs speaking S0W1, as an attacker's would be.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
import requests
import zmq

from scale0.wire import s0w1 as p

from .conftest import ROOT, Proc, Stack, free_port, wait_for


def control_of(broker: Proc) -> str:
    return next(w.split("=", 1)[1] for w in broker.ready_line.split()
                if w.startswith("control="))


def status(broker: Proc) -> dict[str, Any]:
    done = subprocess.run([sys.executable, "-m", "scale0.cli", "ctl", "--control",
                           control_of(broker), "--json", "status"], capture_output=True,
                          text=True, timeout=30, cwd=ROOT, check=False)
    assert done.returncode == 0, done.stderr
    result: dict[str, Any] = json.loads(done.stdout)
    return result


def script_name(stack: Stack, path: str) -> str | int:
    """SCRIPT_NAME the app saw for `path` (which service served it), or the status."""
    r = requests.get(stack.url(path + "/environ"), timeout=10)
    return str(r.json()["SCRIPT_NAME"]) if r.status_code == 200 else r.status_code


@pytest.fixture
def ctx() -> Iterator[zmq.Context[zmq.Socket[bytes]]]:
    context: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    try:
        yield context
    finally:
        context.destroy(linger=0)


class RawWorker:
    """A DEALER that speaks S0W1 by hand. With `beat`, a thread keeps it
    alive (HEARTBEAT every 0.3 s) and never answers a request."""

    def __init__(self, ctx: zmq.Context[zmq.Socket[bytes]], endpoint: str) -> None:
        self.sock = ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.connect(endpoint)
        self.requests = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def hello(self, services: dict[str, tuple[str, ...]], capacity: int = 1) -> None:
        specs = tuple(p.ServiceSpec(name, routes) for name, routes in services.items())
        self.sock.send_multipart([p.VERSION, p.CMD[p.Command.HELLO],
                                  p.Hello(specs, capacity, worker="raw").encode()])

    def answer(self, timeout_s: float = 10.0) -> list[bytes]:
        """The broker's first answer that is not a HEARTBEAT."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.sock.poll(100):
                frames = self.sock.recv_multipart()
                if frames[1] != p.CMD[p.Command.HEARTBEAT]:
                    return frames
        raise AssertionError("no answer from the broker")

    def beat(self) -> None:
        def run() -> None:
            next_beat = 0.0
            while not self._stop.is_set():
                if self.sock.poll(50):
                    frames = self.sock.recv_multipart()
                    if frames[1] == p.CMD[p.Command.REQUEST]:
                        self.requests += 1  # and never answered
                if time.monotonic() >= next_beat:
                    next_beat = time.monotonic() + 0.3
                    self.sock.send_multipart([p.VERSION, p.CMD[p.Command.HEARTBEAT]])

        self._thread = threading.Thread(target=run, daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)
        self.sock.close(0)


# ---- route ownership ---------------------------------------------------------------


def test_a_hello_for_another_service_on_a_served_route_is_refused_and_shown(
        fresh_stack: Stack, ctx: zmq.Context[zmq.Socket[bytes]]) -> None:
    s = fresh_stack
    s.start_mongrel2()
    metrics_port = free_port()
    broker = s.start_broker("--metrics", str(metrics_port))
    s.start_pool("e2e_apps:app", service="app", routes=("/",))
    s.wait_ok("/")
    rogue = RawWorker(ctx, s.broker_endpoints[0])
    try:
        rogue.hello({"evil": ("/", "/admin")}, capacity=10_000)
        answer = rogue.answer()
        assert answer[1:3] == [p.CMD[p.Command.ERROR], b"409"]
        assert answer[3] == (b"route / belongs to service app (workers of that service); "
                             b"not taken over by service evil")
    finally:
        rogue.close()
    # A real pool of another service on the same route is refused too: it exits (3).
    argv = [sys.executable, "-m", "scale0.cli", "wsgi", "e2e_apps:app", "--service", "other",
            "--route", "/", "--connect", s.broker_endpoints[0]]
    env = {**os.environ, "PYTHONPATH": f"{ROOT / 'tests' / 'e2e'}{os.pathsep}{ROOT}"}
    done = subprocess.run(argv, env=env, cwd=s.tmp, capture_output=True, text=True,
                          timeout=60, check=False)
    assert done.returncode == 3, done.stderr[-2000:]
    assert "route / belongs to service app" in done.stderr
    for _ in range(20):  # every request still reaches the owner
        assert script_name(s, "/admin") == ""
    st = status(broker)
    assert st["counters"]["hello_conflicts"] == 2
    assert [r["code"] for r in st["refused_hellos"]] == [409, 409]
    assert sorted(sv["name"] for sv in st["services"]) == ["app"]
    text = subprocess.run([sys.executable, "-m", "scale0.cli", "ctl", "--control",
                           control_of(broker), "status"], capture_output=True, text=True,
                          timeout=30, cwd=ROOT, check=True).stdout
    assert "REFUSED HELLO" in text and "not taken over by service other" in text
    metrics = requests.get(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10).text
    wait_for(lambda: 'scale0_hellos_refused_total{reason="route_owned"} 2.0' in requests.get(
        f"http://127.0.0.1:{metrics_port}/metrics", timeout=10).text,
        what="the refusals in /metrics")
    assert "scale0_state_limit" in metrics


# ---- route lifecycle -------------------------------------------------------------


def test_bye_removes_a_route_at_once_a_crash_keeps_it_503_for_the_grace(
        fresh_stack: Stack) -> None:
    s = fresh_stack
    s.start_mongrel2()
    broker = s.start_broker("--route-grace", "4")
    s.start_pool("e2e_apps:app", service="site", routes=("/",))
    api = s.start_pool("e2e_apps:app", service="api", routes=("/api",))
    s.wait_ok("/api/x")
    assert script_name(s, "/api") == "/api"
    # A graceful stop: BYE, the route goes now and / serves /api.
    assert api.stop() == 0
    assert script_name(s, "/api") == ""
    assert "/api" not in json.dumps(status(broker)["services"])
    # A crash: the route stays, 503 with Retry-After, until the grace ends.
    api = s.start_pool("e2e_apps:app", service="api", routes=("/api",))
    wait_for(lambda: script_name(s, "/api") == "/api", what="api back")
    api.kill_group()
    api.popen.wait(10)

    def answer() -> requests.Response:
        return requests.get(s.url("/api/environ"), timeout=10)

    # (a list: a Response with a 5xx status is falsy)
    refused = wait_for(lambda: [r for r in [answer()] if r.status_code == 503],
                       timeout_s=15, what="503 while /api has no worker")[0]
    assert refused.headers["Retry-After"] == "5"
    assert status(broker)["orphaned_routes"][0]["route"] == "/api"
    wait_for(lambda: script_name(s, "/api") == "", timeout_s=20,
             what="/api forgotten after the grace, served by /")
    st = status(broker)
    assert st["counters"]["routes_forgotten"] == 1
    assert sorted(sv["name"] for sv in st["services"]) == ["site"]


# ---- outlier ejection -------------------------------------------------------------


def test_a_silent_worker_is_ejected_after_timeouts_in_a_row(
        fresh_stack: Stack, ctx: zmq.Context[zmq.Socket[bytes]]) -> None:
    s = fresh_stack
    s.start_mongrel2()
    broker = s.start_broker("--request-timeout", "0.5", "--eject-after", "3",
                            "--eject-time", "600")
    s.start_pool("e2e_apps:app", service="app", routes=("/",), threads=1)
    s.wait_ok("/")
    silent = RawWorker(ctx, s.broker_endpoints[0])
    try:
        silent.hello({"app": ("/",)}, capacity=10_000)
        assert silent.answer()[1] == p.CMD[p.Command.WELCOME]
        silent.beat()
        statuses = [requests.get(s.url("/"), timeout=30).status_code for _ in range(30)]
        assert statuses.count(504) == 3 and statuses.count(200) == 27, statuses
        assert silent.requests == 3
        st = status(broker)
        raw = next(w for w in st["workers"] if w["label"] == "raw")
        assert raw["ejected_s"] > 0 and st["counters"]["ejections"] == 1
        app = next(sv for sv in st["services"] if sv["name"] == "app")
        assert (app["ejected"], app["capacity"]) == (1, 1)  # its 10,000 slots do not count
    finally:
        silent.close()


# ---- bounded state under a HELLO flood ------------------------------------------


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        line = next(line for line in f if line.startswith("VmRSS:"))
    return int(line.split()[1])


def test_a_hello_flood_leaves_the_broker_flat_and_serving(
        fresh_stack: Stack, ctx: zmq.Context[zmq.Socket[bytes]]) -> None:
    s = fresh_stack
    s.start_mongrel2()
    metrics_port = free_port()
    broker = s.start_broker("--metrics", str(metrics_port), "--route-grace", "1")
    s.start_pool("e2e_apps:app", service="app", routes=("/",))
    s.wait_ok("/")
    metrics_url = f"http://127.0.0.1:{metrics_port}/metrics"
    before_kib = rss_kib(broker.popen.pid)
    answers: dict[bytes, int] = {}
    for batch in range(30):  # 900 HELLOs, 30 identities at a time
        socks = []
        for j in range(30):
            i = batch * 30 + j
            w = RawWorker(ctx, s.broker_endpoints[0])
            group = i // 10  # every 10 identities announce the same 64 services
            w.hello({f"s{group}-{k}": tuple(f"/g{group}/s{k}/r{r}" for r in range(4))
                     for k in range(64)}, capacity=10)
            socks.append((i, w))
        for i, w in socks:
            code = w.answer()
            answers[code[1] if code[1] != p.CMD[p.Command.ERROR] else code[2]] = \
                answers.get(code[1] if code[1] != p.CMD[p.Command.ERROR] else code[2], 0) + 1
            if i % 2:  # half leave, half go silent
                w.sock.send_multipart([p.VERSION, p.CMD[p.Command.BYE]])
            w.close()
        assert requests.get(s.url("/"), timeout=10).status_code == 200
    assert answers[b"429"] > 800 and answers[p.CMD[p.Command.WELCOME]] > 0, answers
    st = status(broker)  # still answering
    assert len(st["services"]) <= 256 and st["limits"]["services"][1] == 256
    assert len(requests.get(metrics_url, timeout=10).content) < 512 * 1024
    for _ in range(20):
        assert requests.get(s.url("/"), timeout=10).status_code == 200
    # The silent ones expire, their routes' grace ends: all of it is forgotten.
    wait_for(lambda: [sv["name"] for sv in status(broker)["services"]] == ["app"],
             timeout_s=30, interval_s=0.5, what="the flood's services forgotten")
    after_kib = rss_kib(broker.popen.pid)
    print(f"broker RSS {before_kib} KiB before the flood, {after_kib} KiB after; {answers}")
    assert after_kib - before_kib < 64 * 1024, (before_kib, after_kib)
    # /metrics reads a snapshot the loop replaces every 0.5 s.
    wait_for(lambda: len(requests.get(metrics_url, timeout=10).content) < 16 * 1024,
             what="/metrics back to one service")


# ---- negotiated heartbeats -----------------------------------------------------


@pytest.mark.parametrize(("broker_args", "pool_args"), [
    (("--heartbeat", "5"), ()),  # a slow broker, default workers
    ((), ("--heartbeat", "5")),  # default broker, slow workers
], ids=["slow-broker", "slow-workers"])
def test_a_heartbeat_mismatch_works_both_ways(fresh_stack: Stack, broker_args: tuple[str, ...],
                                              pool_args: tuple[str, ...]) -> None:
    s = fresh_stack
    s.start_mongrel2()
    broker = s.start_broker(*broker_args, "--graceful-timeout", "5")
    s.start_pool("e2e_apps:app", *pool_args, service="app", routes=("/",), processes=2)
    s.wait_ok("/", timeout_s=40)  # a 5 s broker heartbeat: 15 s startup grace
    workers = status(broker)["workers"]
    first = {w["id"] for w in workers}
    assert len(first) == 4  # 2 processes x 2 threads, each thread a worker
    start_age = min(w["age_s"] for w in workers)
    statuses: list[int] = []

    def old_enough() -> bool:
        for i in range(5):
            r = requests.post(s.url("/echo"), data=b"x" * (i + 1), timeout=30)
            statuses.append(r.status_code)
        workers = status(broker)["workers"]
        assert {w["id"] for w in workers} == first, "a worker reconnected"
        # The same registrations 12 s on: well past 3 s, the old expiry either way.
        return min(w["age_s"] for w in workers) > start_age + 12.0

    wait_for(old_enough, timeout_s=60, interval_s=0.2, what="workers to stay 12 s")
    assert set(statuses) == {200} and len(statuses) >= 25


# ---- a killed broker behind a relay ----------------------------------------------


def test_a_killed_broker_behind_a_relay_does_not_leave_its_clients_hanging(
        fresh_stack: Stack) -> None:
    s = fresh_stack
    s.start_mongrel2()
    relay_endpoint = f"tcp://127.0.0.1:{free_port()}"
    relay = Proc("relay", [sys.executable, "-m", "scale0.cli", "relay", "--mongrel2",
                           s.send_spec, "--bind", relay_endpoint, "--mongrel2-recv",
                           s.recv_spec], s.tmp)
    s.procs.append(relay)
    relay.wait_ready()
    s.link = f"relay+{relay_endpoint},{s.recv_spec}"
    brokers = [s.start_broker("--heartbeat", "0.5") for _ in range(2)]
    s.start_pool("e2e_apps:app", "--heartbeat", "0.5", service="app", routes=("/",),
                 threads=4)
    s.wait_ok("/")
    for broker in brokers:
        # --threads 4: four workers (one per thread) at each broker.
        wait_for(lambda b=broker: len(status(b)["workers"]) == 4, what="both brokers serve")
    result: dict[str, Any] = {}

    def slow_request() -> None:
        try:
            r = requests.get(s.url("/sleep"), params="60", timeout=(5, 15))
            result["status"] = r.status_code
        except requests.ConnectionError as exc:  # closed by Mongrel2: what we want
            result["closed"] = exc
        except requests.Timeout as exc:  # hanging: what must not happen
            result["timeout"] = exc

    client = threading.Thread(target=slow_request)
    client.start()
    holder = wait_for(lambda: next((b for b in brokers if status(b)["requests"]), None),
                      what="the broker holding the slow request")
    holder.popen.send_signal(signal.SIGKILL)
    holder.popen.wait(10)
    # The relay expires it after 0.5 s x 3 and closes its connections; the
    # client's 15 s read timeout is the bound (the request sleeps 60 s).
    client.join(30)
    assert not client.is_alive()
    assert "timeout" not in result, "the client was left hanging"
    assert "closed" in result or result["status"] >= 500, result
    other = next(b for b in brokers if b is not holder)
    for _ in range(10):
        assert requests.get(s.url("/"), timeout=10).status_code == 200
    assert status(other)["counters"]["replies"] >= 10


# ---- maximum message size -------------------------------------------------------


def test_a_worker_sending_a_huge_frame_is_cut_off_while_big_replies_pass(
        fresh_stack: Stack, ctx: zmq.Context[zmq.Socket[bytes]]) -> None:
    s = fresh_stack
    s.start_mongrel2()
    broker = s.start_broker()
    s.start_pool("e2e_apps:app", service="app", routes=("/",))
    s.wait_ok("/")
    # A reply of several 1 MiB pieces (scale0/worker/process.py's largest) goes through.
    big = requests.get(s.url("/blob"), params="3000000", timeout=30)
    assert big.status_code == 200 and len(big.content) == 3_000_000
    raw = RawWorker(ctx, s.broker_endpoints[0])
    try:
        raw.hello({"app": ("/",)})
        assert raw.answer()[1] == p.CMD[p.Command.WELCOME]
        raw.sock.send_multipart([p.VERSION, p.CMD[p.Command.REPLY], b"\0" * 8, p.FLAG_LAST,
                                 b"x" * (3 << 20)])
        # libzmq dropped that connection unread; the DEALER reconnects as a
        # stranger, so its heartbeats are answered BYE ("say HELLO again").
        # (Heartbeats sent before the drop are lost with it: keep sending.)
        def bye() -> bool:
            raw.sock.send_multipart([p.VERSION, p.CMD[p.Command.HEARTBEAT]])
            while raw.sock.poll(200):
                if raw.sock.recv_multipart()[1] == p.CMD[p.Command.BYE]:
                    return True
            return False

        wait_for(bye, what="BYE to the reconnected stranger")
    finally:
        raw.close()
    st = status(broker)
    assert st["counters"]["late_replies"] == 0 and st["counters"]["bad_worker"] == 0
    assert requests.get(s.url("/"), timeout=10).status_code == 200
