"""WSGI apps for tests/e2e/test_stream_bodies.py (imported by worker processes)."""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Iterable
from pathlib import Path
from wsgiref.types import StartResponse, WSGIEnvironment


def _json(start_response: StartResponse, data: object) -> list[bytes]:
    body = json.dumps(data, sort_keys=True).encode()
    start_response("200 OK", [("Content-Type", "application/json"),
                              ("Content-Length", str(len(body)))])
    return [body]


def app(environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
    """/hash: reads the body in 64 KiB pieces (never whole) and answers its
    length and sha256. /slow?FLAG: reads 64 KiB, marks that it did (FLAG.read),
    waits (at most 60 s) until the test creates FLAG, then reads the rest."""
    path = environ["PATH_INFO"]
    stream = environ["wsgi.input"]
    digest = hashlib.sha256()
    length = 0
    if path.endswith("/slow"):
        flag = Path(environ["QUERY_STRING"])
        first = stream.read(65536)
        digest.update(first)
        length += len(first)
        Path(f"{flag}.read").write_text(f"{os.getpid()}\n")
        deadline = time.monotonic() + 60
        while not flag.exists() and time.monotonic() < deadline:
            time.sleep(0.02)
    while piece := stream.read(65536):
        digest.update(piece)
        length += len(piece)
    return _json(start_response, {
        "length": length, "sha256": digest.hexdigest(), "pid": os.getpid(),
        "content_length": environ.get("CONTENT_LENGTH"),
        "transfer_encoding": environ.get("HTTP_TRANSFER_ENCODING")})
