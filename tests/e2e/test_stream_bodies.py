"""Request bodies streamed over ZeroMQ (Mongrel2 upload.stream=1, issue 11):
real Mongrel2, relay, broker and a worker with no --upload-dir, driven by
curl, requests and raw sockets."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from .conftest import Proc, Stack, free_port, wait_for

STREAM = {"upload.stream": 1}
APP = "stream_apps:app"


@pytest.fixture(scope="module")
def streamed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """Mongrel2 with upload.stream=1 -> relay -> broker -> a worker with no upload folder."""
    s = Stack(tmp_path_factory.mktemp("streamed"), m2_settings=STREAM)
    try:
        s.start_mongrel2()
        s.start_relay()
        s.start_broker("--max-body", "300000000", "--request-timeout", "30")
        s.start_pool(APP, service="app", routes=("/",), threads=2, upload_dir=False)
        s.wait_ok("/hash")
        yield s
    finally:
        s.stop()


def spooled(stack: Stack) -> list[str]:
    return sorted(p.name for p in stack.m2.upload_dir.iterdir())


def children(pid: int) -> list[int]:
    path = Path(f"/proc/{pid}/task/{pid}/children")
    return [int(x) for x in path.read_text().split()] if path.exists() else []


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def proc(stack: Stack, prefix: str) -> Proc:
    return next(p for p in stack.procs if p.name.startswith(prefix))


def worker_pids(stack: Stack) -> list[int]:
    return children(proc(stack, "pool").popen.pid)


def test_a_5mb_post_and_a_chunked_300kb_post_arrive_intact(streamed: Stack,
                                                           tmp_path: Path) -> None:
    body = os.urandom(5_000_000)
    r = requests.post(streamed.url("/hash"), data=body, timeout=30)
    assert r.status_code == 200, r.text
    assert (r.json()["length"], r.json()["sha256"]) == (len(body), hashlib.sha256(body).hexdigest())
    assert r.json()["content_length"] == str(len(body))
    chunked = os.urandom(300_000)
    (tmp_path / "body").write_bytes(chunked)
    out = subprocess.run(
        ["curl", "-sS", "--max-time", "30", "-H", "Transfer-Encoding: chunked",
         "--data-binary", f"@{tmp_path / 'body'}", streamed.url("/hash")],
        capture_output=True, check=True, timeout=40).stdout
    got = json.loads(out)
    assert (got["length"], got["sha256"]) == (len(chunked), hashlib.sha256(chunked).hexdigest())
    assert got["transfer_encoding"] == "chunked" and got["content_length"] is None
    gen = requests.post(streamed.url("/hash"), data=iter([b"a" * 70_000, b"b" * 5]), timeout=30)
    assert gen.json()["length"] == 70_005
    assert spooled(streamed) == []  # streamed: Mongrel2 wrote nothing to disk


class Generated:
    """`size` bytes made on the fly from `block`, read by requests like a file
    (it sends a Content-Length from __len__)."""

    def __init__(self, block: bytes, size: int) -> None:
        self.block, self.size, self.left, self.pos = block, size, size, 0

    def __len__(self) -> int:
        return self.size

    def read(self, n: int = -1) -> bytes:
        n = min(self.left, len(self.block) if n < 0 else n)
        out = bytearray()
        while len(out) < n:
            take = min(n - len(out), len(self.block) - self.pos)
            out += self.block[self.pos:self.pos + take]
            self.pos = (self.pos + take) % len(self.block)
        self.left -= n
        return bytes(out)


def test_a_200mb_upload_stays_out_of_every_memory(streamed: Stack) -> None:
    """200 MB generated on the fly; the RSS of the relay, the broker and the
    worker is sampled during the upload and must not grow by anything like it."""
    pids = {"relay": proc(streamed, "relay").popen.pid,
            "broker": proc(streamed, "broker").popen.pid,
            **{f"worker{i}": pid for i, pid in enumerate(worker_pids(streamed))}}
    before = {name: rss_kib(pid) for name, pid in pids.items()}
    peak = dict(before)
    size, block = 200 << 20, os.urandom(1 << 20)
    result: dict[str, object] = {}

    def upload() -> None:
        r = requests.post(streamed.url("/hash"), data=Generated(block, size), timeout=120)
        result["r"] = r

    thread = threading.Thread(target=upload)
    thread.start()
    while thread.is_alive():
        for name, pid in pids.items():
            peak[name] = max(peak[name], rss_kib(pid))
        thread.join(0.05)
    r = result["r"]
    assert isinstance(r, requests.Response) and r.status_code == 200, r
    digest = hashlib.sha256()
    for _ in range(size // len(block)):
        digest.update(block)
    assert (r.json()["length"], r.json()["sha256"]) == (size, digest.hexdigest())
    growth_mib = {name: (peak[name] - before[name]) / 1024 for name in pids}
    print("RSS growth during a 200 MiB upload (MiB):", growth_mib)
    assert all(g < 40 for g in growth_mib.values()), growth_mib  # a 200 MiB body: nowhere whole
    assert spooled(streamed) == []


def _raw_upload(stack: Stack, path: str, length: int) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", stack.http_port), timeout=10)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 64 << 10)
    sock.sendall(b"POST %s HTTP/1.1\r\nHost: localhost\r\nContent-Length: %d\r\n\r\n"
                 % (path.encode(), length))
    return sock


def _send_until_blocked(sock: socket.socket, block: bytes, limit: int) -> int:
    """Send `block`s until one blocks for 2 s (the receiver stopped reading) or
    `limit` bytes went; the bytes sent."""
    sent = 0
    sock.settimeout(2.0)
    while sent < limit:
        try:
            n = sock.send(block)
        except TimeoutError:
            return sent
        sent += n
    return sent


def _response(sock: socket.socket) -> tuple[int, bytes]:
    """The status and body of the HTTP response read from `sock`."""
    sock.settimeout(30)
    data = b""
    while b"\r\n\r\n" not in data:
        piece = sock.recv(65536)
        if not piece:
            raise AssertionError(f"connection closed before a response: {data!r}")
        data += piece
    head, _, body = data.partition(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
    while len(body) < length:
        piece = sock.recv(65536)
        if not piece:
            break
        body += piece
    return int(head[9:12]), body


def test_a_slow_app_paces_the_client(streamed: Stack, tmp_path: Path) -> None:
    """The app reads 64 KiB and waits: the client's send blocks with the
    body far from sent, and goes on once the app reads again."""
    size, block = 64 << 20, b"p" * 65536
    flag = tmp_path / "go"
    sock = _raw_upload(streamed, f"/slow?{flag}", size)
    with sock:
        sent = _send_until_blocked(sock, block, size)
        wait_for(lambda: Path(f"{flag}.read").exists(), 30, "the app to read its first 64 KiB")
        # Blocked: what is on its way is one credit window plus the kernel's
        # socket buffers (a few MiB on loopback), nowhere near the 64 MiB.
        print("sent before the client blocked:", sent)
        assert sent < 24 << 20, sent
        flag.touch()
        sock.settimeout(60)
        rest = size - sent
        while rest:
            rest -= sock.send(block[:min(len(block), rest)])
        status, answer = _response(sock)
    assert status == 200, answer[:200]
    got = json.loads(answer)
    assert got["length"] == size
    assert got["sha256"] == hashlib.sha256(block * (size // len(block))).hexdigest()


def test_max_body_is_413_at_the_start_and_once_a_chunked_body_passes_it(
        tmp_path: Path) -> None:
    s = Stack(tmp_path, m2_settings=STREAM)
    try:
        s.start_mongrel2()
        s.start_broker("--max-body", "1000000")
        s.start_pool(APP, service="app", routes=("/",), threads=1, upload_dir=False)
        s.wait_ok("/hash")
        sock = _raw_upload(s, "/hash", 2_000_000)  # declared: refused before any body
        with sock:
            assert _response(sock)[0] == 413
        parts = (b"c" * 65536 for _ in range(40))  # 2.6 MB, chunked: no length said
        r = requests.post(s.url("/hash"), data=parts, timeout=30)
        assert r.status_code == 413
        ok = requests.post(s.url("/hash"), data=b"k" * 900_000, timeout=30)
        assert ok.status_code == 200 and ok.json()["length"] == 900_000
        assert spooled(s) == []
    finally:
        s.stop()


def _status(s: Stack) -> dict[str, object]:
    out = subprocess.run(
        [sys.executable, "-m", "scale0.cli", "ctl", "--broker", s.broker_endpoints[0],
         "--json", "status"], capture_output=True, text=True, timeout=20, cwd=s.tmp)
    return json.loads(out.stdout) if out.returncode == 0 else {}


def _in_flight(s: Stack) -> int:
    status = _status(s)
    workers = status.get("workers") or []
    assert isinstance(workers, list)
    return sum(int(w["in_flight"]) for w in workers)


def test_a_worker_killed_mid_upload_and_a_client_gone_mid_upload(tmp_path: Path) -> None:
    s = Stack(tmp_path, m2_settings=STREAM)
    try:
        s.start_mongrel2()
        s.start_broker("--request-timeout", "120")
        s.start_pool(APP, service="app", routes=("/",), threads=1, upload_dir=False)
        s.wait_ok("/hash")
        # The worker is SIGKILLed while it reads: the client gets 502, the
        # stack serves the next upload, nothing was written to disk.
        flag = tmp_path / "never"
        sock = _raw_upload(s, f"/slow?{flag}", 50 << 20)
        with sock:
            _send_until_blocked(sock, b"k" * 65536, 50 << 20)
            wait_for(lambda: Path(f"{flag}.read").exists(), 30, "the app to read")
            os.kill(int(Path(f"{flag}.read").read_text()), signal.SIGKILL)
            assert _response(sock)[0] == 502
        assert spooled(s) == []
        body = os.urandom(3_000_000)
        r = wait_for(lambda: requests.post(s.url("/hash"), data=body, timeout=30), 30,
                     "the replaced worker")
        assert r.status_code == 200 and r.json()["sha256"] == hashlib.sha256(body).hexdigest()
        # The client leaves mid-body: its request ends at the worker (the slot
        # is free again) and nothing is left on disk.
        gone_before = _status(s)["counters"]["client_gone"]  # type: ignore[index]
        flag2 = tmp_path / "go2"
        sock = _raw_upload(s, f"/slow?{flag2}", 50 << 20)
        with sock:
            _send_until_blocked(sock, b"g" * 65536, 50 << 20)
            wait_for(lambda: Path(f"{flag2}.read").exists(), 30, "the app to read")
            assert _in_flight(s) == 1
        flag2.touch()  # the app reads on, finds the body cut short, and ends
        wait_for(lambda: _in_flight(s) == 0, 30, "the request to end at the worker")
        counters = _status(s)["counters"]
        assert isinstance(counters, dict)
        print("counters after the client left:", {k: v for k, v in counters.items() if v})
        assert counters["client_gone"] == gone_before + 1  # Mongrel2's disconnect, no timeout
        assert spooled(s) == []
        r = requests.post(s.url("/hash"), data=body, timeout=30)
        assert r.status_code == 200 and r.json()["length"] == len(body)
    finally:
        s.stop()


def test_a_broker_killed_mid_upload_behind_a_relay_closes_the_client(tmp_path: Path) -> None:
    """The relay (given Mongrel2's recv_spec) closes the connections of a
    broker it lost: a client whose upload was at that broker is not left
    waiting for credits that no broker will grant, and a new broker serves."""
    s = Stack(tmp_path, m2_settings=STREAM)
    try:
        s.start_mongrel2()
        endpoint = f"tcp://127.0.0.1:{free_port()}"
        relay = Proc("relay", [sys.executable, "-m", "scale0.cli", "relay", "--mongrel2",
                               s.send_spec, "--mongrel2-recv", s.recv_spec, "--bind", endpoint],
                     s.tmp)
        s.procs.append(relay)
        relay.wait_ready()
        s.link = f"relay+{endpoint},{s.recv_spec}"
        broker = s.start_broker("--request-timeout", "120")
        port = int(s.broker_endpoints[0].rsplit(":", 1)[1])
        s.start_pool(APP, service="app", routes=("/",), threads=1, upload_dir=False)
        s.wait_ok("/hash")
        flag = tmp_path / "go"
        sock = _raw_upload(s, f"/slow?{flag}", 50 << 20)
        with sock:
            _send_until_blocked(sock, b"r" * 65536, 50 << 20)
            wait_for(lambda: Path(f"{flag}.read").exists(), 30, "the app to read")
            broker.kill_group(signal.SIGKILL)
            broker.stop()  # reaped, its files closed
            s.start_broker("--request-timeout", "120", port=port)
            flag.touch()
            sock.settimeout(60)  # closed by the relay once it expires the lost broker
            try:
                assert sock.recv(65536) == b""
            except ConnectionResetError:
                pass
        body = os.urandom(2_000_000)
        r = wait_for(lambda: requests.post(s.url("/hash"), data=body, timeout=30), 30,
                     "the new broker to serve")
        assert r.status_code == 200 and r.json()["sha256"] == hashlib.sha256(body).hexdigest()
        assert spooled(s) == []
    finally:
        s.stop()


# ---- the ASGI worker (`scale0 asgi`) behind the same Mongrel2 settings ----------


@pytest.fixture(scope="module")
def streamed_asgi(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """Mongrel2 with upload.stream=1 -> broker -> a `scale0 asgi` worker."""
    s = Stack(tmp_path_factory.mktemp("streamed-asgi"), m2_settings=STREAM)
    try:
        s.start_mongrel2()
        s.start_broker("--request-timeout", "60")
        s.start_asgi("asgi_apps:raw", service="raw", routes=("/",), concurrency=4)
        s.wait_ok("/")
        yield s
    finally:
        s.stop()


def test_asgi_a_5mb_post_and_a_chunked_300kb_post_arrive_intact(streamed_asgi: Stack,
                                                                tmp_path: Path) -> None:
    body = os.urandom(5_000_000)
    r = requests.post(streamed_asgi.url("/echo"), data=body, timeout=30)
    assert r.status_code == 200, r.text  # not 501: the worker takes streamed bodies
    got = r.json()
    assert (got["size"], got["sha256"]) == (len(body), hashlib.sha256(body).hexdigest())
    assert got["pieces"] > 2  # it came as a stream of http.request events
    chunked = os.urandom(300_000)
    (tmp_path / "body").write_bytes(chunked)
    out = subprocess.run(
        ["curl", "-sS", "--max-time", "30", "-H", "Transfer-Encoding: chunked",
         "--data-binary", f"@{tmp_path / 'body'}", streamed_asgi.url("/echo")],
        capture_output=True, check=True, timeout=40).stdout
    got = json.loads(out)
    assert (got["size"], got["sha256"]) == (len(chunked), hashlib.sha256(chunked).hexdigest())
    assert spooled(streamed_asgi) == []  # streamed: Mongrel2 wrote nothing to disk


def _asgi_in_flight(s: Stack) -> int:
    workers = _status(s).get("workers") or []
    assert isinstance(workers, list)
    return sum(int(w["in_flight"]) for w in workers if "raw" in w["services"])


def test_asgi_a_client_gone_mid_upload_is_http_disconnect_and_frees_the_slot(
        streamed_asgi: Stack, tmp_path: Path) -> None:
    flag = tmp_path / "go"
    sock = _raw_upload(streamed_asgi, f"/held?{flag}", 50 << 20)
    with sock:
        sent = _send_until_blocked(sock, b"h" * 65536, 50 << 20)
        assert sent < 50 << 20  # the held app paces the client
        wait_for(lambda: Path(f"{flag}.read").exists(), 30, "the app to take its first piece")
        assert _asgi_in_flight(streamed_asgi) == 1
    flag.touch()  # the client is gone; the app reads on
    result = Path(f"{flag}.result")
    wait_for(lambda: result.exists() and result.read_text() == "disconnect", 30,
             "the app to see http.disconnect")
    wait_for(lambda: _asgi_in_flight(streamed_asgi) == 0, 30, "the slot to free")
    body = os.urandom(1_000_000)
    r = requests.post(streamed_asgi.url("/echo"), data=body, timeout=30)
    assert r.status_code == 200 and r.json()["sha256"] == hashlib.sha256(body).hexdigest()
    assert spooled(streamed_asgi) == []
