"""Request bodies through the real stack (issue 11): chunked bodies, bodies
for workers with no shared disk, spooled files always removed, a relative
--upload-dir with --chdir."""

from __future__ import annotations

import hashlib
import os
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from .conftest import Stack, wait_for


@pytest.fixture(scope="module")
def bodies(stack: Stack) -> Iterator[Stack]:
    stack.start_mongrel2()
    stack.start_broker("--upload-dir", str(stack.m2.upload_dir), "--max-body", "3000000",
                       "--inline-body-max", str(INLINE_MAX), "--request-timeout", "20")
    stack.start_pool("e2e_apps:app", service="app", routes=("/app",), threads=4)
    stack.start_pool("e2e_apps:app", service="nodisk", routes=("/nodisk",), upload_dir=False)
    stack.wait_ok("/app/")
    stack.wait_ok("/nodisk/")
    yield stack


INLINE_MAX = 400_000  # bodies up to this reach /nodisk inside the request
OVER_INLINE = 1_000_000  # spooled, and stays a file: only /app can read it


def spooled(stack: Stack) -> list[str]:
    return sorted(p.name for p in stack.m2.upload_dir.iterdir())


def wait_no_spooled(stack: Stack) -> None:
    wait_for(lambda: not spooled(stack), 15, f"the spooled files to go: {spooled(stack)}")


def test_chunked_body_with_curl(bodies: Stack, tmp_path: Path) -> None:
    body = os.urandom(300_000)
    (tmp_path / "body").write_bytes(body)
    out = subprocess.run(
        ["curl", "-sS", "--max-time", "20", "-H", "Transfer-Encoding: chunked",
         "--data-binary", f"@{tmp_path / 'body'}", bodies.url("/app/echo")],
        capture_output=True, check=True, timeout=30).stdout
    got = requests.models.complexjson.loads(out)
    assert (got["length"], got["sha256"]) == (len(body), hashlib.sha256(body).hexdigest())
    wait_no_spooled(bodies)


def test_chunked_body_from_a_generator_with_requests(bodies: Stack) -> None:
    parts = [b"alpha-", b"x" * 50_000, b"-omega"]
    r = requests.post(bodies.url("/app/echo"), data=iter(parts), timeout=20)
    assert r.status_code == 200, r.text
    body = b"".join(parts)
    assert (r.json()["length"], r.json()["sha256"]) == (len(body),
                                                        hashlib.sha256(body).hexdigest())
    small = requests.post(bodies.url("/app/echo"), data=iter([b"hello ", b"world"]), timeout=20)
    assert small.status_code == 200 and small.json()["text"] == "hello world"
    wait_no_spooled(bodies)


def test_spooled_bodies_arrive_intact(bodies: Stack) -> None:
    # With limits.buffer_size over limits.content_length, Mongrel2 1.12
    # corrupted about 1 in 5 of these (tests/mongrel2_helpers.py HEADER_BUFFER_BYTES).
    for size in (20_481, 25_000, 33_000, 100_000, 100_000, 100_000, 250_000, 1_000_000):
        body = os.urandom(size)
        r = requests.post(bodies.url("/app/echo"), data=body, timeout=20)
        assert r.status_code == 200
        assert r.json()["sha256"] == hashlib.sha256(body).hexdigest(), size


def test_a_length_beside_chunked_is_400(bodies: Stack) -> None:
    with socket.create_connection(("127.0.0.1", bodies.http_port), timeout=10) as sock:
        sock.sendall(b"POST /app/echo HTTP/1.1\r\nHost: localhost\r\nContent-Length: 5\r\n"
                     b"Transfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n")
        assert sock.recv(100).startswith(b"HTTP/1.1 400")
    wait_no_spooled(bodies)


def test_an_upload_refused_with_413_leaves_no_file(bodies: Stack) -> None:
    body = b"z" * 4_000_000  # over --max-body 3000000
    r = requests.post(bodies.url("/app/echo"), data=body, timeout=20)
    assert r.status_code == 413
    wait_no_spooled(bodies)


def test_bodies_reach_a_worker_without_upload_dir_inline(bodies: Stack, tmp_path: Path) -> None:
    body = os.urandom(100_000)
    r = requests.post(bodies.url("/nodisk/echo"), data=body, timeout=20)
    assert r.status_code == 200, r.text
    assert r.json()["sha256"] == hashlib.sha256(body).hexdigest()
    chunked = os.urandom(300_000)
    (tmp_path / "body").write_bytes(chunked)
    out = subprocess.run(
        ["curl", "-sS", "--max-time", "20", "-H", "Transfer-Encoding: chunked",
         "--data-binary", f"@{tmp_path / 'body'}", bodies.url("/nodisk/echo")],
        capture_output=True, check=True, timeout=30).stdout
    got = requests.models.complexjson.loads(out)
    assert (got["length"], got["sha256"]) == (len(chunked), hashlib.sha256(chunked).hexdigest())
    wait_no_spooled(bodies)


def test_a_body_over_the_inline_limit_needs_a_shared_disk(bodies: Stack) -> None:
    body = os.urandom(OVER_INLINE)
    r = requests.post(bodies.url("/nodisk/echo"), data=body, timeout=20)
    assert r.status_code == 400 and "uploads are not accepted here" in r.text
    wait_no_spooled(bodies)  # the broker removed what the worker could not read
    r = requests.post(bodies.url("/app/echo"), data=body, timeout=20)
    assert r.json()["sha256"] == hashlib.sha256(body).hexdigest()
    wait_no_spooled(bodies)


def test_a_crashed_worker_leaves_no_file(bodies: Stack) -> None:
    r = requests.post(bodies.url("/app/crash"), data=b"c" * OVER_INLINE, timeout=30)
    assert r.status_code == 502
    wait_no_spooled(bodies)
    bodies.wait_ok("/app/")  # the pool replaced the process


def test_a_client_that_leaves_leaves_no_file(bodies: Stack) -> None:
    body = b"d" * OVER_INLINE
    with socket.create_connection(("127.0.0.1", bodies.http_port), timeout=10) as sock:
        sock.sendall(b"POST /app/sleep?1.5 HTTP/1.1\r\nHost: localhost\r\n"
                     b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
        wait_for(lambda: spooled(bodies), 10, "the body to be spooled")
    # closed while the app sleeps: the file goes once the worker is done with it
    wait_no_spooled(bodies)


def test_relative_upload_dir_is_resolved_before_chdir(bodies: Stack) -> None:
    elsewhere = bodies.tmp / "elsewhere"
    elsewhere.mkdir(exist_ok=True)
    relative = os.path.relpath(bodies.m2.upload_dir, bodies.tmp)  # the pool runs in tmp
    bodies.start_pool("e2e_apps:app", "--upload-dir", relative, "--chdir", str(elsewhere),
                      service="rel", routes=("/rel",), upload_dir=False)
    bodies.wait_ok("/rel/")
    body = os.urandom(OVER_INLINE)  # a file the worker reads from its --upload-dir
    r = requests.post(bodies.url("/rel/echo"), data=body, timeout=20)
    assert r.status_code == 200, r.text
    assert r.json()["sha256"] == hashlib.sha256(body).hexdigest()
    wait_no_spooled(bodies)


def test_five_megabytes_reach_a_worker_without_upload_dir(fresh_stack: Stack) -> None:
    # The defaults: the broker knows Mongrel2's upload folder, inline_body_max 8 MiB.
    s = fresh_stack
    s.start_mongrel2()
    s.start_broker("--upload-dir", str(s.m2.upload_dir))
    s.start_pool("e2e_apps:app", service="app", routes=("/",), upload_dir=False)
    s.wait_ok("/")
    body = os.urandom(5 * 1024 * 1024)
    r = requests.post(s.url("/echo"), data=body, timeout=60)
    assert r.status_code == 200, r.text
    assert (r.json()["length"], r.json()["sha256"]) == (len(body),
                                                        hashlib.sha256(body).hexdigest())
    wait_no_spooled(s)
