"""Tests for scale0.wire.mongrel2_reply: replies to Mongrel2 and the HTTP
responses they carry (no sockets)."""

from __future__ import annotations

import pytest
import tnetstring
from hypothesis import given, settings
from hypothesis import strategies as st

from scale0.wire.mongrel2 import Mongrel2ProtocolError
from scale0.wire.mongrel2_reply import (
    MAX_REPLY_TARGETS,
    Reply,
    close_reply,
    ctl_reply,
    error_response,
    http_response,
    keep_alive_reply,
    parse_reply,
    reply,
    reply_prefix,
    split_body,
)
from tests.mongrel2_helpers import cancel_reply

SENDER_1 = b"f9a3b8c2-0000-4000-8000-000000000001"
SENDER_2 = b"f9a3b8c2-0000-4000-8000-000000000002"
FUZZ = settings(max_examples=300, deadline=None, database=None)


# -- replies ----------------------------------------------------------------------


def test_reply_format() -> None:
    assert reply(b"S", 9, b"x") == b"S 1:9, x"
    assert reply(b"S", [10, 11], b"x") == b"S 5:10 11, x"
    assert reply(b"S", (0,), b"") == b"S 1:0, "
    assert close_reply(SENDER_1, 9) == SENDER_1 + b" 1:9, "
    assert close_reply(b"S", [1, 2]) == b"S 3:1 2, "
    doc = SENDER_1 + b" 5:10 11, HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n"
    doc += b"Content-Length: 18\r\n\r\nreleased together\n"
    assert parse_reply(doc) == Reply(SENDER_1, (10, 11), doc[len(SENDER_1) + 10 :])
    assert reply(SENDER_1, [10, 11], parse_reply(doc).body) == doc


def test_reply_target_limits() -> None:
    ids = list(range(1000, 1000 + MAX_REPLY_TARGETS))
    assert parse_reply(reply(b"S", ids, b"x")).conn_ids == tuple(ids)
    assert MAX_REPLY_TARGETS == 128
    for bad in ([], list(range(129)), [-1], [1, -1], [True], [1.0]):
        with pytest.raises(ValueError):
            reply(b"S", bad, b"x")  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        reply(b"S", -1, b"x")


@pytest.mark.parametrize("sender", [b"", b"a b", b"a_b", b"a:b", b"caf\xc3\xa9", b"a\n"])
def test_reply_bad_sender(sender: bytes) -> None:
    with pytest.raises(ValueError):
        reply(sender, 1, b"")
    with pytest.raises(ValueError):
        close_reply(sender, 1)
    with pytest.raises(ValueError):
        keep_alive_reply(sender, 1)
    with pytest.raises(ValueError):
        reply_prefix(sender, 1)


def test_ctl_replies() -> None:
    # The keep-alive control reply docs/mongrel2.md "Reply message" quotes, byte for byte.
    expected = SENDER_1 + b" 4:X 35, 31:3:ctl,21:10:keep-alive,4:true!}]"
    assert keep_alive_reply(SENDER_1, 35) == expected
    assert ctl_reply(SENDER_1, [35], {b"keep-alive": True}) == expected
    assert cancel_reply(b"S", [1, 2]) == b"S 5:X 1 2, 26:3:ctl,16:6:cancel,4:true!}]"
    assert ctl_reply(b"S", 3, {b"credits": 5}) == b"S 3:X 3, 24:3:ctl,14:7:credits,1:5#}]"
    parsed = parse_reply(expected)
    assert parsed == Reply(SENDER_1, (35,), b"31:3:ctl,21:10:keep-alive,4:true!}]", ctl=True)
    assert tnetstring.loads(parsed.body) == [b"ctl", {b"keep-alive": True}]


def test_reply_prefix() -> None:
    prefix = reply_prefix(SENDER_1, 35)
    assert prefix == SENDER_1 + b" 2:35, "
    assert reply(SENDER_1, 35, b"HTTP/1.1 200 OK\r\n").startswith(prefix)
    assert close_reply(SENDER_1, 35).startswith(prefix)
    for other in (3, 350, [35, 36], [36, 35]):
        assert not reply(SENDER_1, other, b"x").startswith(prefix)
    assert not keep_alive_reply(SENDER_1, 35).startswith(prefix)
    assert not reply(SENDER_2, 35, b"x").startswith(prefix)


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"S",
        b"S ",
        b" 1:1, x",
        b"S_1 1:1, x",
        b"S 1:1,x",  # space after the comma is required
        b"S 1:1 x",
        b"S 2:1, x",
        b"S 0:, x",
        b"S 1:a, x",
        b"S 2:-1, x",
        b"S 2:01, x",
        b"S 3:1  , x",
        b"S 2: 1, x",
        b"S +1:1, x",
        b"S 99999999999:1, x",
        b"S 2:X , x",
        b"S 1:1",
    ],
)
def test_parse_reply_rejects(data: bytes) -> None:
    with pytest.raises(Mongrel2ProtocolError):
        parse_reply(data)
    with pytest.raises(Mongrel2ProtocolError):
        parse_reply(b"S %d:%s, x" % (len(b" ".join([b"1"] * 129)), b" ".join([b"1"] * 129)))


# -- HTTP responses -----------------------------------------------------------------


def test_http_response() -> None:
    got = http_response(200, [(b"Content-Type", b"text/plain"), (b"X-A", b"1")], b"ok")
    assert got == b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nX-A: 1\r\n\r\nok"
    assert http_response(204, []) == b"HTTP/1.1 204 No Content\r\n\r\n"
    assert http_response(599, []) == b"HTTP/1.1 599 Unknown\r\n\r\n"
    assert http_response(200, [], reason=b"Fine", version=b"HTTP/1.0") == (
        b"HTTP/1.0 200 Fine\r\n\r\n"
    )
    for bad in ([(b"X", b"a\r\nSet-Cookie: x")], [(b"X\n", b"a")], [(b"", b"a")], [(b"A:B", b"")]):
        with pytest.raises(ValueError):
            http_response(200, bad)
    for status in (99, 1000):
        with pytest.raises(ValueError):
            http_response(status, [])
    with pytest.raises(ValueError):
        http_response(200, [], reason=b"OK\r\nX: y")


def test_error_response() -> None:
    assert error_response(503, "no worker for /app", close=True) == (
        b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: text/plain; charset=utf-8\r\n"
        b"Content-Length: 43\r\nConnection: close\r\n\r\n"
        b"503 Service Unavailable\nno worker for /app\n"
    )
    assert error_response(404, headers=[(b"X-Scale0", b"1")]) == (
        b"HTTP/1.1 404 Not Found\r\nContent-Type: text/plain; charset=utf-8\r\n"
        b"Content-Length: 14\r\nX-Scale0: 1\r\n\r\n404 Not Found\n"
    )
    for status in (400, 413, 502, 504):
        head, _, body = error_response(status, "caf\u00e9").partition(b"\r\n\r\n")
        assert b"Content-Length: %d" % len(body) in head.split(b"\r\n")
        assert body.endswith("caf\u00e9\n".encode())


# -- property tests -----------------------------------------------------------------


SENDERS = st.binary(min_size=1, max_size=40).map(lambda b: bytes(b"abcXYZ019-"[c % 10] for c in b))
IDS = st.integers(0, 10**20 - 1)


@FUZZ
@given(
    SENDERS,
    IDS | st.lists(IDS, min_size=1, max_size=MAX_REPLY_TARGETS),
    st.binary(max_size=200),
)
def test_round_trip_replies(sender: bytes, conn_ids: int | list[int], body: bytes) -> None:
    ids = (conn_ids,) if isinstance(conn_ids, int) else tuple(conn_ids)
    assert parse_reply(reply(sender, conn_ids, body)) == Reply(sender, ids, body)
    ctl = parse_reply(keep_alive_reply(sender, conn_ids))
    assert (ctl.sender, ctl.conn_ids, ctl.ctl) == (sender, ids, True)
    if len(ids) == 1:
        assert reply(sender, conn_ids, body).startswith(reply_prefix(sender, ids[0]))


def test_split_body_parts_join_to_the_body_without_copying_it() -> None:
    body = bytes(range(256)) * 1000
    head, rest = split_body(body, 100_000)
    assert bytes(head) + bytes(rest) == body
    assert isinstance(head, memoryview) and isinstance(rest, memoryview)  # views, not copies
    assert reply(b"s", 1, head) == reply(b"s", 1, body[:100_000])
    whole, nothing = split_body(body, len(body))
    assert whole is body and nothing == b""
