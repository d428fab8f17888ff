"""HTTP through the real stack: curl/requests -> Mongrel2 -> broker -> WSGI workers."""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import socket
import subprocess
from collections.abc import Iterator

import pytest
import requests

from .conftest import Stack, wait_for
from .e2e_apps import BIG


@pytest.fixture(scope="module")
def web(stack: Stack) -> Iterator[Stack]:
    stack.start_mongrel2()
    page = stack.tmp / "maintenance.html"
    page.write_text("<h1>ghost is down for maintenance</h1>")
    stack.start_broker("--route", "/ghost=ghost", "--maintenance-page", f"ghost={page}")
    stack.start_pool("e2e_apps:app", service="app", routes=("/app",), processes=2)
    stack.start_pool("e2e_apps:validated", service="validated", routes=("/validated",),
                     env={"PYTHONWARNINGS": "error"})
    stack.start_pool("examples.flask_app:app", service="flask", routes=("/flask",))
    for path in ("/app/", "/validated/", "/flask/"):
        stack.wait_ok(path)
    yield stack


def raw_request(stack: Stack, data: bytes, timeout_s: float = 10.0) -> bytes:
    """Send raw bytes; read until the server closes the connection."""
    with socket.create_connection(("127.0.0.1", stack.http_port), timeout=timeout_s) as sock:
        sock.sendall(data)
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


def test_get_with_query_string_builds_the_environ(web: Stack) -> None:
    r = requests.get(web.url("/app/environ?a=1&b=%20c"), headers={"X-Custom": "yes"}, timeout=10)
    assert r.status_code == 200
    env = r.json()
    assert env["REQUEST_METHOD"] == "GET"
    assert env["SCRIPT_NAME"] == "/app"
    assert env["PATH_INFO"] == "/environ"
    assert env["QUERY_STRING"] == "a=1&b=%20c"
    assert env["SERVER_NAME"] == "127.0.0.1"
    assert env["SERVER_PORT"] == str(web.http_port)
    assert env["SERVER_PROTOCOL"] == "HTTP/1.1"
    assert env["REMOTE_ADDR"] == "127.0.0.1"
    assert env["wsgi.url_scheme"] == "http"
    assert env["headers"]["HTTP_X_CUSTOM"] == "yes"
    assert not any(k in env["headers"] for k in ("HTTP_METHOD", "HTTP_PATH", "HTTP_URI"))


def test_post_body_reaches_the_app(web: Stack) -> None:
    body = b"name=scale0&x=" + b"y" * 5000
    r = requests.post(web.url("/app/echo?q=1"), data=body, timeout=10,
                      headers={"Content-Type": "application/x-www-form-urlencoded"})
    assert r.status_code == 200
    got = r.json()
    assert got["method"] == "POST"
    assert got["length"] == len(body)
    assert got["sha256"] == hashlib.sha256(body).hexdigest()
    assert got["query"] == "q=1"
    assert got["content_type"] == "application/x-www-form-urlencoded"


def test_repeated_headers_are_joined(web: Stack) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", web.http_port, timeout=10)
    conn.putrequest("GET", "/app/environ")
    conn.putheader("X-Dup", "one")
    conn.putheader("X-Dup", "two")
    conn.putheader("X-Dup", "three")
    conn.endheaders()
    env = json.loads(conn.getresponse().read())
    conn.close()
    assert env["headers"]["HTTP_X_DUP"] == "one, two, three"


def test_keep_alive_connection_is_reused(web: Stack) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", web.http_port, timeout=10)
    conn.connect()
    first_socket = conn.sock
    for i in range(5):
        conn.request("GET", f"/app/echo?n={i}")
        response = conn.getresponse()
        assert response.status == 200
        assert json.loads(response.read())["query"] == f"n={i}"
        assert response.getheader("Connection", "").lower() != "close"
    assert conn.sock is first_socket  # never reconnected
    conn.close()


def test_http_1_0_gets_a_complete_response_and_a_close(web: Stack) -> None:
    data = raw_request(web, b"GET /app/ HTTP/1.0\r\nHost: localhost\r\n\r\n")
    head, _, body = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.0 200")
    assert body == b"e2e hello\n"  # and the server closed: raw_request returned


def test_connection_close_is_honoured(web: Stack) -> None:
    data = raw_request(web, b"GET /app/ HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
    assert data.startswith(b"HTTP/1.1 200")
    assert b"\r\nConnection: close\r\n" in data
    assert data.endswith(b"e2e hello\n")


def test_head_has_no_body(web: Stack) -> None:
    r = requests.head(web.url("/app/"), timeout=10)
    assert r.status_code == 200
    assert r.headers["Content-Length"] == "10"
    assert r.content == b""


def test_ten_megabyte_response(web: Stack) -> None:
    r = requests.get(web.url("/app/big"), timeout=60)
    assert r.status_code == 200
    assert len(r.content) == BIG
    block = bytes(range(256)) * 256
    assert r.content == block * (BIG // len(block))


def test_ten_megabyte_response_with_curl(web: Stack) -> None:
    out = subprocess.run(
        ["curl", "-s", "-o", "/dev/null", "-w", "%{http_code} %{size_download}",
         web.url("/app/big")], capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout == f"200 {BIG}"


@pytest.mark.parametrize("size", [102_399, 102_400, 102_401, 3_000_000])
def test_one_block_bigger_than_the_credit_window(web: Stack, size: int) -> None:
    # Mongrel2 grants 102400 bytes of download credit per request at first.
    r = requests.get(web.url(f"/app/blob?{size}"), timeout=30)
    assert r.status_code == 200
    assert r.content == b"z" * size


def test_streamed_response_is_chunked(web: Stack) -> None:
    r = requests.get(web.url("/app/stream?20"), stream=True, timeout=30)
    assert r.status_code == 200
    assert r.headers.get("Transfer-Encoding") == "chunked"
    lines = list(r.iter_lines())
    assert lines == [b"chunk %03d" % i for i in range(20)]


def test_five_megabyte_upload_through_temp_store(web: Stack) -> None:
    body = os.urandom(5 * 1024 * 1024)
    r = requests.post(web.url("/app/echo"), data=body, timeout=60,
                      headers={"Content-Type": "application/octet-stream"})
    assert r.status_code == 200
    got = r.json()
    assert got["length"] == len(body)
    assert got["sha256"] == hashlib.sha256(body).hexdigest()
    # the worker removes the spooled file once the request is over
    wait_for(lambda: not list(web.m2.upload_dir.iterdir()), what="the upload file removed")


def test_forged_upload_header_is_rejected(web: Stack) -> None:
    data = raw_request(web, b"POST /app/echo HTTP/1.1\r\nHost: localhost\r\n"
                            b"X-Mongrel2-Upload-Done: /etc/passwd\r\n"
                            b"X-Mongrel2-Upload-Start: /etc/passwd\r\n"
                            b"Content-Length: 2\r\nConnection: close\r\n\r\nhi")
    assert data.startswith(b"HTTP/1.1 400")
    assert b"root:" not in data


def test_flask_app(web: Stack) -> None:
    r = requests.post(web.url("/flask/echo?x=1"), data="hello flask", timeout=10)
    assert r.status_code == 200
    assert r.json() == {"args": {"x": "1"}, "data": "hello flask", "method": "POST",
                        "path": "/echo", "script_root": "/flask"}
    assert requests.get(web.url("/flask/"), timeout=10).text == "Hello from Flask on Scale0!\n"


def test_validated_app_passes_wsgiref_validator(web: Stack) -> None:
    # The pool runs with PYTHONWARNINGS=error: any validator warning is a 500.
    r = requests.get(web.url("/validated/environ?a=b"), timeout=10)
    assert r.status_code == 200
    assert r.json()["SCRIPT_NAME"] == "/validated"
    r = requests.post(web.url("/validated/echo"), data=b"x" * 1000, timeout=10)
    assert r.status_code == 200 and r.json()["length"] == 1000
    r = requests.get(web.url("/validated/stream?3"), timeout=10)
    assert r.status_code == 200 and r.text == "chunk 000\nchunk 001\nchunk 002\n"


def test_no_route_is_404(web: Stack) -> None:
    assert requests.get(web.url("/nothing/here"), timeout=10).status_code == 404
    assert requests.get(web.url("/apple"), timeout=10).status_code == 404  # not under /app


def test_path_is_normalised_before_routing(web: Stack) -> None:
    r = requests.get(web.url("/x/../app/environ"), timeout=10)
    # requests itself may normalise; send it raw to be sure
    data = raw_request(web, b"GET /x/../app//environ HTTP/1.1\r\nHost: localhost\r\n"
                            b"Connection: close\r\n\r\n")
    assert data.startswith(b"HTTP/1.1 200")
    env = json.loads(data.partition(b"\r\n\r\n")[2])
    assert (env["SCRIPT_NAME"], env["PATH_INFO"]) == ("/app", "/environ")
    assert r.status_code == 200


def test_service_without_worker_is_503_with_retry_after(web: Stack) -> None:
    r = requests.get(web.url("/ghost/x"), timeout=10)
    assert r.status_code == 503
    assert int(r.headers["Retry-After"]) > 0
    assert r.text == "<h1>ghost is down for maintenance</h1>"  # its maintenance page


def test_app_exception_is_500_and_the_worker_goes_on(web: Stack) -> None:
    r = requests.get(web.url("/app/fail"), timeout=10)
    assert r.status_code == 500
    for _ in range(4):  # both processes, more than once
        assert requests.get(web.url("/app/"), timeout=10).text == "e2e hello\n"


def test_requests_spread_over_processes(web: Stack) -> None:
    pids = {requests.get(web.url("/app/pid"), timeout=10).json()["pid"] for _ in range(8)}
    assert len(pids) == 2  # LRU across the pool's two processes
