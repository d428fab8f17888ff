"""HTTP edges through the real stack (issue 11): duplicate Host, conflicting
Content-Length, absolute-form targets, header limits."""

from __future__ import annotations

import json
import socket
import subprocess
from collections.abc import Iterator

import pytest
import requests

from .conftest import Stack


@pytest.fixture(scope="module")
def edges(stack: Stack) -> Iterator[Stack]:
    stack.start_mongrel2()
    stack.start_broker("--max-body", "1000000")
    stack.start_pool("e2e_apps:app", service="app", routes=("/app",))
    stack.start_pool("e2e_apps:app", service="hosted", routes=("abs.example.com/hosted",))
    stack.wait_ok("/app/")
    yield stack


def raw_request(stack: Stack, data: bytes, timeout_s: float = 10.0) -> bytes:
    """Send raw bytes; read until the server closes the connection."""
    with socket.create_connection(("127.0.0.1", stack.http_port), timeout=timeout_s) as sock:
        sock.sendall(data)
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


def body_of(response: bytes) -> bytes:
    return response.partition(b"\r\n\r\n")[2]


def test_two_host_headers_are_400(edges: Stack) -> None:
    data = raw_request(edges, b"GET /app/environ HTTP/1.1\r\nHost: evil.example\r\n"
                              b"Host: localhost\r\nConnection: close\r\n\r\n")
    assert data.startswith(b"HTTP/1.1 400"), data[:200]
    assert b"Host" in body_of(data)


def test_two_different_content_lengths_are_400(edges: Stack) -> None:
    data = raw_request(edges, b"POST /app/echo HTTP/1.1\r\nHost: localhost\r\n"
                              b"Content-Length: 3\r\nContent-Length: 30\r\n"
                              b"Connection: close\r\n\r\nabc")
    assert data.startswith(b"HTTP/1.1 400"), data[:200]
    assert b"Content-Length" in body_of(data)


def test_a_large_first_length_cannot_hide_behind_a_small_last_one(edges: Stack) -> None:
    # Mongrel2 reads the body by the first value (3 MB, over --max-body 1 MB).
    data = raw_request(edges, b"POST /app/echo HTTP/1.1\r\nHost: localhost\r\n"
                              b"Content-Length: 3000000\r\nContent-Length: 1\r\n\r\n"
                              + b"x" * 100_000)
    assert data.startswith(b"HTTP/1.1 400"), data[:200]


def test_identical_content_lengths_are_served(edges: Stack) -> None:
    data = raw_request(edges, b"POST /app/echo HTTP/1.1\r\nHost: localhost\r\n"
                              b"Content-Length: 3\r\nContent-Length: 3\r\n"
                              b"Connection: close\r\n\r\nabc")
    assert data.startswith(b"HTTP/1.1 200"), data[:200]
    assert json.loads(body_of(data))["text"] == "abc"


def test_absolute_form_target_reaches_the_app_as_its_path(edges: Stack) -> None:
    # curl sends Host: 127.0.0.1:PORT; the target's authority replaces it (RFC 9112 3.2.2).
    out = subprocess.run(
        ["curl", "-sS", "--max-time", "10", "--request-target",
         "http://example.com:8080/app/environ?x=1", edges.url("/")],
        capture_output=True, check=True, timeout=20).stdout
    env = json.loads(out)
    assert (env["SCRIPT_NAME"], env["PATH_INFO"], env["QUERY_STRING"]) == (
        "/app", "/environ", "x=1")
    assert (env["SERVER_NAME"], env["SERVER_PORT"]) == ("example.com", "8080")
    assert env["headers"]["HTTP_HOST"] == "example.com:8080"


def test_absolute_form_routes_by_its_authority(edges: Stack) -> None:
    # Only abs.example.com has /hosted: with Host: localhost the path alone is a 404.
    assert requests.get(edges.url("/hosted/environ"), timeout=10).status_code == 404
    data = raw_request(edges, b"GET http://abs.example.com/hosted/environ HTTP/1.1\r\n"
                              b"Host: localhost\r\nConnection: close\r\n\r\n")
    assert data.startswith(b"HTTP/1.1 200"), data[:200]
    env = json.loads(body_of(data))
    assert (env["SCRIPT_NAME"], env["PATH_INFO"], env["SERVER_NAME"]) == (
        "/hosted", "/environ", "abs.example.com")


def test_a_doubled_slash_path_is_still_a_path(edges: Stack) -> None:
    data = raw_request(edges, b"GET //app/environ HTTP/1.1\r\nHost: localhost\r\n"
                              b"Connection: close\r\n\r\n")
    assert data.startswith(b"HTTP/1.1 200"), data[:200]
    env = json.loads(body_of(data))
    assert (env["SCRIPT_NAME"], env["SERVER_NAME"]) == ("/app", "localhost")


def test_an_8k_cookie_is_served(edges: Stack) -> None:
    # Mongrel2's default limits.buffer_size (4096) answers this 400 itself.
    cookie = "session=" + "c" * 8182  # 8190 bytes: gunicorn's largest field
    r = requests.get(edges.url("/app/environ"), headers={"Cookie": cookie,
                                                         "X-Other": "o" * 3000}, timeout=10)
    assert r.status_code == 200
    assert r.json()["headers"]["HTTP_COOKIE"] == cookie


def test_a_head_over_the_buffer_is_400_from_mongrel2(edges: Stack) -> None:
    data = raw_request(edges, b"GET /app/environ HTTP/1.1\r\nHost: localhost\r\n"
                              b"X-Big: " + b"b" * 20_000 + b"\r\n\r\n")
    assert data.startswith(b"HTTP/1.1 400"), data[:200]
