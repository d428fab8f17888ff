"""Mongrel2's download.flow_control on keep-alive connections, direct and through a relay.

Mongrel2 1.12 gives a connection 102400 bytes of download credits, says so
(DOWNLOAD_CREDITS) on its first request only, and closes the connection when
a reply message would leave more than that uncredited. So every reply on a
reused connection, not just the first, must stay within the window.
"""

from __future__ import annotations

import http.client
import subprocess
import sys
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from bench.procs import children

from .conftest import ROOT, Proc, Stack
from .e2e_apps import BIG

SIZES = (150_000, 1 << 20, 150_000, 98_304, 102_401, 1 << 20)


@pytest.fixture(scope="module", params=["direct", "relay"])
def fc_stack(request: pytest.FixtureRequest,
             tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    stack = Stack(tmp_path_factory.mktemp(f"fc-{request.param}"))  # flow control is on
    try:
        stack.start_mongrel2()
        if request.param == "relay":
            stack.start_relay()
        stack.start_broker()
        # Two processes: requests of one connection land on different workers.
        stack.start_pool("e2e_apps:app", service="app", routes=("/",), processes=2, threads=2)
        stack.wait_ok("/")
        yield stack
    finally:
        stack.stop()


def get(conn: http.client.HTTPConnection, path: str) -> tuple[bytes, int]:
    """GET on `conn`, expecting a 200 that keeps the connection; body and local port."""
    conn.request("GET", path)
    r = conn.getresponse()
    body = r.read()
    assert r.status == 200
    assert not r.will_close
    assert conn.sock is not None
    return body, conn.sock.getsockname()[1]


def test_big_replies_on_one_keep_alive_connection_arrive_whole(fc_stack: Stack) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", fc_stack.http_port, timeout=30)
    try:
        ports = []
        for size in SIZES:
            body, port = get(conn, f"/blob?{size}")
            assert body == b"z" * size
            ports.append(port)
        body, port = get(conn, "/big")  # 10 MiB, streamed in 64 KiB blocks
        assert len(body) == BIG
        ports.append(port)
        assert len(set(ports)) == 1, ports  # one TCP connection for them all
    finally:
        conn.close()


def test_curl_reuses_its_connection_for_big_replies(fc_stack: Stack) -> None:
    argv = ["curl", "-s"]
    for i, size in enumerate((150_000, 1 << 20, 150_000)):
        if i:
            argv.append("--next")
        argv += ["-o", "/dev/null", "-w", "%{http_code} %{size_download} %{num_connects}\\n",
                 fc_stack.url(f"/blob?{size}")]
    out = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=True)
    # num_connects: new connections made for that transfer (0: the connection was reused)
    assert out.stdout.splitlines() == ["200 150000 1", "200 1048576 0", "200 150000 0"]


def minor_faults(pid: int) -> int:
    """Pages `pid` (all its threads) has faulted in so far: field 10 of /proc/PID/stat."""
    return int(Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[7])


def fetch_megabytes(port: int, clients: int, each: int) -> None:
    """`clients` keep-alive connections at once, each GETting `each` 1 MiB replies."""
    def client() -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        try:
            for _ in range(each):
                body, _ = get(conn, f"/blob?{1 << 20}")
                assert len(body) == 1 << 20
        finally:
            conn.close()

    with ThreadPoolExecutor(clients) as pool:
        for done in [pool.submit(client) for _ in range(clients)]:
            done.result()


def test_large_replies_do_not_fault_their_buffers_in_again(fc_stack: Stack) -> None:
    """Each process on the path keeps its buffers for 1 MiB replies mapped
    from one reply to the next (scale0/deploy/malloc.py). With glibc's default
    thresholds, 16 connections at once made the broker fault pages (of 4 KiB)
    in again for each such reply."""
    clients = 16
    fetch_megabytes(fc_stack.http_port, clients, 5)  # heaps grow to their working size
    pids = {p.name: p.popen.pid for p in fc_stack.procs}
    for p in fc_stack.procs:
        if p.name.startswith("pool"):
            pids.update({f"{p.name} child {pid}": pid for pid in children(p.popen.pid)})
    assert sum(name.startswith("pool") for name in pids) == 3  # the pool, 2 processes
    before = {name: minor_faults(pid) for name, pid in pids.items()}
    each = 5
    fetch_megabytes(fc_stack.http_port, clients, each)
    per_reply = {name: (minor_faults(pid) - before[name]) / (clients * each)
                 for name, pid in pids.items()}
    # A 1 MiB buffer is 256 pages: under 16 per reply, at most one reply in 16
    # faulted a buffer in. Seen: at most 0.6, and 38-270 in the broker without.
    assert max(per_reply.values()) < 16, per_reply


def test_the_benchs_direct_handler_keeps_the_window_too(fresh_stack: Stack) -> None:
    fresh_stack.start_mongrel2()  # flow control on
    handler = Proc("direct_handler", [sys.executable, "-m", "bench.direct_handler",
                                      "--send-spec", fresh_stack.send_spec,
                                      "--recv-spec", fresh_stack.recv_spec],
                   fresh_stack.tmp, {"PYTHONPATH": str(ROOT)})
    fresh_stack.procs.append(handler)
    handler.wait_ready()
    conn = http.client.HTTPConnection("127.0.0.1", fresh_stack.http_port, timeout=30)
    try:
        ports = []
        for size in SIZES:
            body, port = get(conn, f"/bytes/{size}")
            assert body == b"x" * size
            ports.append(port)
        assert len(set(ports)) == 1, ports
    finally:
        conn.close()
