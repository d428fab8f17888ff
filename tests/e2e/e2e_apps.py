"""WSGI apps the end-to-end tests serve (imported by worker processes)."""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from wsgiref.types import StartResponse, WSGIEnvironment
from wsgiref.validate import validator

BIG = 10 * 1024 * 1024
HUGE = 256 * 1024 * 1024
ENVIRON_KEYS = (
    "REQUEST_METHOD", "SCRIPT_NAME", "PATH_INFO", "QUERY_STRING", "CONTENT_TYPE",
    "CONTENT_LENGTH", "SERVER_NAME", "SERVER_PORT", "SERVER_PROTOCOL", "REMOTE_ADDR",
    "wsgi.url_scheme", "wsgi.multithread", "wsgi.multiprocess",
)


def _json(start_response: StartResponse, data: object, status: str = "200 OK") -> list[bytes]:
    body = json.dumps(data, sort_keys=True).encode()
    start_response(status, [("Content-Type", "application/json"),
                            ("Content-Length", str(len(body)))])
    return [body]


def app(environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
    path = environ["PATH_INFO"]
    if path.endswith("/environ"):
        info = {k: environ.get(k) for k in ENVIRON_KEYS}
        info["headers"] = {k: v for k, v in environ.items() if k.startswith("HTTP_")}
        return _json(start_response, info)
    if path.endswith("/echo"):
        body = environ["wsgi.input"].read(int(environ.get("CONTENT_LENGTH") or 0))
        return _json(start_response, {
            "method": environ["REQUEST_METHOD"], "length": len(body),
            "sha256": hashlib.sha256(body).hexdigest(), "query": environ["QUERY_STRING"],
            "content_type": environ.get("CONTENT_TYPE", ""),
            "text": body[:200].decode("latin-1")})
    if path.endswith("/big"):
        block = bytes(range(256)) * 256  # 64 KiB
        start_response("200 OK", [("Content-Type", "application/octet-stream"),
                                  ("Content-Length", str(BIG))])
        return (block for _ in range(BIG // len(block)))
    if path.endswith("/huge"):  # far more than socket buffers and credits hold
        start_response("200 OK", [("Content-Type", "application/octet-stream"),
                                  ("Content-Length", str(HUGE))])
        return _huge(os.environ.get("E2E_MARK_DIR"))
    if path.endswith("/blob"):  # one block bigger than Mongrel2's credit window
        size = int(environ.get("QUERY_STRING") or 1)
        start_response("200 OK", [("Content-Type", "application/octet-stream"),
                                  ("Content-Length", str(size))])
        return [b"z" * size]
    if path.endswith("/stream"):
        start_response("200 OK", [("Content-Type", "text/plain")])
        return _stream(int(environ.get("QUERY_STRING") or 20))
    if path.endswith("/pid"):
        return _json(start_response, {"pid": os.getpid()})
    if path.endswith("/sleep"):
        seconds = float(environ.get("QUERY_STRING") or 1)
        marks = os.environ.get("E2E_MARK_DIR")
        if marks:  # lets a test see that the request reached the app
            Path(marks, f"sleep-{os.getpid()}-{time.monotonic_ns()}").touch()
        time.sleep(seconds)
        return _json(start_response, {"slept": seconds})
    if path.endswith("/fail"):
        raise RuntimeError("this app fails on purpose")
    if path.endswith("/crash"):  # the worker process dies mid-request
        os._exit(13)  # not BOOT_FAILED (3): the pool replaces the process
    body = b"e2e hello\n"
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))])
    return [body]


def _huge(marks: str | None) -> Iterator[bytes]:
    """HUGE bytes in 64 KiB blocks; with E2E_MARK_DIR, marks how many went out
    once the server closes the iterable (early, when the client left)."""
    block = b"h" * 65536
    sent = 0
    try:
        while sent < HUGE:
            yield block
            sent += len(block)
    finally:
        if marks:
            Path(marks, f"huge-{os.getpid()}-{sent}").touch()


def _stream(n: int) -> Iterator[bytes]:
    for i in range(n):
        time.sleep(0.01)
        yield b"chunk %03d\n" % i


validated = validator(app)
