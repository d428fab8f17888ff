"""`scale0 asgi` end to end: real Mongrel2, broker and ASGI worker processes,
driven by requests. HTTP scope and bodies, streaming, errors, lifespan,
concurrency, Starlette and FastAPI apps."""

from __future__ import annotations

import concurrent.futures
import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import pytest
import requests

from tests.e2e.conftest import Stack, wait_for

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def asgi_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """One stack: the raw app at /a (root_path /a), Starlette at /st, FastAPI at /fa."""
    s = Stack(tmp_path_factory.mktemp("asgi"))
    gate = s.tmp / "gate"
    try:
        s.start_mongrel2()
        s.start_broker()
        s.start_asgi("asgi_apps:raw", service="raw", routes=("/a",), concurrency=40,
                     env={"E2E_GATE_FILE": str(gate),
                          "E2E_DISCONNECT_FILE": str(s.tmp / "disconnects")})
        s.start_asgi("asgi_apps:starlette_app", service="st", routes=("/st",))
        s.start_asgi("asgi_apps:fastapi_app", service="fa", routes=("/fa",))
        for path in ("/a/", "/st/", "/fa/tasks"):
            s.wait_ok(path)
        yield s
    finally:
        s.stop()


def test_http_scope(asgi_stack: Stack) -> None:
    r = requests.get(asgi_stack.url("/a/sub%20dir/scope?x=1&y=%20"),
                     headers={"X-Dup": "one", "X-Other": "v"}, timeout=10)
    assert r.status_code == 200
    scope = r.json()
    assert scope["type"] == "http" and scope["asgi"]["version"] == "3.0"
    assert scope["asgi"]["spec_version"] in ("2.3", "2.4")
    assert (scope["http_version"], scope["method"], scope["scheme"]) == ("1.1", "GET", "http")
    assert scope["path"] == "/a/sub dir/scope"  # decoded, and includes root_path
    assert scope["raw_path"] == "/a/sub%20dir/scope"
    assert scope["root_path"] == "/a"
    assert scope["query_string"] == "x=1&y=%20"
    headers = scope["headers"]
    assert ["x-dup", "one"] in headers and ["x-other", "v"] in headers
    assert all(name == name.lower() for name, _ in headers)
    assert not any(name.isupper() or name.startswith("x-mongrel2") for name, _ in headers)
    assert scope["client"] == ["127.0.0.1", 0]
    assert scope["server"] == ["127.0.0.1", asgi_stack.http_port]
    assert scope["state"] == {"started": "yes"}  # from lifespan.startup
    # Repeated response headers are kept, in order.
    assert r.raw.headers.getlist("x-dup") == ["1", "2"]


def test_repeated_request_headers_are_kept_in_order(asgi_stack: Stack) -> None:
    with socket.create_connection(("127.0.0.1", asgi_stack.http_port), timeout=10) as sock:
        sock.sendall(b"GET /a/scope HTTP/1.1\r\nHost: localhost\r\nX-Dup: one\r\n"
                     b"X-Dup: two\r\nX-Dup: three\r\nConnection: close\r\n\r\n")
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    body = data.split(b"\r\n\r\n", 1)[1]
    headers = json.loads(body)["headers"]
    assert [v for k, v in headers if k == "x-dup"] == ["one", "two", "three"]


@pytest.mark.parametrize("size", [0, 1000, 200_000, 3_000_000])
def test_request_body_arrives_through_receive(asgi_stack: Stack, size: int) -> None:
    body = os.urandom(size)
    r = requests.post(asgi_stack.url("/a/echo"), data=body, timeout=30)
    assert r.status_code == 200
    got = r.json()
    assert (got["size"], got["sha256"]) == (size, hashlib.sha256(body).hexdigest())
    if size > 64 * 1024:
        # Spooled by Mongrel2 (over limits.content_length): read in 64 KiB pieces.
        assert got["pieces"] == -(-size // (64 * 1024))
    else:
        assert got["pieces"] == 1
    assert list(asgi_stack.m2.upload_dir.iterdir()) == []  # the spooled file is removed


def test_chunked_request_body(asgi_stack: Stack) -> None:
    """Mongrel2 spools a chunked body whole; the app reads it in pieces."""
    def gen() -> Iterator[bytes]:
        for _ in range(30):
            yield b"z" * 10_000
    r = requests.post(asgi_stack.url("/a/echo"), data=gen(), timeout=30)
    assert r.status_code == 200
    got = r.json()
    assert got["size"] == 300_000 and got["pieces"] == -(-300_000 // (64 * 1024))
    assert got["sha256"] == hashlib.sha256(b"z" * 300_000).hexdigest()


def test_server_sent_events_arrive_as_sent(asgi_stack: Stack) -> None:
    gate = asgi_stack.tmp / "gate"
    gate.unlink(missing_ok=True)
    with requests.get(asgi_stack.url("/a/sse-gated"), stream=True, timeout=30) as r:
        assert r.headers["transfer-encoding"] == "chunked"
        assert "content-length" not in r.headers
        lines = r.iter_lines()
        assert next(lines) == b"data: 0"
        gate.touch()  # the app sends event 1 only now
        rest = [line for line in lines if line]
    assert rest == [b"data: 1"]


def test_large_streamed_response_within_credits(asgi_stack: Stack) -> None:
    r = requests.get(asgi_stack.url("/a/big?5000000"), timeout=60)
    assert r.status_code == 200 and len(r.content) == 5_000_000
    assert r.headers["content-length"] == "5000000"


def test_app_exception_before_the_start_is_500_and_after_it_closes(asgi_stack: Stack) -> None:
    assert requests.get(asgi_stack.url("/a/fail-before"), timeout=10).status_code == 500
    with pytest.raises(requests.exceptions.ChunkedEncodingError):
        requests.get(asgi_stack.url("/a/fail-after"), timeout=10)
    # Trailers are refused: an error before anything was sent, so a 500.
    assert requests.get(asgi_stack.url("/a/trailers"), timeout=10).status_code == 500
    assert requests.get(asgi_stack.url("/a/"), timeout=10).text == "hello from asgi\n"


def test_head_and_http10(asgi_stack: Stack) -> None:
    r = requests.head(asgi_stack.url("/a/"), timeout=10)
    assert r.status_code == 200 and r.content == b""
    with socket.create_connection(("127.0.0.1", asgi_stack.http_port), timeout=10) as sock:
        sock.sendall(b"GET /a/ HTTP/1.0\r\nHost: localhost\r\n\r\n")
        data = b""
        while chunk := sock.recv(65536):  # the worker closes an HTTP/1.0 connection
            data += chunk
    assert data.startswith(b"HTTP/1.0 200 OK") and data.endswith(b"hello from asgi\n")


def test_client_leaving_gives_the_app_http_disconnect(asgi_stack: Stack) -> None:
    flag = asgi_stack.tmp / "disconnects"
    flag.unlink(missing_ok=True)
    sock = socket.create_connection(("127.0.0.1", asgi_stack.http_port), timeout=10)
    sock.sendall(b"GET /a/disconnect HTTP/1.1\r\nHost: localhost\r\n\r\n")
    wait_for(lambda: _in_flight(asgi_stack, "raw") == 1, what="the request at the worker")
    sock.close()
    wait_for(lambda: flag.exists() and flag.read_text() == "disconnect\n",
             what="the app to see http.disconnect")
    wait_for(lambda: _in_flight(asgi_stack, "raw") == 0, what="the slot to free")


def _status(stack: Stack) -> dict[str, Any]:
    out = subprocess.run([sys.executable, "-m", "scale0.cli", "ctl", "--broker",
                          stack.broker_endpoints[0], "--json", "status"],
                         capture_output=True, text=True, timeout=10, check=True)
    status: dict[str, Any] = json.loads(out.stdout)
    return status


def _in_flight(stack: Stack, service: str) -> int:
    return sum(w["in_flight"] for w in _status(stack)["workers"] if service in w["services"])


def _labels(stack: Stack, service: str) -> set[str]:
    return {w["label"] for w in _status(stack)["workers"] if service in w["services"]}


def test_twenty_sleeping_requests_are_served_concurrently_by_one_process(
        asgi_stack: Stack) -> None:
    with concurrent.futures.ThreadPoolExecutor(20) as pool:
        answers = list(pool.map(lambda _: requests.get(asgi_stack.url("/a/gather?20"),
                                                       timeout=60), range(20)))
    assert [r.text for r in answers] == ["together\n"] * 20


def test_starlette_app(asgi_stack: Stack) -> None:
    r = requests.get(asgi_stack.url("/st/"), timeout=10)
    assert r.text == "starlette /st/ root=/st"
    r = requests.post(asgi_stack.url("/st/json?a=b"), json={"x": [1, 2]}, timeout=10)
    assert r.json() == {"got": {"x": [1, 2]}, "query": {"a": "b"}}
    with requests.get(asgi_stack.url("/st/stream"), stream=True, timeout=10) as r:
        assert r.headers["transfer-encoding"] == "chunked"
        assert r.text == "0\n1\n2\n3\n4\n"
    assert requests.get(asgi_stack.url("/st/missing"), timeout=10).status_code == 404


def test_fastapi_app_with_background_tasks(asgi_stack: Stack) -> None:
    r = requests.get(asgi_stack.url("/fa/items/42?q=hi"), timeout=10)
    assert r.json() == {"item_id": 42, "q": "hi"}
    assert requests.get(asgi_stack.url("/fa/items/nope"), timeout=10).status_code == 422
    assert requests.post(asgi_stack.url("/fa/task/t1"), timeout=10).json() == {"queued": "t1"}
    wait_for(lambda: "t1" in requests.get(asgi_stack.url("/fa/tasks"), timeout=10).json(),
             what="the background task to run")


# ---- lifespan, factories, pools -------------------------------------------------


def test_failed_lifespan_startup_never_serves_and_the_pool_stops(fresh_stack: Stack) -> None:
    s = fresh_stack
    s.start_mongrel2()
    s.start_broker()
    pool = s.start_asgi("asgi_apps:raw", service="raw", env={"E2E_LIFESPAN_FAIL": "1"},
                        ready=False)
    code = pool.popen.wait(30)
    assert code != 0
    assert pool.stdout_lines() == []  # no READY line: it never served
    assert "lifespan startup failed: no database" in pool.log_tail(20_000)
    # It never said HELLO: the broker has no worker and no route for it.
    assert _status(s)["workers"] == []
    assert requests.get(s.url("/"), timeout=10).status_code == 404


def test_lifespan_shutdown_on_graceful_stop_and_apps_without_lifespan(
        fresh_stack: Stack) -> None:
    s = fresh_stack
    s.start_mongrel2()
    s.start_broker()
    done = s.tmp / "shutdown"
    pool = s.start_asgi("asgi_apps:raw", service="raw", routes=("/raw",),
                        env={"E2E_SHUTDOWN_FILE": str(done)})
    s.start_asgi("asgi_apps:create_app()", service="factory", routes=("/factory",))
    assert s.wait_ok("/factory/x").text == "no lifespan here\n"
    s.wait_ok("/raw/")
    pool.send_signal(signal.SIGTERM)
    assert pool.popen.wait(30) == 0
    assert done.read_text().startswith("shutdown ")


def test_reload_by_sighup_keeps_serving(fresh_stack: Stack) -> None:
    s = fresh_stack
    s.start_mongrel2()
    s.start_broker()
    pool = s.start_asgi("asgi_apps:raw", service="raw")
    s.wait_ok("/")
    before = _labels(s, "raw")
    pool.send_signal(signal.SIGHUP)
    wait_for(lambda: (labels := _labels(s, "raw")) and not labels & before,
             what="the reloaded process to replace the old one")
    for _ in range(20):
        assert requests.get(s.url("/"), timeout=10).status_code == 200


def test_worker_reconnects_to_a_restarted_broker(fresh_stack: Stack) -> None:
    s = fresh_stack
    s.start_mongrel2()
    s.start_broker("--heartbeat", "0.2")
    port = int(s.broker_endpoints[0].rsplit(":", 1)[1])
    s.start_asgi("asgi_apps:raw", "--heartbeat", "0.2", service="raw")
    s.wait_ok("/")
    broker = next(p for p in s.procs if p.name == "broker0")
    broker.stop()
    s.procs.remove(broker)
    s.start_broker("--heartbeat", "0.2", port=port)
    assert s.wait_ok("/", timeout_s=30).text == "hello from asgi\n"


def test_max_requests_recycles_the_process_without_failures(fresh_stack: Stack) -> None:
    s = fresh_stack
    s.start_mongrel2()
    s.start_broker()
    s.start_asgi("asgi_apps:raw", "--max-requests", "10", service="raw")
    s.wait_ok("/")
    first = _labels(s, "raw")
    statuses = []
    for _ in range(15):
        statuses.append(requests.get(s.url("/"), timeout=10).status_code)
    wait_for(lambda: (labels := _labels(s, "raw")) and not labels & first,
             what="a replacement process after 10 requests")
    assert statuses == [200] * 15


def test_timeout_replaces_a_process_whose_loop_is_blocked(fresh_stack: Stack) -> None:
    s = fresh_stack
    s.start_mongrel2()
    s.start_broker()
    s.start_asgi("asgi_apps:raw", "--timeout", "2", service="raw")
    s.wait_ok("/")
    first = _labels(s, "raw")
    # The app blocks the event loop for 60 s: the arbiter sees no beat and kills it.
    # Its request fails: 502 if the kill is seen first, 503 if the broker expired
    # the silent worker first (the GET is retried, and no other worker is left).
    assert requests.get(s.url("/block?60"), timeout=30).status_code in (502, 503)
    wait_for(lambda: (labels := _labels(s, "raw")) and not labels & first,
             what="a replacement process")
    assert s.wait_ok("/").text == "hello from asgi\n"
