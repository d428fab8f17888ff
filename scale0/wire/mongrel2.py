"""Mongrel2 handler protocol, sans-IO: bytes in, typed events out.

Theory of operation
-------------------
Mongrel2 (docs/mongrel2.md, "Request message") PUSHes one message per event::

    SENDER SP CONN_ID SP PATH SP HLEN ":" HEADERS ("," | "}") BLEN ":" BODY ","

HEADERS is a JSON object (handler protocol 'json', ends with ",") or a
tnetstring dict (protocol 'tnetstring', ends with "}"). `parse_message` turns
one such message into exactly one event or raises `Mongrel2ProtocolError`;
nothing else ever escapes it, whatever the input.

Header names and values stay bytes (JSON strings are re-encoded to UTF-8, which
gives back Mongrel2's original bytes). Repeated client headers arrive as lists.

Replies (handler -> Mongrel2) are built and parsed in `mongrel2_reply`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import cast

import tnetstring

from scale0.errors import ProtocolError

HeaderValue = bytes | list[bytes]
Headers = dict[bytes, HeaderValue]

class Mongrel2ProtocolError(ProtocolError, ValueError):
    """A message that is not valid Mongrel2 handler protocol.

    `status_hint` is the HTTP status to answer with when a client waits.
    """


@dataclass(frozen=True, slots=True)
class Message:
    """Fields common to every message Mongrel2 sends a handler."""

    sender: bytes
    conn_id: int
    path: bytes
    headers: Headers
    body: bytes

    def header(self, name: bytes) -> bytes | None:
        """The value of header `name`; the last one if it was repeated."""
        value = self.headers.get(name)
        if isinstance(value, list):
            return value[-1] if value else None
        return value

    @property
    def method(self) -> bytes:
        return self.header(b"METHOD") or b""


@dataclass(frozen=True, slots=True)
class HttpRequest(Message):
    """An ordinary HTTP request with its whole body."""


@dataclass(frozen=True, slots=True)
class UploadStart(Message):
    """First of the temp_store pair: the body is being written to `upload_path`."""

    upload_path: bytes


@dataclass(frozen=True, slots=True)
class UploadDone(Message):
    """Second of the temp_store pair: the body is complete in `upload_path`.

    `upload_path` comes from a header a client can forge: only trust it when
    it lies inside the configured temp_store and an UploadStart preceded it.
    """

    upload_path: bytes


@dataclass(frozen=True, slots=True)
class UploadChunk(Message):
    """``upload.stream=1``: the next piece of a request body (docs/mongrel2.md
    "Uploads"). Mongrel2 sends it with only ``UPLOAD_STREAM`` (the piece's
    offset in the body) and, on the last piece, ``UPLOAD_STREAM_DONE``, after
    the request message itself (which carries ``UPLOAD_STREAM: 0``). It sends
    pieces only within the credits a ``ctl`` reply granted (core/bodystream.py)."""

    offset: int
    done: bool


@dataclass(frozen=True, slots=True)
class WebSocketHandshake(Message):
    """A valid upgrade request; `body` is the computed Sec-WebSocket-Accept."""


@dataclass(frozen=True, slots=True)
class WebSocketFrame(Message):
    """One reassembled, unmasked frame; `flags` is the FLAGS byte (e.g. 0x81)."""

    flags: int


@dataclass(frozen=True, slots=True)
class Disconnect(Message):
    """The client closed `conn_id` (or a reply named an unknown/closed id)."""


@dataclass(frozen=True, slots=True)
class Credits(Message):
    """download.flow_control: Mongrel2 wrote `credits` more bytes to the client."""

    credits: int


@dataclass(frozen=True, slots=True)
class JsonMessage(Message):
    """Any other METHOD JSON message (e.g. a JSON socket message `@path {...}`)."""

    data: object


Event = (
    HttpRequest
    | UploadStart
    | UploadDone
    | UploadChunk
    | WebSocketHandshake
    | WebSocketFrame
    | Disconnect
    | Credits
    | JsonMessage
)


# ---- Parsing (Mongrel2 -> handler) ----

_MAX_LEN_DIGITS = 10  # netstring lengths: ASCII decimal, at most 10 digits
MAX_ID_DIGITS = 20  # conn ids fit a uint64 (Mongrel2 uses uint32)
_COMMA, _BRACE = ord(","), ord("}")
_HEX = b"0123456789abcdefABCDEF"
# json protocol: Mongrel2 escapes only '"' and '\\' (docs/mongrel2.md), so raw TABs
# and other control bytes reach us inside strings; strict=False keeps them.
_HEADER_JSON = json.JSONDecoder(strict=False)
# What tnetstring and json raise on bad input: ValueError (incl. JSONDecodeError,
# Unicode errors), TypeError (unhashable dict key), RecursionError (deep nesting).
_DECODE_ERRORS = (ValueError, TypeError, RecursionError)
_error = Mongrel2ProtocolError  # status_hint 400: whoever sent it gets a 400


def is_decimal(raw: bytes, max_digits: int) -> bool:
    """Canonical ASCII decimal: no sign, no spaces, no leading zero."""
    # bytes.isdigit() is ASCII-only; raw[0] != 0x30 rejects "007" but not "0".
    return 0 < len(raw) <= max_digits and raw.isdigit() and (raw[0] != 0x30 or len(raw) == 1)


MAX_LENGTH_DIGITS = 18  # a longer Content-Length is over any body limit (and int64)


def content_length(value: bytes | None) -> int | None:
    """A Content-Length header value as a number; None when absent or not
    decimal digits. A value of more than MAX_LENGTH_DIGITS digits (leading
    zeros aside) comes back as 10**MAX_LENGTH_DIGITS, over every limit, so
    that no caller runs int() on thousands of digits, which Python refuses
    with ValueError."""
    if value is None or not value.isdigit():
        return None
    value = value.lstrip(b"0") or b"0"
    return int(value) if len(value) <= MAX_LENGTH_DIGITS else 10 ** MAX_LENGTH_DIGITS


def netstring_span(data: bytes, pos: int, what: str) -> tuple[int, int]:
    """Payload bounds [start, end) of the netstring at data[pos:]; data[end] is
    its (unchecked) terminator. A length past the data raises before any slicing."""
    colon = data.find(b":", pos, pos + _MAX_LEN_DIGITS + 1)
    if colon < 0 or not is_decimal(data[pos:colon], _MAX_LEN_DIGITS):
        raise _error(f"{what}: bad netstring length")
    start = colon + 1
    end = start + int(data[pos:colon])
    if end >= len(data):
        raise _error(f"{what}: netstring length exceeds the data")
    return start, end


def _json_headers(raw: bytes) -> Headers:
    try:
        obj = _HEADER_JSON.decode(raw.decode("utf-8"))
    except _DECODE_ERRORS as exc:
        raise _error(f"headers: invalid JSON: {exc}") from exc
    if type(obj) is not dict:
        raise _error("headers: not a JSON object")
    headers: Headers = {}
    try:
        for key, value in obj.items():
            if type(value) is str:
                headers[key.encode("utf-8")] = value.encode("utf-8")
            elif type(value) is list and all(type(v) is str for v in value):
                headers[key.encode("utf-8")] = [v.encode("utf-8") for v in value]
            else:
                raise _error("headers: values must be strings or lists of strings")
    except UnicodeEncodeError as exc:  # a lone surrogate escape such as \ud800
        raise _error("headers: not encodable as UTF-8") from exc
    return headers


def _tnet_headers(raw: bytes) -> Headers:
    try:
        obj = tnetstring.loads(raw)
    except _DECODE_ERRORS as exc:
        raise _error(f"headers: invalid tnetstring: {exc}") from exc
    if type(obj) is not dict:
        raise _error("headers: not a tnetstring dict")
    for key, value in obj.items():
        if type(key) is not bytes or not (
            type(value) is bytes or (type(value) is list and all(type(v) is bytes for v in value))
        ):
            raise _error("headers: keys must be bytes, values bytes or lists of bytes")
    return cast(Headers, obj)


def _json_body(body: bytes) -> object:
    try:
        return json.loads(body.decode("utf-8"))
    except _DECODE_ERRORS as exc:
        raise _error(f"body: invalid JSON: {exc}") from exc


def _single(headers: Headers, name: bytes) -> bytes | None:
    """A header Mongrel2 sets once, or None; a list means a client forged it too."""
    value = headers.get(name)
    if isinstance(value, list) or value == b"":
        raise _error(f"header {name!r} repeated or empty")
    return value


def parse_message(data: bytes) -> Event:
    """Parse one Mongrel2 -> handler message (either handler protocol).

    Raises Mongrel2ProtocolError, and nothing else, on any malformed input.
    """
    # SENDER SP CONN_ID SP PATH SP: none of the three may contain a space.
    # One call per request: the netstring checks are written out here.
    find = data.find
    sp1 = find(b" ")
    sp2 = find(b" ", sp1 + 1)
    sp3 = find(b" ", sp2 + 1)
    if sp1 <= 0 or sp2 < 0 or sp3 <= sp2 + 1:
        raise _error("expected 'SENDER CONN_ID PATH NETSTRINGS', none empty")
    raw_id = data[sp1 + 1 : sp2]
    if not (raw_id.isdigit() and len(raw_id) <= MAX_ID_DIGITS):
        raise _error("CONN_ID is not a decimal number")

    pos = sp3 + 1
    colon = find(b":", pos, pos + _MAX_LEN_DIGITS + 1)
    length = data[pos:colon]
    if colon < 0 or not length.isdigit() or (length[0] == 0x30 and colon - pos > 1):
        raise _error("headers: bad netstring length")
    hend = colon + 1 + int(length)
    size = len(data)
    if hend >= size:
        raise _error("headers: netstring length exceeds the data")
    marker = data[hend]
    if marker == _BRACE:  # a whole tnetstring dict: length prefix to '}'
        headers = _tnet_headers(data[pos : hend + 1])
    elif marker == _COMMA:
        headers = _json_headers(data[colon + 1 : hend])
    else:
        raise _error("headers: neither a JSON ',' nor a tnetstring '}' netstring")

    pos = hend + 1
    colon = find(b":", pos, pos + _MAX_LEN_DIGITS + 1)
    length = data[pos:colon]
    if colon < 0 or not length.isdigit() or (length[0] == 0x30 and colon - pos > 1):
        raise _error("body: bad netstring length")
    bend = colon + 1 + int(length)
    if bend >= size:
        raise _error("body: netstring length exceeds the data")
    if data[bend] != _COMMA:
        raise _error("body: netstring does not end with ','")
    if bend + 1 != size:
        raise _error("trailing bytes after the body")

    sender, conn_id, path = data[:sp1], int(raw_id), data[sp2 + 1 : sp3]
    method = headers.get(b"METHOD")
    # The usual request, told apart without _classify: one plain METHOD and
    # no upload header. Anything else (and every error) goes the long way.
    if (type(method) is bytes and method and method not in _SPECIAL_METHODS
            and b"x-mongrel2-upload-done" not in headers
            and b"x-mongrel2-upload-start" not in headers):
        return HttpRequest(sender, conn_id, path, headers, data[colon + 1 : bend])
    return _classify(sender, conn_id, path, headers, data[colon + 1 : bend])


_SPECIAL_METHODS = frozenset({b"JSON", b"WEBSOCKET_HANDSHAKE", b"WEBSOCKET"})


def _classify(sender: bytes, conn_id: int, path: bytes, headers: Headers, body: bytes) -> Event:
    method = _single(headers, b"METHOD")
    fields = (sender, conn_id, path, headers, body)
    if method is None:
        # Upload stream chunks carry UPLOAD_STREAM and no METHOD (upload.c); the
        # upper-case name cannot come from a client (Mongrel2 lowercases theirs).
        offset = _single(headers, b"UPLOAD_STREAM")
        if offset is not None:
            if not is_decimal(offset, MAX_ID_DIGITS):
                raise _error("UPLOAD_STREAM is not a decimal offset")
            return UploadChunk(*fields, offset=int(offset),
                               done=b"UPLOAD_STREAM_DONE" in headers)
        # Otherwise only a bare JSON disconnect is accepted without a METHOD.
        if body.startswith(b"{"):
            data = _json_body(body)
            if type(data) is dict and data.get("type") == "disconnect":
                return Disconnect(*fields)
        raise _error("no METHOD header")
    if method == b"JSON":  # docs/mongrel2.md "Special messages"
        data = _json_body(body)
        kind = data.get("type") if type(data) is dict else None
        if kind == "disconnect":
            return Disconnect(*fields)
        if kind == "credits":
            raw = _single(headers, b"DOWNLOAD_CREDITS")
            if raw is None or not is_decimal(raw, MAX_ID_DIGITS):
                raise _error("credits: DOWNLOAD_CREDITS missing or not decimal")
            return Credits(*fields, credits=int(raw))
        return JsonMessage(*fields, data=data)
    if method == b"WEBSOCKET_HANDSHAKE":
        return WebSocketHandshake(*fields)
    if method == b"WEBSOCKET":
        return WebSocketFrame(*fields, flags=_ws_flags(_single(headers, b"FLAGS") or b""))
    done = _single(headers, b"x-mongrel2-upload-done")
    if done is not None:
        return UploadDone(*fields, upload_path=done)
    start = _single(headers, b"x-mongrel2-upload-start")
    if start is not None:
        return UploadStart(*fields, upload_path=start)
    return HttpRequest(*fields)


_TNET_CREDITS = b"16:DOWNLOAD_CREDITS,"
_JSON_CREDITS = b'"DOWNLOAD_CREDITS":"'


def credits_of(data: bytes) -> int | None:
    """The DOWNLOAD_CREDITS of a credits message without parsing all of it.

    For the hot path only (one credits message per reply message): None when
    the header is not found where Mongrel2 writes it, and then the caller
    parses the message with `parse_message`, which decides.
    """
    i = data.find(_TNET_CREDITS)
    if i >= 0:  # tnetstring: 16:DOWNLOAD_CREDITS,N:DIGITS,
        j = i + len(_TNET_CREDITS)
        colon = data.find(b":", j, j + 3)
        size = data[j:colon]
        if colon < 0 or not size.isdigit():
            return None
        end = colon + 1 + int(size)
        digits = data[colon + 1:end]
        ok = data[end:end + 1] == b"," and is_decimal(digits, MAX_ID_DIGITS)
        return int(digits) if ok else None
    i = data.find(_JSON_CREDITS)
    if i >= 0:  # JSON: "DOWNLOAD_CREDITS":"DIGITS"
        j = i + len(_JSON_CREDITS)
        k = data.find(b'"', j, j + MAX_ID_DIGITS + 1)
        digits = data[j:k] if k > j else b""
        return int(digits) if is_decimal(digits, MAX_ID_DIGITS) else None
    return None


def _ws_flags(raw: bytes) -> int:
    # Mongrel2 sends bformat("0x%X", flags | 0x80): one frame byte (connection.c).
    digits = raw[2:] if raw[:2] in (b"0x", b"0X") else raw
    if not 1 <= len(digits) <= 2 or digits.translate(None, _HEX):
        raise _error("FLAGS missing or not a hex byte")
    return int(digits, 16)


def streamed_body(headers: Headers) -> bool:
    """A request whose body follows in UploadChunk messages: Mongrel2 marks the
    request message ``UPLOAD_STREAM`` and, if the first read had it all,
    ``UPLOAD_STREAM_DONE`` (then the body is complete in the message)."""
    return b"UPLOAD_STREAM" in headers and b"UPLOAD_STREAM_DONE" not in headers
