"""Transport-free ASGI 3.0 pieces: Mongrel2 messages in, scopes and HTTP/WebSocket bytes out.

Theory of operation: the runtime (worker/asgi_loop.py) gets Mongrel2 messages
from the broker and writes raw reply bytes, which Mongrel2 copies to the
client as they are (docs/protocol.md section 12). This module holds what is
pure in that: the connection scopes of the ASGI spec ("HTTP & WebSocket ASGI
Message Format" 2.x), the HTTP/1.x framing of `http.response.*` messages
(`HttpResponse`), and RFC 6455 server frames. No sockets, no event loop.

Scopes: `path` is the whole normalised path, percent-decoded, and
`root_path` the route prefix it lies under (the REQUEST's script_name), as
Starlette and uvicorn read them (path includes root_path); `raw_path` is
the path exactly as the client sent it. Headers are the client's, in
Mongrel2's order with repeats kept, lower-case byte pairs; Mongrel2's own
upper-case keys and the forgeable upload headers are left out.
"""

from __future__ import annotations

import re
import struct
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any
from urllib.parse import unquote

from scale0 import errors
from scale0.core.forwarded import LOOPBACK, Trust
from scale0.core.forwarded import apply as apply_forwarded
from scale0.core.routing import normalize_path, split_script_name
from scale0.wire.mongrel2 import Message

ASGI_VERSION = {"version": "3.0", "spec_version": "2.4"}
WEBSOCKET_VERSION = {"version": "3.0", "spec_version": "2.4"}

# RFC 9110 5.6.2 token; field values: no CTLs but HTAB.
_TOKEN_RE = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_VALUE_RE = re.compile(rb"[\t\x20-\x7e\x80-\xff]*")
# We frame the body ourselves; an app must not (RFC 9110 7.6.1, ASGI "Response Start").
_FRAMING = frozenset((b"transfer-encoding", b"keep-alive", b"te", b"trailer", b"upgrade",
                      b"proxy-connection"))
_UPLOAD_HEADERS = frozenset((b"x-mongrel2-upload-start", b"x-mongrel2-upload-done"))
REASONS = {status.value: status.phrase.encode("ascii") for status in HTTPStatus}


class ProtocolError(errors.ProtocolError, RuntimeError):
    """The app sent a message the ASGI spec does not allow here."""

    def __init__(self, msg: str, *, status_hint: int = 500) -> None:
        super().__init__(msg, status_hint=status_hint)


def client_headers(message: Message) -> list[tuple[bytes, bytes]]:
    """The client's headers as ASGI wants them (see the module docstring)."""
    out: list[tuple[bytes, bytes]] = []
    for name, value in message.headers.items():
        # Mongrel2 lowercases client names, so an upper-case key is its own.
        if name.lower() != name or name in _UPLOAD_HEADERS:
            continue
        if isinstance(value, list):
            out.extend((name, v) for v in value)
        else:
            out.append((name, value))
    return out


def _text(message: Message, name: bytes) -> str | None:
    value = message.header(name)
    return None if value is None else value.decode("latin-1")


def _server(host: str | None, secure: bool) -> list[Any] | None:
    if not host:
        return None
    if host.startswith("["):  # IPv6 literal "[::1]:8080"
        name, _, rest = host.partition("]")
        name, port = name + "]", rest[1:] if rest.startswith(":") else ""
    else:
        name, _, port = host.partition(":")
    return [name, int(port) if port.isascii() and port.isdigit() else (443 if secure else 80)]


def _paths(message: Message, script_name: str) -> tuple[str, str]:
    """(path, root_path), both percent-decoded; root_path '' off the route."""
    path = normalize_path(message.path)
    try:
        root, rest = split_script_name(path, script_name)
    except ValueError:
        root, rest = "", unquote(path, errors="surrogateescape")
    return root + rest, root


def _peer(message: Message, trusted: Trust) -> tuple[bool, str | None]:
    """(secure, client address): Mongrel2's, or a trusted front's proxy headers
    (core/forwarded.py, the same rules as the WSGI environ)."""
    secure = (message.header(b"URL_SCHEME") or b"http").lower() == b"https"
    environ: dict[str, Any] = {"wsgi.url_scheme": "https" if secure else "http",
                               "HTTP_HOST": _text(message, b"host")}
    remote = _text(message, b"REMOTE_ADDR")
    if remote is not None:
        environ["REMOTE_ADDR"] = remote
    apply_forwarded(environ, message.headers, trusted)
    return environ["wsgi.url_scheme"] == "https", environ.get("REMOTE_ADDR")


def _common(message: Message, script_name: str, state: Mapping[str, Any] | None,
            trusted: Trust) -> tuple[dict[str, Any], bool]:
    path, root = _paths(message, script_name)
    version = _text(message, b"VERSION") or "HTTP/1.1"
    secure, remote = _peer(message, trusted)
    scope: dict[str, Any] = {
        "http_version": version[5:] if version.startswith("HTTP/") else "1.1",
        "path": path,
        "raw_path": message.path,
        "root_path": root,
        "query_string": message.header(b"QUERY") or b"",
        "headers": client_headers(message),
        # Mongrel2 gives the peer's address but not its port.
        "client": [remote, 0] if remote else None,
        "server": _server(_text(message, b"host"), secure),
    }
    if state is not None:
        scope["state"] = dict(state)  # a shallow copy per connection (ASGI lifespan "state")
    return scope, secure


def http_scope(message: Message, script_name: str, state: Mapping[str, Any] | None = None,
               trusted: Trust = LOOPBACK) -> dict[str, Any]:
    """The ASGI HTTP connection scope of a Mongrel2 request (or upload-done)."""
    common, secure = _common(message, script_name, state, trusted)
    return {"type": "http", "asgi": dict(ASGI_VERSION),
            "method": (message.header(b"METHOD") or b"GET").decode("latin-1"),
            "scheme": "https" if secure else "http", **common}


def websocket_scope(message: Message, script_name: str,
                    state: Mapping[str, Any] | None = None,
                    trusted: Trust = LOOPBACK) -> dict[str, Any]:
    """The ASGI WebSocket connection scope of a Mongrel2 WEBSOCKET_HANDSHAKE."""
    common, secure = _common(message, script_name, state, trusted)
    scope = {"type": "websocket", "asgi": dict(WEBSOCKET_VERSION),
             "scheme": "wss" if secure else "ws", **common}
    offered = message.headers.get(b"sec-websocket-protocol")
    values = offered if isinstance(offered, list) else [offered] if offered else []
    scope["subprotocols"] = [p.strip().decode("latin-1") for v in values for p in v.split(b",")
                             if p.strip()]
    return scope


def _check_headers(headers: Any) -> list[tuple[bytes, bytes]]:
    if not isinstance(headers, Iterable):
        raise ProtocolError("headers must be an iterable of [name, value] byte pairs")
    out = []
    for item in headers:
        try:
            name, value = item
        except (TypeError, ValueError):
            raise ProtocolError(f"header {item!r} is not a [name, value] pair") from None
        if not isinstance(name, bytes) or not isinstance(value, bytes):
            raise ProtocolError(f"header {item!r}: name and value must be bytes")
        if not _TOKEN_RE.fullmatch(name) or not _VALUE_RE.fullmatch(value):
            raise ProtocolError(f"invalid header {name!r}: {value!r}")
        out.append((name, value))
    return out


def _head(version: bytes, status: int, headers: list[tuple[bytes, bytes]]) -> bytes:
    lines = [b"%s %d %s\r\n" % (version, status, REASONS.get(status, b"Unknown"))]
    lines += [b"%s: %s\r\n" % pair for pair in headers]
    lines.append(b"\r\n")
    return b"".join(lines)


class HttpResponse:
    """HTTP/1.x framing of one ASGI response (`http.response.start`/`body`).

    Headers wait for the first body message, so a response whose first body
    is also its last gets a Content-Length; a streamed one without a length
    is chunked on HTTP/1.1 (each `body` is one chunk, sent at once: Server-
    Sent Events arrive as sent) and close-delimited on HTTP/1.0. `close`
    tells the caller to close the client connection after the last bytes.
    """

    def __init__(self, request: Message) -> None:
        self.head_only = request.method == b"HEAD"
        self.http11 = request.header(b"VERSION") == b"HTTP/1.1"
        connection = {t.strip().lower() for t in (request.header(b"connection") or b"").split(b",")}
        self.request_close = b"close" in connection
        self.request_keep_alive = b"keep-alive" in connection
        self.status = 0
        self.started = False  # http.response.start received
        self.headers_sent = False
        self.complete = False  # the last body went out
        self.close = False
        self.chunked = False
        self.no_body = False
        self.length: int | None = None
        self.body_bytes = 0
        self._headers: list[tuple[bytes, bytes]] = []
        self._app_close = False

    def start(self, message: Mapping[str, Any]) -> None:
        if self.started:
            raise ProtocolError("http.response.start sent twice")
        status = message.get("status")
        if type(status) is not int or not 100 <= status <= 599:
            raise ProtocolError(f"invalid status {status!r}")
        if message.get("trailers"):
            # We do not offer the http.response.trailers extension (no TE: trailers
            # passes Mongrel2 reliably); refusing beats dropping them silently.
            raise ProtocolError("response trailers are not supported by this server")
        kept = []
        for name, value in _check_headers(message.get("headers", ())):
            lname = name.lower()
            if lname == b"content-length":
                if not value.strip().isdigit():
                    raise ProtocolError(f"invalid content-length {value!r}")
                if self.length is not None and self.length != int(value):
                    raise ProtocolError("conflicting content-length headers")
                if self.length is None:
                    self.length = int(value)
                    kept.append((name, value.strip()))
            elif lname == b"connection":
                self._app_close = self._app_close or b"close" in value.lower()
            elif lname not in _FRAMING:
                kept.append((name, value))
        self.status = status
        self._headers = kept
        self.started = True

    def body(self, data: bytes, more: bool) -> bytes:
        """The bytes to write for one `http.response.body`."""
        if not self.started:
            raise ProtocolError("http.response.body before http.response.start")
        if self.complete:
            raise ProtocolError("http.response.body after the response completed")
        if not isinstance(data, bytes):
            raise ProtocolError(f"body must be bytes, not {type(data).__name__}")
        head = b"" if self.headers_sent else self._head(None if more else len(data))
        if self.no_body:
            data = b""
        elif self.length is not None and self.body_bytes + len(data) > self.length:
            raise ProtocolError(f"response body longer than content-length {self.length}")
        self.body_bytes += len(data)
        if not more:
            self.complete = True
            if self.length is not None and not self.no_body and self.body_bytes < self.length:
                raise ProtocolError("response body shorter than content-length")
        if self.chunked:
            chunk = b"%x\r\n%s\r\n" % (len(data), data) if data else b""
            return head + chunk + (b"0\r\n\r\n" if not more else b"")
        return head + data

    def _head(self, length: int | None) -> bytes:
        self.headers_sent = True
        self.no_body = self.head_only or self.status < 200 or self.status in (204, 304)
        headers = self._headers
        if self.length is None and not self.no_body and length is not None:
            self.length = length
            headers.append((b"content-length", b"%d" % length))
        framed = self.no_body or self.length is not None
        if self.http11:
            close = self.request_close or self._app_close
            self.chunked = not framed
        else:  # HTTP/1.0 keeps alive only when asked and the end is known
            close = self._app_close or not (self.request_keep_alive and framed)
            if not close:
                headers.append((b"connection", b"keep-alive"))
        if self.chunked:
            headers.append((b"transfer-encoding", b"chunked"))
        if close:
            headers.append((b"connection", b"close"))
            self.close = True
        return _head(b"HTTP/1.1" if self.http11 else b"HTTP/1.0", self.status, headers)


def error_response(status: int, text: str, *, close: bool = False) -> bytes:
    """A small text/plain response of our own (500 when the app failed, 403 ...)."""
    body = text.encode() + b"\n"
    headers = [(b"content-type", b"text/plain; charset=utf-8"),
               (b"content-length", b"%d" % len(body))]
    if close:
        headers.append((b"connection", b"close"))
    return _head(b"HTTP/1.1", status, headers) + body


# ---- WebSocket (RFC 6455) ---------------------------------------------------

OP_CONT, OP_TEXT, OP_BINARY, OP_CLOSE, OP_PING, OP_PONG = 0x0, 0x1, 0x2, 0x8, 0x9, 0xA
CLOSE_NORMAL, CLOSE_GOING_AWAY, CLOSE_PROTOCOL, CLOSE_NO_STATUS = 1000, 1001, 1002, 1005
CLOSE_ABNORMAL, CLOSE_INVALID_DATA, CLOSE_TOO_BIG, CLOSE_INTERNAL = 1006, 1007, 1009, 1011


def frame(opcode: int, payload: bytes, fin: bool = True) -> bytes:
    """One unmasked server frame (RFC 6455 5.2): servers never mask."""
    n = len(payload)
    first = (0x80 if fin else 0) | opcode
    if n < 126:
        head = struct.pack("!BB", first, n)
    elif n < 1 << 16:
        head = struct.pack("!BBH", first, 126, n)
    else:
        head = struct.pack("!BBQ", first, 127, n)
    return head + payload


def close_frame(code: int, reason: str = "") -> bytes:
    """A close frame; 1005/1006 are never sent on the wire (RFC 6455 7.4.1)."""
    if code in (CLOSE_NO_STATUS, CLOSE_ABNORMAL):
        return frame(OP_CLOSE, b"")
    data = reason.encode("utf-8")[:123]  # control frame payloads are at most 125 bytes
    return frame(OP_CLOSE, struct.pack("!H", code) + data)


def parse_close(payload: bytes) -> tuple[int, str]:
    """(code, reason) of a client's close frame; 1005 when it carries none."""
    if len(payload) < 2:
        return CLOSE_NO_STATUS, ""
    code = struct.unpack("!H", payload[:2])[0]
    return code, payload[2:].decode("utf-8", "replace")


def valid_close_code(code: object) -> bool:
    """A code an app may send (RFC 6455 7.4: 1000-1003, 1007-1014, 3000-4999)."""
    return type(code) is int and (code in (1000, 1001, 1002, 1003)
                                  or 1007 <= code <= 1014 or 3000 <= code <= 4999)


@dataclass(frozen=True, slots=True)
class Accept:
    subprotocol: str | None
    headers: list[tuple[bytes, bytes]]


def accept_message(message: Mapping[str, Any], offered: list[str]) -> Accept:
    subprotocol = message.get("subprotocol")
    if subprotocol is not None and not isinstance(subprotocol, str):
        raise ProtocolError("websocket.accept subprotocol must be a str or None")
    if subprotocol is not None and subprotocol not in offered:
        raise ProtocolError(f"subprotocol {subprotocol!r} was not offered by the client")
    headers = _check_headers(message.get("headers", ()))
    for name, _ in headers:
        if name.lower() in (b"sec-websocket-accept", b"sec-websocket-protocol", b"upgrade",
                            b"connection", b"content-length", b"transfer-encoding"):
            raise ProtocolError(f"websocket.accept may not set {name!r}")
    return Accept(subprotocol, headers)


def handshake_response(accept_key: bytes, accept: Accept) -> bytes:
    """The 101 response; `accept_key` is Mongrel2's computed Sec-WebSocket-Accept
    (the handshake message's body)."""
    headers = [(b"Upgrade", b"websocket"), (b"Connection", b"Upgrade"),
               (b"Sec-WebSocket-Accept", accept_key)]
    if accept.subprotocol:
        headers.append((b"Sec-WebSocket-Protocol", accept.subprotocol.encode("latin-1")))
    return _head(b"HTTP/1.1", 101, headers + accept.headers)
