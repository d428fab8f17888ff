"""A plain WSGI app (PEP 3333, no framework): `scale0 wsgi examples.hello:app`."""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from wsgiref.types import StartResponse, WSGIEnvironment


def app(environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
    path = environ.get("PATH_INFO", "")
    if path == "/echo":
        length = int(environ.get("CONTENT_LENGTH") or 0)
        body = environ["wsgi.input"].read(length)
        start_response("200 OK", [("Content-Type", "application/octet-stream"),
                                  ("Content-Length", str(len(body)))])
        return [body]
    if path == "/environ":
        keys = ("REQUEST_METHOD", "SCRIPT_NAME", "PATH_INFO", "QUERY_STRING", "SERVER_NAME",
                "SERVER_PORT", "SERVER_PROTOCOL", "REMOTE_ADDR", "CONTENT_TYPE", "CONTENT_LENGTH",
                "wsgi.url_scheme")
        info = {k: environ.get(k) for k in keys}
        info.update({k: v for k, v in environ.items() if k.startswith("HTTP_")})
        data = json.dumps(info, sort_keys=True).encode()
        start_response("200 OK", [("Content-Type", "application/json"),
                                  ("Content-Length", str(len(data)))])
        return [data]
    if path.startswith("/bytes/"):
        return _bytes(path[len("/bytes/"):], start_response)
    if path == "/stream":
        start_response("200 OK", [("Content-Type", "text/plain")])
        return _count(int(environ.get("QUERY_STRING") or 10))
    body = b"Hello from Scale0!\n"
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))])
    return [body]


MAX_BYTES = 16 * 1024 * 1024


def _bytes(size: str, start_response: StartResponse) -> Iterable[bytes]:
    """`/bytes/N`: N bytes of b"x" (0 <= N <= 16 MiB, plain decimal), else 400."""
    n = int(size) if size.isascii() and size.isdigit() and len(size) <= 9 else -1
    if not 0 <= n <= MAX_BYTES:
        error = b"N must be a decimal number of bytes <= %d\n" % MAX_BYTES
        start_response("400 Bad Request", [("Content-Type", "text/plain"),
                                           ("Content-Length", str(len(error)))])
        return [error]
    start_response("200 OK", [("Content-Type", "application/octet-stream"),
                              ("Content-Length", str(n))])
    return [b"x" * n]


def _count(n: int) -> Iterator[bytes]:
    for i in range(n):
        yield b"line %d\n" % i
