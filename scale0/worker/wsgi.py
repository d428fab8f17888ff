"""Transport-free WSGI (PEP 3333) core: one Mongrel2 request in, HTTP bytes out.

Theory of operation: `run_wsgi` builds the environ, calls the app and turns its
output into ``send(bytes)`` calls carrying raw HTTP/1.x response bytes, which
Mongrel2 writes to the client as they are (MONGREL2.md, "Reply message"). No
sockets or threads: the worker runtime maps each send() onto reply messages.

`_Response` keeps "status set" apart from "headers sent" (wsgiref, werkzeug):
headers wait for the first non-empty block or the end (PEP 3333, "Buffering and
Streaming"), so an error before that becomes a clean 500 and one after it can
only close. Framing is fixed when the headers go out: the app's Content-Length,
else one computed from a list/tuple result (or an empty body at the end), else
chunked on HTTP/1.1, else close-delimited. `ResponseInfo.close` asks the caller
to close the client connection: Mongrel2 never does it by itself.
"""

from __future__ import annotations

import http
import io
import logging
import os
import re
import stat
import sys
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, BinaryIO, Protocol, TextIO

from scale0.core.bodystream import BodyInput
from scale0.core.forwarded import LOOPBACK, Trust
from scale0.core.forwarded import apply as apply_forwarded
from scale0.errors import ProtocolError
from scale0.wire.mongrel2 import Headers, HttpRequest, UploadDone

if TYPE_CHECKING:
    from wsgiref.types import WSGIApplication

    from _typeshed import OptExcInfo

logger = logging.getLogger(__name__)

# RFC 9110 5.6.2 token; status and field values: no CTLs except HTAB, latin-1 only.
_TOKEN_RE = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_VALUE_RE = re.compile(r"[\t\x20-\x7e\x80-\xff]*")
_STATUS_RE = re.compile(r"([1-5][0-9]{2}) [\t\x20-\x7e\x80-\xff]*")
# PEP 3333 "Other HTTP Features": apps must not send hop-by-hop headers.
_HOP_BY_HOP = frozenset(("connection", "keep-alive", "transfer-encoding", "te", "trailer",
                         "upgrade", "proxy-authenticate", "proxy-authorization"))
_warned_hop_by_hop: set[str] = set()
_STATUS_CODES: dict[str, int] = {}  # valid status lines seen -> their code (bounded)
_HEADER_NAMES: dict[str, str] = {}  # valid response header names seen -> lowercased
# Mongrel2's own upload headers; a client can forge them (MONGREL2.md, "Uploads").
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


@dataclass(slots=True)
class ResponseInfo:
    status: int  # the status actually sent (500 when the app failed first)
    body_bytes: int  # body bytes sent, without headers or chunk framing
    close: bool  # the caller must close the client connection after these bytes
    ended: bool = False  # the final bytes went to run_wsgi's `last` callback


class BadRequest(ProtocolError):
    """The request cannot be given to the app; answer `status` (its
    `status_hint`) and close."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message, status_hint=status)
        self.status = status
        self.message = message


class ApplicationError(ProtocolError, RuntimeError):
    """The app broke a PEP 3333 rule (bad status/headers, no start_response...)."""

    def __init__(self, msg: str, *, status_hint: int = 500) -> None:
        super().__init__(msg, status_hint=status_hint)


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


def _header(headers: Headers, name: bytes) -> str | None:
    """A client header as str; repeats joined (RFC 9110 5.3), cookies with '; '."""
    value = headers.get(name)
    if value is None:
        return None
    if isinstance(value, list):
        value = (b"; " if name == b"cookie" else b", ").join(value)
    return value.decode("latin-1")


def _tokens(value: str | None) -> set[str]:
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


def _open_upload(upload_path: bytes, upload_dir: str | None) -> BinaryIO:
    """Open the temp_store file named by a client-forgeable path, only inside upload_dir."""
    if upload_dir is None:
        raise BadRequest(400, "uploads are not accepted here")
    name = os.fsdecode(os.path.basename(upload_path))
    if name in ("", ".", "..") or "\0" in name:
        raise BadRequest(400, "invalid upload path")
    real_dir = os.path.realpath(upload_dir)
    candidate = os.path.join(real_dir, name)
    if os.path.dirname(os.path.realpath(candidate)) != real_dir:  # symlink escape
        raise BadRequest(400, "upload path outside the upload folder")

    def opener(path: str, flags: int) -> int:
        # O_NOFOLLOW: no symlink swapped in after the check; O_NONBLOCK: a FIFO can't hang us.
        return os.open(path, flags | os.O_NOFOLLOW | os.O_NONBLOCK)

    try:
        file = open(candidate, "rb", opener=opener)  # noqa: SIM115 - closed by run_wsgi
    except OSError as exc:
        raise BadRequest(400, f"upload file unreadable: {exc.strerror}") from exc
    if not stat.S_ISREG(os.fstat(file.fileno()).st_mode):
        file.close()
        raise BadRequest(400, "upload path is not a regular file")
    os.set_blocking(file.fileno(), True)
    return file


# Caches of pure functions of client- or app-chosen strings, bounded so that a
# client sending ever new header names cannot grow them: once full, the value
# is computed each time (same result, only slower).
_CACHE_MAX = 1024
_SKIP = ""  # _ENVIRON_KEYS value of a request header the environ does not carry
_ENVIRON_KEYS: dict[bytes, str] = {}  # client header name -> environ key, or _SKIP
_SERVER_ADDRESSES: dict[tuple[bytes, str], tuple[str, str]] = {}
# The last (settings, errors) and their constant environ: a process has one of each.
_constant: tuple[WsgiSettings | None, TextIO | None, dict[str, Any]] = (None, None, {})


def _environ_key(key: bytes) -> str:
    """The environ key of client header `key` (PEP 3333 "environ Variables"), or _SKIP."""
    # Mongrel2 lowercases client names, so any uppercase key is its own (MONGREL2.md);
    # '_' names are dropped as werkzeug does: they would collide with '-' ones.
    if key in _UPLOAD_HEADERS or b"_" in key or key.lower() != key:
        return _SKIP
    name = key.decode("latin-1")
    if not _TOKEN_RE.fullmatch(name) or name == "content-length":  # length: from the body
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
        scheme = (_header(headers, b"URL_SCHEME") or "http").lower()
        scheme = scheme if scheme in ("http", "https") else "http"
    query = _header(headers, b"QUERY") or ""
    uri = _header(headers, b"URI")
    if uri is None:
        uri = request.path.decode("latin-1") + ("?" + query if query else "")
    raw_host = headers.get(b"host")
    if type(raw_host) is bytes and raw_host:
        address = _SERVER_ADDRESSES.get((raw_host, scheme))
        if address is None:
            address = _server_address(raw_host.decode("latin-1"), scheme, settings)
            if len(_SERVER_ADDRESSES) < _CACHE_MAX:
                _SERVER_ADDRESSES[raw_host, scheme] = address
    else:
        address = _server_address(_header(headers, b"host"), scheme, settings)
    environ = _constant_environ(settings, errors).copy()
    environ["REQUEST_METHOD"] = _header(headers, b"METHOD") or "GET"
    environ["SCRIPT_NAME"] = script_name
    environ["PATH_INFO"] = path_info
    environ["QUERY_STRING"] = query
    environ["SERVER_NAME"], environ["SERVER_PORT"] = address
    environ["SERVER_PROTOCOL"] = _header(headers, b"VERSION") or "HTTP/1.0"
    environ["REQUEST_URI"] = environ["RAW_URI"] = uri
    environ["wsgi.url_scheme"] = scheme
    environ["scale0.conn_id"] = request.conn_id
    remote_addr = _header(headers, b"REMOTE_ADDR")
    if remote_addr is not None:
        environ["REMOTE_ADDR"] = remote_addr
    keys = _ENVIRON_KEYS
    for key, value in headers.items():
        environ_key = keys.get(key)
        if environ_key is None:
            environ_key = _environ_key(key)
            if len(keys) < _CACHE_MAX:
                keys[key] = environ_key
        if environ_key:
            if type(value) is bytes:
                environ[environ_key] = value.decode("latin-1")
            else:
                environ[environ_key] = _header(headers, key) or ""
    apply_forwarded(environ, headers, settings.forwarded)  # core/forwarded.py
    if body is not None:  # upload.stream: the body arrives as the app reads (core/bodystream.py)
        environ["wsgi.input"] = body
        length = headers.get(b"content-length")
        if type(length) is bytes and length.isdigit():
            environ["CONTENT_LENGTH"] = length.decode("ascii")
        else:  # chunked: the length is not known; the input ends with the body
            environ.pop("CONTENT_LENGTH", None)
    elif isinstance(request, UploadDone):
        file = _open_upload(request.upload_path, settings.upload_dir)
        environ["wsgi.input"] = file
        environ["CONTENT_LENGTH"] = str(os.fstat(file.fileno()).st_size)
    else:
        environ["wsgi.input"] = io.BytesIO(request.body)
        if request.body or b"content-length" in headers:
            environ["CONTENT_LENGTH"] = str(len(request.body))
    return environ


class _Response:
    """start_response/write state and HTTP/1.x framing for one request."""

    def __init__(self, send: Callable[[bytes], None], request: HttpRequest | UploadDone,
                 last: Callable[[bytes, bool], None] | None = None) -> None:
        self._send_cb = send
        self._last_cb = last
        self.ended = False  # the final bytes went to `last`
        self.head_only = request.method == b"HEAD"
        self.http11 = request.header(b"VERSION") == b"HTTP/1.1"
        if b"connection" in request.headers:
            connection = _tokens(_header(request.headers, b"connection"))
            self.request_close = "close" in connection
            self.request_keep_alive = "keep-alive" in connection
        else:
            self.request_close = self.request_keep_alive = False
        self.status_line: str | None = None  # set by start_response, not yet sent
        self.status = 0
        self.headers: list[tuple[str, str]] = []
        self.app_length: int | None = None
        self.app_close = False
        self.computed_length: int | None = None  # from a list/tuple result
        self.headers_sent = self.no_body = self.chunked = self.close = self.truncated = False
        self.length: int | None = None  # the framing length once headers are sent
        self.body_bytes = 0
        self.transport_error: BaseException | None = None

    def start_response(
        self, status: str, headers: list[tuple[str, str]], exc_info: OptExcInfo | None = None, /
    ) -> Callable[[bytes], object]:
        # PEP 3333 "The start_response() Callable": a second call needs exc_info, which
        # is re-raised when headers are already out, else the new status replaces the old.
        if exc_info is not None and exc_info[1] is not None:
            try:
                if self.headers_sent:
                    raise exc_info[1].with_traceback(exc_info[2])
            finally:
                exc_info = None  # no frame <-> traceback cycle
        elif self.status_line is not None:
            raise ApplicationError("start_response() called again without exc_info")
        self._set_status(status, headers)
        return self.write

    def _set_status(self, status: str, headers: list[tuple[str, str]]) -> None:
        if not isinstance(status, str):
            raise ApplicationError(f"invalid status {status!r}")
        code = _STATUS_CODES.get(status)
        if code is None:
            if not _STATUS_RE.fullmatch(status):
                raise ApplicationError(f"invalid status {status!r}")
            code = int(status[:3])
            if len(_STATUS_CODES) < _CACHE_MAX:
                _STATUS_CODES[status] = code
        kept: list[tuple[str, str]] = []
        app_length: int | None = None
        app_close = False
        names = _HEADER_NAMES
        for item in headers:
            if not (isinstance(item, tuple) and len(item) == 2
                    and isinstance(item[0], str) and isinstance(item[1], str)):
                raise ApplicationError(f"header {item!r} is not a (str, str) tuple")
            name, value = item
            lname = names.get(name)
            if lname is None:
                if not _TOKEN_RE.fullmatch(name):
                    raise ApplicationError(f"invalid header {name!r}: {value!r}")
                lname = name.lower()
                if len(names) < _CACHE_MAX:
                    names[name] = lname
            # Printable ASCII (0x20-0x7e) is what _VALUE_RE accepts outside HTAB and 0x80-0xff.
            if not (value.isascii() and value.isprintable()) and not _VALUE_RE.fullmatch(value):
                raise ApplicationError(f"invalid header {name!r}: {value!r}")
            if lname == "content-length":
                value = value.strip(" \t")
                if not (value.isascii() and value.isdigit()):
                    raise ApplicationError(f"invalid Content-Length {value!r}")
                if app_length is None:
                    app_length = int(value)
                    kept.append((name, value))
                elif app_length != int(value):  # RFC 9112 6.3: conflicting lengths
                    raise ApplicationError("conflicting Content-Length headers")
            elif lname in _HOP_BY_HOP:
                tokens = _tokens(value) if lname == "connection" else {lname}
                app_close = app_close or "close" in tokens
                if tokens - {"close"} and lname not in _warned_hop_by_hop:
                    _warned_hop_by_hop.add(lname)
                    logger.warning("dropping hop-by-hop header %s from the app", name)
            else:
                kept.append((name, value))
        self.status_line = status
        self.status = code
        self.headers = kept
        self.app_length = app_length
        self.app_close = app_close

    def write(self, data: bytes) -> None:
        """The PEP 3333 write() callable; also takes each block of the result."""
        if self.status_line is None:
            raise ApplicationError("body before start_response()")
        if not isinstance(data, bytes):
            raise ApplicationError(f"body block must be bytes, not {type(data).__name__}")
        if data:
            self._emit(data)

    def _send(self, data: bytes, final: bool = False) -> None:
        if self.transport_error is not None:
            raise self.transport_error
        try:
            if final and self._last_cb is not None:
                self.ended = True
                self._last_cb(data, self.close)
            else:
                self._send_cb(data)
        except BaseException as exc:
            self.transport_error = exc  # the transport's error, not the app's
            raise

    def _emit(self, data: bytes) -> None:
        # PEP 3333 "Buffering and Streaming": each block goes out before the next one.
        if self.truncated:
            return
        head = b"" if self.headers_sent else self._head(None)
        if self.no_body:
            data = b""  # HEAD, 1xx, 204, 304: the app's blocks are dropped
        if self.length is not None and self.body_bytes + len(data) > self.length:
            logger.error("app body longer than Content-Length %d: truncated", self.length)
            data = data[: self.length - self.body_bytes]
            self.truncated = self.close = True
        self.body_bytes += len(data)
        if self.chunked:
            self._send(b"".join((head, b"%x\r\n" % len(data), data, b"\r\n")))
        elif head or data:
            # Complete once the declared length is out (or there is no body).
            final = self.no_body or self.body_bytes == self.length
            self._send(head + data, final)

    def _head(self, body_length: int | None) -> bytes:
        """Status line and headers; fixes framing and keep-alive (RFC 9112 6, 9.3)."""
        if self.status_line is None:
            raise ApplicationError("the app returned without calling start_response()")
        self.headers_sent = True
        self.no_body = self.head_only or self.status < 200 or self.status in (204, 304)
        headers = list(self.headers)
        length = self.app_length
        if length is None and not self.no_body:
            length = self.computed_length if body_length is None else body_length
            if length is not None:
                headers.append(("Content-Length", str(length)))
        self.length = length
        framed = self.no_body or length is not None
        if self.http11:
            close = self.request_close or self.app_close
            self.chunked = not framed
        else:  # HTTP/1.0 keeps alive only when asked and the end is known
            close = self.app_close or not (self.request_keep_alive and framed)
            if not close:
                headers.append(("Connection", "keep-alive"))
        if self.chunked:
            headers.append(("Transfer-Encoding", "chunked"))
        if close:
            headers.append(("Connection", "close"))
            self.close = True
        lines = [f"{'HTTP/1.1' if self.http11 else 'HTTP/1.0'} {self.status_line}\r\n"]
        lines += [f"{name}: {value}\r\n" for name, value in headers]
        lines.append("\r\n")
        return "".join(lines).encode("latin-1")

    def finish(self) -> None:
        if not self.headers_sent:  # nothing came: the whole body is known to be empty
            self._send(self._head(0), final=True)
        elif self.chunked:
            self._send(b"0\r\n\r\n", final=True)
        if not self.no_body and self.length is not None and self.body_bytes < self.length:
            logger.error("app body shorter than Content-Length: %d < %d", self.body_bytes,
                         self.length)
            self.close = True

    def send_error(self, status: int, message: str, *, close: bool = False) -> None:
        """A plain-text response of our own; only while no header was sent."""
        body = message.encode()
        headers = [("Content-Type", "text/plain; charset=utf-8"),
                   ("Content-Length", str(len(body)))]
        if close:
            headers.append(("Connection", "close"))
        self._set_status(f"{status} {http.HTTPStatus(status).phrase}", headers)
        self._emit(body)
        self.finish()

    def info(self) -> ResponseInfo:
        return ResponseInfo(status=self.status, body_bytes=self.body_bytes, close=self.close,
                            ended=self.ended)


def _drive(app: WSGIApplication, environ: dict[str, Any], response: _Response) -> None:
    result: Iterable[bytes] = app(environ, response.start_response)
    try:
        # Every block is already here: send a Content-Length, not chunks (wsgiref does
        # it for one block). Not once write() has sent the headers.
        if isinstance(result, (list, tuple)) and not response.headers_sent:
            if len(result) == 1 and type(result[0]) is bytes:
                response.computed_length = len(result[0])
            elif all(isinstance(block, bytes) for block in result):
                response.computed_length = sum(len(block) for block in result)
        for block in result:
            response.write(block)
            if response.truncated:
                break
    finally:
        # PEP 3333 "Specification Details": close() is called on every path.
        close = getattr(result, "close", None)
        if close is not None:
            close()
    response.finish()


def run_wsgi(app: WSGIApplication, request: HttpRequest | UploadDone, *, script_name: str,
             path_info: str, send: Callable[[bytes], None], settings: WsgiSettings,
             errors: TextIO | None = None,
             last: Callable[[bytes, bool], None] | None = None,
             body: BodyInput | None = None) -> ResponseInfo:
    """Run `app` on one request; send() gets the HTTP response bytes as produced.

    With `last`, the bytes that complete the response go to last(data, close)
    instead (once at most; then `ResponseInfo.ended`), so a transport can end
    the request in the same message. Without it, everything goes to send().

    App errors never escape (500 before the first byte, else close=True);
    exceptions raised by send() itself propagate after the iterable is closed.
    """
    response = _Response(send, request, last)
    try:
        environ = build_environ(request, script_name=script_name, path_info=path_info,
                                settings=settings, errors=sys.stderr if errors is None else errors,
                                body=body)
    except BadRequest as exc:
        logger.warning("bad request on connection %d: %s", request.conn_id, exc.message)
        response.send_error(exc.status, exc.message, close=True)
        return response.info()
    upload: BinaryIO | None = environ["wsgi.input"] if isinstance(request, UploadDone) else None
    try:
        _drive(app, environ, response)
    except Exception as exc:
        if response.transport_error is not None:
            if exc is response.transport_error:
                raise
            raise response.transport_error from exc  # the app wrapped it in its own error
        if body is not None and body.aborted is not None:  # it ended while the app read
            if exc is body.aborted:
                raise
            raise body.aborted from exc
        logger.exception("WSGI app failed on %s %s%s", environ["REQUEST_METHOD"],
                         script_name, path_info)
        if response.headers_sent:
            response.close = True
        else:
            response.send_error(500, "Internal Server Error")
    finally:
        if upload is not None:
            upload.close()
            if settings.delete_uploads:
                try:
                    os.unlink(upload.name)
                except FileNotFoundError:
                    pass  # the app moved it away
    return response.info()
