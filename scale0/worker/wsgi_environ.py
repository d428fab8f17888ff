"""The WSGI environ of one Mongrel2 request (PEP 3333 "environ Variables").

`build_environ` maps a Mongrel2 request (its headers: Mongrel2's own in
upper case, METHOD, PATH, URI, ..., and the client's lowercased) onto the
CGI-style keys an app expects, as gunicorn's
`http/wsgi.py` and werkzeug's `make_environ` do: no ``HTTP_`` prefix on
CONTENT_TYPE and CONTENT_LENGTH, repeated headers comma-joined (cookies with
``; ``), header names holding ``_`` dropped (they would collide with ``-``
ones), Mongrel2's upload headers never shown (a client can forge them), the
scheme and client address from trusted proxies only (core/forwarded.py).

``wsgi.input`` is the body: inline bytes, the file Mongrel2 spooled (opened
by worker/upload.py inside ``--upload-dir``), or a streamed body's
`BodyInput` (core/bodystream.py) that reads as the pieces arrive.

It runs for every request: the entries that never change are built once per
process, and the mappings of header names and hosts are cached (bounded:
a client sending ever new names only makes them slower, never bigger).
"""

from __future__ import annotations

import io
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Protocol, TextIO

from scale0.core.bodystream import BodyInput
from scale0.core.forwarded import LOOPBACK, Trust
from scale0.core.forwarded import apply as apply_forwarded
from scale0.wire.mongrel2 import Headers, HttpRequest, UploadDone
from scale0.worker.upload import open_upload

# RFC 9110 5.6.2 token (header names, the request's and the app's).
TOKEN_RE = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
# Mongrel2's own upload headers; a client can forge them (docs/mongrel2.md, "Uploads").
_UPLOAD_HEADERS = frozenset((b"x-mongrel2-upload-start", b"x-mongrel2-upload-done"))


@dataclass(frozen=True, slots=True)
class WsgiSettings:
    upload_dir: str | None = None  # where Mongrel2's upload.temp_store writes, as seen here
    server_name: str = "localhost"  # SERVER_NAME when the request has no Host header
    server_port: str = "80"
    multithread: bool = False
    multiprocess: bool = False
    delete_uploads: bool = True  # unlink the temp_store file after the response
    forwarded: Trust = LOOPBACK  # whose X-Forwarded-Proto / client address to believe


class _Readable(Protocol):
    def read(self, size: int = ..., /) -> bytes: ...


class FileWrapper:
    """wsgi.file_wrapper (PEP 3333 "Optional Platform-Specific File Handling")."""

    def __init__(self, filelike: _Readable, blksize: int = 8192) -> None:
        self.filelike = filelike
        self.blksize = blksize

    def __iter__(self) -> Iterator[bytes]:
        while block := self.filelike.read(self.blksize):
            yield block

    def close(self) -> None:
        close = getattr(self.filelike, "close", None)
        if close is not None:
            close()


def header_text(headers: Headers, name: bytes) -> str | None:
    """A client header as str; repeats joined (RFC 9110 5.3), cookies with '; '."""
    value = headers.get(name)
    if value is None:
        return None
    if isinstance(value, list):
        value = (b"; " if name == b"cookie" else b", ").join(value)
    return value.decode("latin-1")


def header_tokens(value: str | None) -> set[str]:
    return {t.strip().lower() for t in value.split(",")} if value else set()


def _server_address(host: str | None, scheme: str, settings: WsgiSettings) -> tuple[str, str]:
    if not host:
        return settings.server_name, settings.server_port
    default_port = "443" if scheme == "https" else "80"
    if host.startswith("["):  # IPv6 literal: "[::1]:8080"
        name, _, rest = host.partition("]")
        name, port = name + "]", rest[1:] if rest.startswith(":") else ""
    else:
        name, _, port = host.partition(":")
    return name, port if port.isascii() and port.isdigit() else default_port


# Caches of pure functions of client- or app-chosen strings, bounded so that a
# client sending ever new header names cannot grow them: once full, the value
# is computed each time (same result, only slower).
CACHE_MAX = 1024
_SKIP = ""  # _ENVIRON_KEYS value of a request header the environ does not carry
_ENVIRON_KEYS: dict[bytes, str] = {}  # client header name -> environ key, or _SKIP
_SERVER_ADDRESSES: dict[tuple[bytes, str], tuple[str, str]] = {}
# The last (settings, errors) and their constant environ: a process has one of each.
_constant: tuple[WsgiSettings | None, TextIO | None, dict[str, Any]] = (None, None, {})


def _environ_key(key: bytes) -> str:
    """The environ key of client header `key` (PEP 3333 "environ Variables"), or _SKIP."""
    # Mongrel2 lowercases client names, so any uppercase key is its own (docs/mongrel2.md);
    # '_' names are dropped as werkzeug does: they would collide with '-' ones.
    if key in _UPLOAD_HEADERS or b"_" in key or key.lower() != key:
        return _SKIP
    name = key.decode("latin-1")
    if not TOKEN_RE.fullmatch(name) or name == "content-length":  # length: from the body
        return _SKIP
    if name == "content-type":  # PEP 3333: no HTTP_ prefix
        return "CONTENT_TYPE"
    return "HTTP_" + name.upper().replace("-", "_")


def _constant_environ(settings: WsgiSettings, errors: TextIO) -> dict[str, Any]:
    """The environ entries that are the same for every request of this process."""
    global _constant
    last_settings, last_errors, environ = _constant
    if last_settings is not settings or last_errors is not errors:
        environ = {
            "wsgi.version": (1, 0),
            "wsgi.errors": errors,
            "wsgi.multithread": settings.multithread,
            "wsgi.multiprocess": settings.multiprocess,
            "wsgi.run_once": False,
            "wsgi.file_wrapper": FileWrapper,
            "wsgi.input_terminated": True,  # the whole body is here: reading to EOF is safe
        }
        _constant = (settings, errors, environ)  # one assignment: atomic for other threads
    return environ


def build_environ(request: HttpRequest | UploadDone, *, script_name: str, path_info: str,
                  settings: WsgiSettings, errors: TextIO,
                  body: BodyInput | None = None) -> dict[str, Any]:
    """The PEP 3333 environ ("environ Variables"); opens the upload for UploadDone."""
    headers = request.headers
    raw_scheme = headers.get(b"URL_SCHEME")
    if raw_scheme == b"http" or raw_scheme is None:
        scheme = "http"
    else:
        scheme = (header_text(headers, b"URL_SCHEME") or "http").lower()
        scheme = scheme if scheme in ("http", "https") else "http"
    query = header_text(headers, b"QUERY") or ""
    uri = header_text(headers, b"URI")
    if uri is None:
        uri = request.path.decode("latin-1") + ("?" + query if query else "")
    raw_host = headers.get(b"host")
    if type(raw_host) is bytes and raw_host:
        address = _SERVER_ADDRESSES.get((raw_host, scheme))
        if address is None:
            address = _server_address(raw_host.decode("latin-1"), scheme, settings)
            if len(_SERVER_ADDRESSES) < CACHE_MAX:
                _SERVER_ADDRESSES[raw_host, scheme] = address
    else:
        address = _server_address(header_text(headers, b"host"), scheme, settings)
    environ = _constant_environ(settings, errors).copy()
    environ["REQUEST_METHOD"] = header_text(headers, b"METHOD") or "GET"
    environ["SCRIPT_NAME"] = script_name
    environ["PATH_INFO"] = path_info
    environ["QUERY_STRING"] = query
    environ["SERVER_NAME"], environ["SERVER_PORT"] = address
    environ["SERVER_PROTOCOL"] = header_text(headers, b"VERSION") or "HTTP/1.0"
    environ["REQUEST_URI"] = environ["RAW_URI"] = uri
    environ["wsgi.url_scheme"] = scheme
    environ["scale0.conn_id"] = request.conn_id
    remote_addr = header_text(headers, b"REMOTE_ADDR")
    if remote_addr is not None:
        environ["REMOTE_ADDR"] = remote_addr
    keys = _ENVIRON_KEYS
    for key, value in headers.items():
        environ_key = keys.get(key)
        if environ_key is None:
            environ_key = _environ_key(key)
            if len(keys) < CACHE_MAX:
                keys[key] = environ_key
        if environ_key:
            if type(value) is bytes:
                environ[environ_key] = value.decode("latin-1")
            else:
                environ[environ_key] = header_text(headers, key) or ""
    apply_forwarded(environ, headers, settings.forwarded)  # core/forwarded.py
    if body is not None:  # upload.stream: the body arrives as the app reads (core/bodystream.py)
        environ["wsgi.input"] = body
        length = headers.get(b"content-length")
        if type(length) is bytes and length.isdigit():
            environ["CONTENT_LENGTH"] = length.decode("ascii")
        else:  # chunked: the length is not known; the input ends with the body
            environ.pop("CONTENT_LENGTH", None)
    elif isinstance(request, UploadDone):
        file = open_upload(request.upload_path, settings.upload_dir)
        environ["wsgi.input"] = file
        environ["CONTENT_LENGTH"] = str(os.fstat(file.fileno()).st_size)
    else:
        environ["wsgi.input"] = io.BytesIO(request.body)
        if request.body or b"content-length" in headers:
            environ["CONTENT_LENGTH"] = str(len(request.body))
    return environ
