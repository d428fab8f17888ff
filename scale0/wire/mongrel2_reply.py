"""Replies to Mongrel2 (handler -> Mongrel2), sans-IO, and the HTTP responses
they carry.

A reply is ``SENDER SP LEN ":" IDS "," SP BODY`` (docs/mongrel2.md, "Reply
message"): BODY is written raw to every connection IDS names, so the handler
writes the whole HTTP response; an empty BODY closes. A control reply puts
``X `` before the ids and a tnetstring ``["ctl", {...}]`` as its body.
Builders raise `ReplyError` on anything Mongrel2 would reject or misread;
`parse_reply` (for tests and fakes) raises `Mongrel2ProtocolError`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from http import HTTPStatus

import tnetstring

from scale0.errors import ProtocolError
from scale0.wire.mongrel2 import MAX_ID_DIGITS, Mongrel2ProtocolError, is_decimal, netstring_span

MAX_REPLY_TARGETS = 128  # limits.handler_targets default
Body = bytes | memoryview  # a reply's BODY, or a piece of one (split_body)
_COMMA = ord(",")


class ReplyError(ProtocolError, ValueError):
    """A reply that cannot be built (a sender or conn ids no reply can name,
    a status or header that would break the response): nothing is sent."""

    def __init__(self, msg: str, *, status_hint: int = 500) -> None:
        super().__init__(msg, status_hint=status_hint)


# ---- Replies (handler -> Mongrel2): SENDER SP LEN ":" IDS "," SP BODY ----


@dataclass(frozen=True, slots=True)
class Reply:
    """A parsed reply; `ctl` marks a control reply (IDS prefixed with "X ")."""

    sender: bytes
    conn_ids: tuple[int, ...]
    body: bytes
    ctl: bool = False


_SENDER_CHARS = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-"


def _valid_sender(sender: bytes) -> bool:
    # docs/mongrel2.md "Reply message": SENDER may contain only [A-Za-z0-9-].
    return bool(sender) and not sender.translate(None, _SENDER_CHARS)


def _check_sender(sender: bytes) -> None:
    if not _valid_sender(sender):
        raise ReplyError(f"reply sender must match [A-Za-z0-9-]+: {sender!r}")


def _ids(conn_ids: int | Sequence[int]) -> bytes:
    """IDS field: 1..MAX_REPLY_TARGETS non-negative ints, space-separated."""
    ids = (conn_ids,) if isinstance(conn_ids, int) else tuple(conn_ids)
    if not 1 <= len(ids) <= MAX_REPLY_TARGETS:
        raise ReplyError(f"a reply needs 1..{MAX_REPLY_TARGETS} conn ids, got {len(ids)}")
    for conn_id in ids:
        if type(conn_id) is not int or conn_id < 0:
            raise ReplyError(f"conn id must be a non-negative int: {conn_id!r}")
    return b" ".join([b"%d" % conn_id for conn_id in ids])


def reply(sender: bytes, conn_ids: int | Sequence[int], body: Body) -> bytes:
    """A reply writing `body` (raw HTTP bytes) to `conn_ids`; ReplyError on bad args."""
    _check_sender(sender)
    ids = _ids(conn_ids)
    return b"%s %d:%s, %s" % (sender, len(ids), ids, body)


def split_body(data: Body, n: int) -> tuple[Body, Body]:
    """`data[:n], data[n:]` without copying either part: a body sent in several
    pieces costs its length in copies, not its length times the pieces."""
    if n >= len(data):
        return data, b""
    view = memoryview(data).cast("B")  # len() counts bytes, whatever the view was
    return view[:n], view[n:]


def close_reply(sender: bytes, conn_ids: int | Sequence[int]) -> bytes:
    """An empty reply: Mongrel2 closes the connections once queued data is out."""
    return reply(sender, conn_ids, b"")


def ctl_reply(sender: bytes, conn_ids: int | Sequence[int], ctl: dict[bytes, object]) -> bytes:
    """A control reply ``SENDER LEN:X IDS, <tnetstring ["ctl", ctl]>`` (docs/mongrel2.md)."""
    _check_sender(sender)
    ids = b"X " + _ids(conn_ids)
    payload: bytes = tnetstring.dumps([b"ctl", ctl])  # TypeError on a str key or value
    return b"%s %d:%s, %s" % (sender, len(ids), ids, payload)


def keep_alive_reply(sender: bytes, conn_ids: int | Sequence[int]) -> bytes:
    """Reset the idle timer of `conn_ids` (long requests, docs/mongrel2.md "Reply message")."""
    return ctl_reply(sender, conn_ids, {b"keep-alive": True})


def upload_credits_reply(sender: bytes, conn_id: int, n: int) -> bytes:
    """Let Mongrel2 read `n` more bytes of `conn_id`'s streamed body
    (``upload.stream=1``; ``["ctl", {"credits": n}]``, handler.c)."""
    return ctl_reply(sender, conn_id, {b"credits": n})


def reply_prefix(sender: bytes, conn_id: int) -> bytes:
    """The bytes a single-target reply to `conn_id` starts with (for startswith)."""
    if type(conn_id) is int and conn_id >= 0 and sender and not sender.translate(
            None, _SENDER_CHARS):  # the usual case, checked inline: once per request
        ids = b"%d" % conn_id
        return b"%s %d:%s, " % (sender, len(ids), ids)
    _check_sender(sender)
    ids = _ids(conn_id)
    return b"%s %d:%s, " % (sender, len(ids), ids)


def parse_reply(data: bytes) -> Reply:
    """Parse a reply (plain or ctl); malformed input raises Mongrel2ProtocolError."""
    sp = data.find(b" ")
    if sp <= 0 or not _valid_sender(data[:sp]):
        raise Mongrel2ProtocolError("reply: SENDER missing or not [A-Za-z0-9-]+")
    start, end = netstring_span(data, sp + 1, "reply ids")
    if data[end] != _COMMA or data[end + 1 : end + 2] != b" ":
        raise Mongrel2ProtocolError("reply: IDS netstring must be followed by ', '")
    field = data[start:end]
    ctl = field.startswith(b"X ")
    raw_ids = (field[2:] if ctl else field).split(b" ")
    if not 1 <= len(raw_ids) <= MAX_REPLY_TARGETS:
        raise Mongrel2ProtocolError(f"reply: needs 1..{MAX_REPLY_TARGETS} conn ids")
    if not all(is_decimal(raw, MAX_ID_DIGITS) for raw in raw_ids):
        raise Mongrel2ProtocolError("reply: conn ids must be decimal")
    conn_ids = tuple(int(raw) for raw in raw_ids)
    return Reply(data[:sp], conn_ids, data[end + 2 :], ctl)


# ---- HTTP responses: the handler writes the whole response (docs/mongrel2.md) ----

_REASONS = {status.value: status.phrase.encode("ascii") for status in HTTPStatus}


def http_response(
    status: int,
    headers: Sequence[tuple[bytes, bytes]],
    body: bytes = b"",
    *,
    reason: bytes | None = None,
    version: bytes = b"HTTP/1.1",
) -> bytes:
    """Status line, `headers` as given (no Content-Length added), CRLF, `body`.
    ReplyError on a status outside 100..999 or CR/LF in a header or reason."""
    if not 100 <= status <= 999:
        raise ReplyError(f"HTTP status must have 3 digits: {status}")
    if reason is None:
        reason = _REASONS.get(status, b"Unknown")
    lines = [b"%s %d %s" % (version, status, reason)]
    lines += [b"%s: %s" % (name, value) for name, value in headers]
    if any(not name or b":" in name for name, _ in headers):
        raise ReplyError(f"empty header name or one with ':': {headers!r}")
    head = b"\r\n".join(lines)
    # join adds len(lines) - 1 CRLFs; another CR or LF would split the response.
    if head.count(b"\r") != len(lines) - 1 or head.count(b"\n") != len(lines) - 1:
        raise ReplyError(f"CR or LF in the status line or a header: {head!r}")
    return b"%s\r\n\r\n%s" % (head, body)


def error_response(
    status: int,
    message: str | None = None,
    *,
    headers: Sequence[tuple[bytes, bytes]] = (),
    close: bool = False,
) -> bytes:
    """A small text/plain error page, e.g. b"503 Service Unavailable\\n" + message."""
    body = b"%d %s\n" % (status, _REASONS.get(status, b"Unknown"))
    if message:
        body += message.encode("utf-8", "replace") + b"\n"
    all_headers = [(b"Content-Type", b"text/plain; charset=utf-8")]
    all_headers += [(b"Content-Length", b"%d" % len(body)), *headers]
    if close:
        all_headers.append((b"Connection", b"close"))
    return http_response(status, all_headers, body)
