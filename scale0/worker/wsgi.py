"""Transport-free WSGI (PEP 3333) core: one Mongrel2 request in, HTTP bytes out.

Theory of operation: `run_wsgi` builds the environ, calls the app and turns its
output into ``send(bytes)`` calls carrying raw HTTP/1.x response bytes, which
Mongrel2 writes to the client as they are. No sockets or threads: the worker
runtime maps each send() onto reply messages. The environ is built by
worker/wsgi_environ.py, a spooled upload opened by worker/upload.py; this
module is the app's side: start_response, the response's framing and bytes.

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
import logging
import os
import re
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, BinaryIO, TextIO

from scale0.core.bodystream import BodyInput
from scale0.errors import ProtocolError
from scale0.wire.mongrel2 import HttpRequest, UploadDone
from scale0.worker.upload import BadRequest
from scale0.worker.wsgi_environ import (
    CACHE_MAX,
    TOKEN_RE,
    FileWrapper,
    WsgiSettings,
    build_environ,
    header_text,
    header_tokens,
)

if TYPE_CHECKING:
    from wsgiref.types import WSGIApplication

    from _typeshed import OptExcInfo

__all__ = ["ApplicationError", "BadRequest", "FileWrapper", "ResponseInfo", "WsgiSettings",
           "build_environ", "run_wsgi"]

logger = logging.getLogger(__name__)

# Status and field values: no CTLs except HTAB, latin-1 only (RFC 9110 5.5).
_VALUE_RE = re.compile(r"[\t\x20-\x7e\x80-\xff]*")
_STATUS_RE = re.compile(r"([1-5][0-9]{2}) [\t\x20-\x7e\x80-\xff]*")
# PEP 3333 "Other HTTP Features": apps must not send hop-by-hop headers.
_HOP_BY_HOP = frozenset(("connection", "keep-alive", "transfer-encoding", "te", "trailer",
                         "upgrade", "proxy-authenticate", "proxy-authorization"))
_warned_hop_by_hop: set[str] = set()
_STATUS_CODES: dict[str, int] = {}  # valid status lines seen -> their code (bounded)
_HEADER_NAMES: dict[str, str] = {}  # valid response header names seen -> lowercased


@dataclass(slots=True)
class ResponseInfo:
    status: int  # the status actually sent (500 when the app failed first)
    body_bytes: int  # body bytes sent, without headers or chunk framing
    close: bool  # the caller must close the client connection after these bytes
    ended: bool = False  # the final bytes went to run_wsgi's `last` callback


class ApplicationError(ProtocolError, RuntimeError):
    """The app broke a PEP 3333 rule (bad status/headers, no start_response...)."""

    def __init__(self, msg: str, *, status_hint: int = 500) -> None:
        super().__init__(msg, status_hint=status_hint)


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
            connection = header_tokens(header_text(request.headers, b"connection"))
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
            if len(_STATUS_CODES) < CACHE_MAX:
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
                if not TOKEN_RE.fullmatch(name):
                    raise ApplicationError(f"invalid header {name!r}: {value!r}")
                lname = name.lower()
                if len(names) < CACHE_MAX:
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
                tokens = header_tokens(value) if lname == "connection" else {lname}
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
