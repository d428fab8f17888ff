"""Tests for scale0.wire.mongrel2: the sans-IO Mongrel2 handler codec (no sockets)."""

from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest
import tnetstring
from hypothesis import given, settings
from hypothesis import strategies as st

from scale0.wire.mongrel2 import (
    Credits,
    Disconnect,
    Event,
    Headers,
    HttpRequest,
    JsonMessage,
    Mongrel2ProtocolError,
    UploadDone,
    UploadStart,
    WebSocketFrame,
    WebSocketHandshake,
    content_length,
    credits_of,
    parse_message,
)
from scale0.wire.mongrel2_reply import (
    parse_reply,
    reply,
)

CAPTURES = Path(__file__).parent.parent / "fixtures" / "mongrel2-captures"
SENDER_1 = b"f9a3b8c2-0000-4000-8000-000000000001"
SENDER_2 = b"f9a3b8c2-0000-4000-8000-000000000002"
FUZZ = settings(max_examples=300, deadline=None, database=None)


def load_captures(direction: str) -> list[bytes]:
    found = []
    for path in sorted(CAPTURES.glob("*.txt")):
        for line in path.read_text().splitlines():
            if line.strip():
                prefix, literal = line.split(" ", 1)
                if prefix == direction:
                    value = ast.literal_eval(literal)
                    assert isinstance(value, bytes)
                    found.append(value)
    return found


IN = load_captures("IN")
OUT = load_captures("OUT")

# The two JSON-protocol messages docs/mongrel2.md "Request message" quotes (captured).
DOC_GET = (
    b'f9a3b8c2-0000-4000-8000-000000000001 4 /app/x 330:{"PATH":"/app/x","x-dup":["one","two",'
    b'"three"],"x-forwarded-for":"127.0.0.1","x-quote":"say \\"hi\\" \\\\ back","host":"localhost'
    b'","method":"evil","cookie":["a=1","b=2"],"METHOD":"GET","VERSION":"HTTP/1.1","URI":"/app/x?a'
    b'=1&b=%20c","QUERY":"a=1&b=%20c","FRAGMENT":"frag","PATTERN":"/app","URL_SCHEME":"http","REMO'
    b'TE_ADDR":"127.0.0.1"},0:,'
)
DOC_POST = (
    b'f9a3b8c2-0000-4000-8000-000000000001 5 /app/post 260:{"PATH":"/app/post","x-forwarded-for":'
    b'"127.0.0.1","content-type":"application/x-www-form-urlencoded","content-length":"11","host":'
    b'"localhost","METHOD":"POST","VERSION":"HTTP/1.1","URI":"/app/post","PATTERN":"/app","URL_SC'
    b'HEME":"http","REMOTE_ADDR":"127.0.0.1"},11:hello=world,'
)
ALL_IN = [*IN, DOC_GET, DOC_POST]


def encode(
    sender: bytes,
    conn_id: int,
    path: bytes,
    headers: Headers,
    body: bytes,
    *,
    tnet: bool,
    ascii_json: bool = False,
) -> bytes:
    """A test encoder for both handler protocols (Mongrel2's request.c framing)."""
    if tnet:
        hdr = tnetstring.dumps(headers)
    else:
        obj = {
            k.decode(): v.decode() if isinstance(v, bytes) else [x.decode() for x in v]
            for k, v in headers.items()
        }
        raw = json.dumps(obj, ensure_ascii=ascii_json).encode()
        hdr = b"%d:%s," % (len(raw), raw)
    return b"%s %d %s %s%d:%s," % (sender, conn_id, path, hdr, len(body), body)


def msg(headers: Headers, body: bytes = b"", *, tnet: bool = True) -> bytes:
    return encode(b"S", 7, b"/p", headers, body, tnet=tnet)


def rejects(data: bytes) -> None:
    with pytest.raises(Mongrel2ProtocolError) as info:
        parse_message(data)
    assert info.value.status_hint == 400


# -- captures -------------------------------------------------------------------


def test_captures_are_loaded() -> None:
    assert len(IN) == 15
    assert len(OUT) == 7


def test_json_capture_forged_upload_headers() -> None:
    # A client sent both upload headers itself on a small body: it still parses as
    # UploadDone; trusting the path is the broker's job (see UploadDone's docstring).
    event = parse_message(IN[0])
    assert isinstance(event, UploadDone)
    assert event.sender == SENDER_1
    assert event.conn_id == 1
    assert event.path == b"/app/forge"
    assert event.method == b"POST"
    assert event.upload_path == b"/etc/passwd"
    assert event.body == b"hi"
    assert event.header(b"content-length") == b"2"


def test_json_capture_disconnect() -> None:
    event = parse_message(IN[1])
    assert event == Disconnect(SENDER_1, 1, b"@*", {b"METHOD": b"JSON"}, b'{"type":"disconnect"}')


def test_tnetstring_capture_get() -> None:
    event = parse_message(IN[2])
    assert isinstance(event, HttpRequest)
    assert (event.sender, event.conn_id, event.path) == (SENDER_2, 29, b"/tnet/x")
    assert event.method == b"GET"
    assert event.headers[b"x-dup"] == [b"one", b"two", b"three"]
    assert event.header(b"x-dup") == b"three"
    assert event.header(b"QUERY") == b"a=1"
    assert event.header(b"FRAGMENT") == b"f"
    assert event.header(b"URI") == b"/tnet/x?a=1"
    assert event.body == b""


def test_tnetstring_capture_post_and_disconnects() -> None:
    post = parse_message(IN[4])
    assert isinstance(post, HttpRequest)
    assert (post.conn_id, post.path, post.method, post.body) == (30, b"/tnet/p", b"POST", b"hello")
    disconnects = [e for e in map(parse_message, IN) if isinstance(e, Disconnect)]
    assert [e.conn_id for e in disconnects] == [1, 29, 30, 31, 44, 45, 48]
    assert all(e.path == b"@*" and e.method == b"JSON" for e in disconnects)


def test_tnetstring_capture_upload_pair() -> None:
    start, done = parse_message(IN[6]), parse_message(IN[7])
    assert isinstance(start, UploadStart)
    assert isinstance(done, UploadDone)
    assert start.upload_path == done.upload_path == b"uploads/upload.nr0SHS"
    assert start.conn_id == done.conn_id == 31
    assert start.body == done.body == b""


def test_tnetstring_capture_unnormalised_path() -> None:
    event = parse_message(IN[-2])
    assert isinstance(event, HttpRequest)
    assert event.path == event.header(b"PATH") == b"/tnet/../app"


def test_doc_examples() -> None:
    get = parse_message(DOC_GET)
    assert isinstance(get, HttpRequest)
    assert get.conn_id == 4
    assert get.headers[b"x-dup"] == [b"one", b"two", b"three"]
    assert get.headers[b"cookie"] == [b"a=1", b"b=2"]
    assert get.header(b"x-quote") == b'say "hi" \\ back'
    assert get.header(b"method") == b"evil"
    assert get.method == b"GET"
    post = parse_message(DOC_POST)
    assert isinstance(post, HttpRequest)
    assert (post.conn_id, post.path, post.body) == (5, b"/app/post", b"hello=world")


@pytest.mark.parametrize("data", ALL_IN)
def test_every_strict_prefix_and_any_suffix_is_rejected(data: bytes) -> None:
    assert isinstance(parse_message(data), Event)
    for end in range(len(data)):
        rejects(data[:end])
    for extra in (b"x", b",", b" ", b"0:,", b"\x00", data):
        rejects(data + extra)


@pytest.mark.parametrize("data", OUT)
def test_out_captures_parse_and_rebuild(data: bytes) -> None:
    parsed = parse_reply(data)
    assert parsed.sender in (SENDER_1, SENDER_2)
    assert len(parsed.conn_ids) == 1
    assert parsed.body.startswith(b"HTTP/1.1 200 OK\r\n")
    assert not parsed.ctl
    assert reply(parsed.sender, parsed.conn_ids, parsed.body) == data
    assert reply(parsed.sender, parsed.conn_ids[0], parsed.body) == data


def test_out_capture_conn_ids() -> None:
    assert [parse_reply(d).conn_ids for d in OUT] == [(i,) for i in (1, 29, 30, 31, 44, 45, 48)]


# -- special messages -------------------------------------------------------------


def test_credits() -> None:
    data = msg({b"METHOD": b"JSON", b"DOWNLOAD_CREDITS": b"102400"}, b'{"type":"credits"}')
    event = parse_message(data)
    assert isinstance(event, Credits)
    assert event.credits == 102400
    for bad in (b"", b"-1", b"0x10", b" 1", b"1e3"):
        rejects(msg({b"METHOD": b"JSON", b"DOWNLOAD_CREDITS": bad}, b'{"type":"credits"}'))
    rejects(msg({b"METHOD": b"JSON"}, b'{"type":"credits"}'))


REAL_CREDITS = (b'5ca1e000-0000-4000-8000-0000000e2e01 2 @* 44:16:DOWNLOAD_CREDITS,5:47643,'
                b'6:METHOD,4:JSON,}18:{"type":"credits"},')  # from Mongrel2 1.12.2


@pytest.mark.parametrize("tnet", [True, False])
def test_credits_of_agrees_with_parse_message(tnet: bool) -> None:
    assert credits_of(REAL_CREDITS) == 47643
    for value in (b"0", b"1", b"102400", b"99999999"):
        data = msg({b"METHOD": b"JSON", b"DOWNLOAD_CREDITS": value}, b'{"type":"credits"}',
                   tnet=tnet)
        event = parse_message(data)
        assert isinstance(event, Credits)
        # None only sends the caller to parse_message; a number must be the same.
        assert credits_of(data) == (event.credits if tnet else None)  # json.dumps adds spaces
        head = b'{"METHOD":"JSON","DOWNLOAD_CREDITS":"%s"}' % value  # as Mongrel2 writes JSON
        compact = b'S 7 @* %d:%s,18:{"type":"credits"},' % (len(head), head)
        parsed = parse_message(compact)
        assert isinstance(parsed, Credits) and credits_of(compact) == parsed.credits
    for bad in (b"", b"-1", b"0x10", b" 1", b"1e3"):  # parse_message rejects these
        data = msg({b"METHOD": b"JSON", b"DOWNLOAD_CREDITS": bad}, b'{"type":"credits"}',
                   tnet=tnet)
        assert credits_of(data) is None
    assert credits_of(msg({b"METHOD": b"JSON"}, b'{"type":"credits"}', tnet=tnet)) is None


@pytest.mark.parametrize("tnet", [True, False])
def test_json_message(tnet: bool) -> None:
    data = msg({b"METHOD": b"JSON", b"PATH": b"@chat"}, b'{"msg": ["hi", 1]}', tnet=tnet)
    event = parse_message(data)
    assert isinstance(event, JsonMessage)
    assert event.data == {"msg": ["hi", 1]}
    for body in (b"", b"{", b"\xff", b'{"a":1} x', b"[" * 100_000):
        rejects(msg({b"METHOD": b"JSON"}, body, tnet=tnet))


def test_websocket() -> None:
    accept = b"s3pPLMBiTxaQ9kYGzzhZRbK+xOo="
    hand = parse_message(msg({b"METHOD": b"WEBSOCKET_HANDSHAKE"}, accept))
    assert isinstance(hand, WebSocketHandshake)
    assert hand.body == accept
    frame = parse_message(msg({b"METHOD": b"WEBSOCKET", b"FLAGS": b"0x81"}, b"hi"))
    assert isinstance(frame, WebSocketFrame)
    assert (frame.flags, frame.body) == (0x81, b"hi")
    assert parse_message(msg({b"METHOD": b"WEBSOCKET", b"FLAGS": b"0x8A"})) == WebSocketFrame(
        b"S", 7, b"/p", {b"METHOD": b"WEBSOCKET", b"FLAGS": b"0x8A"}, b"", flags=0x8A
    )
    for bad in (b"", b"0x", b"0x100", b"-0x1", b"0x 1", b"0xg1", b"1_0"):
        rejects(msg({b"METHOD": b"WEBSOCKET", b"FLAGS": bad}))
    rejects(msg({b"METHOD": b"WEBSOCKET"}))
    rejects(msg({b"METHOD": b"WEBSOCKET", b"FLAGS": [b"0x81", b"0x82"]}))


def test_method_rules() -> None:
    # Upload stream chunks carry no METHOD: not supported.
    rejects(msg({b"UPLOAD_STREAM": b"uploads/x", b"UPLOAD_STREAM_DONE": b"1"}, b"chunk"))
    rejects(msg({}))
    rejects(msg({b"METHOD": [b"GET", b"POST"]}))
    rejects(msg({b"METHOD": b""}))
    # A disconnect is recognised by its body even without a METHOD header.
    assert isinstance(parse_message(msg({}, b'{"type":"disconnect"}')), Disconnect)
    rejects(msg({}, b'{"type":"credits"}'))


def test_upload_header_rules() -> None:
    start: Headers = {b"METHOD": b"POST", b"x-mongrel2-upload-start": b"uploads/u.1"}
    assert isinstance(parse_message(msg(start)), UploadStart)
    rejects(msg({**start, b"x-mongrel2-upload-start": [b"/etc/passwd", b"uploads/u.1"]}))
    rejects(msg({**start, b"x-mongrel2-upload-done": b""}))


# -- malformed framing ------------------------------------------------------------


def json_msg(hlen: bytes | None = None, blen: bytes | None = None, conn_id: bytes = b"1") -> bytes:
    headers, body = b'{"METHOD":"GET"}', b"hello"
    hlen = b"%d" % len(headers) if hlen is None else hlen
    blen = b"%d" % len(body) if blen is None else blen
    return b"S %s /p %s:%s,%s:%s," % (conn_id, hlen, headers, blen, body)


BAD_LENGTHS = [b"15", b"17", b"0", b"", b"x", b"1x", b"-16", b"+16", b" 16", b"16 ", b"016"]
BAD_LENGTHS += [b"99999999999", b"9999999999", b"18446744073709551616", b"\xd9\xa1\xd9\xa6"]


def test_good_framing() -> None:
    assert isinstance(parse_message(json_msg()), HttpRequest)
    assert parse_message(json_msg(conn_id=b"0" * 20)).conn_id == 0
    assert parse_message(json_msg(conn_id=b"9" * 20)).conn_id == 10**20 - 1


@pytest.mark.parametrize("hlen", BAD_LENGTHS)
def test_bad_header_length(hlen: bytes) -> None:
    rejects(json_msg(hlen=hlen))


@pytest.mark.parametrize("blen", [b"4", b"6", *BAD_LENGTHS[2:]])
def test_bad_body_length(blen: bytes) -> None:
    rejects(json_msg(blen=blen))


@pytest.mark.parametrize(
    "conn_id", [b"12a", b"-1", b"+1", b"", b" 1", b"1.0", b"0x1", b"\xd9\xa1", b"1" * 21]
)
def test_bad_conn_id(conn_id: bytes) -> None:
    rejects(json_msg(conn_id=conn_id))


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b" ",
        b"S",
        b"S 1 /p",
        b" 1 /p 2:{},0:,",  # empty sender
        b"S 1  2:{},0:,",  # empty path
        b"S 1 /p 2:{};0:,",  # neither ',' nor '}'
        b'S 1 /p 16:{"METHOD":"GET"},5:hello',  # body terminator missing
        b'S 1 /p 16:{"METHOD":"GET"},5:hello;',  # wrong body terminator
        b'S 1 /p 16:{"METHOD":"GET"},5:hello}',
        b'S 1 /p 16:{"METHOD":"GET"}5:hello,',  # no header terminator
    ],
)
def test_bad_framing(data: bytes) -> None:
    rejects(data)


@pytest.mark.parametrize(
    "headers",
    [
        b'{"METHOD":}',
        b'{"METHOD":"GET"',
        b"",
        b"[]",
        b'["METHOD","GET"]',
        b'"METHOD"',
        b"1",
        b"null",
        b'{"METHOD":"GET","n":1}',
        b'{"METHOD":"GET","n":null}',
        b'{"METHOD":"GET","n":{"a":"b"}}',
        b'{"METHOD":"GET","n":["a",1]}',
        b'{"METHOD":"GET","n":[["a"]]}',
        b'{"METHOD":"GET","n":"\xff"}',  # not UTF-8
        b'{"METHOD":"GET","\xc3\x28":"x"}',
        b'{"METHOD":"GET","n":"\\ud800"}',  # lone surrogate: not encodable as UTF-8
        b'\xef\xbb\xbf{"METHOD":"GET"}',  # BOM
        b"[" * 100_000,
    ],
)
def test_bad_json_headers(headers: bytes) -> None:
    rejects(b"S 1 /p %d:%s,0:," % (len(headers), headers))


def test_json_headers_keep_raw_control_bytes_and_utf8() -> None:
    # Mongrel2 escapes only '"' and '\\' (docs/mongrel2.md): a TAB arrives raw.
    headers = '{"METHOD":"GET","x-tab":"a\tb","x-utf8":"caf\u00e9"}'.encode()
    event = parse_message(b"S 1 /p %d:%s,0:," % (len(headers), headers))
    assert event.header(b"x-tab") == b"a\tb"
    assert event.header(b"x-utf8") == "caf\u00e9".encode()


@pytest.mark.parametrize(
    "payload",
    [
        b"6:METHOD,",  # odd number of items
        b"1:a,1:1#",  # int value
        b"1:a,0:~",  # null value
        b"1:a,4:true!",
        b"1:a,8:1:b,1:1#]",  # list with an int
        b"1:a,7:4:1:b,]]",  # nested list
        b"1:a,7:1:b,0:~}",  # dict value
        b"1:1#1:a,",  # int key
        b"0:]1:a,",  # unhashable key
        b"0:}1:a,",
        b"1:a,5:hello",  # inner length too long
        b"1:a,+1:b,",
        b"1:a,01:b,",
        b"1:a,1:b;",
        b"3:a,",
    ],
)
def test_bad_tnetstring_headers(payload: bytes) -> None:
    rejects(b"S 1 /p %d:%s}0:," % (len(payload), payload))


@pytest.mark.parametrize("headers", [b"0:]", b"4:1:a,]", b"1:1#", b"0:~", b"4:true!"])
def test_tnetstring_headers_not_a_dict(headers: bytes) -> None:
    rejects(b"S 1 /p %s0:," % headers)  # only a dict ends with the '}' marker


def test_deep_tnetstring_headers() -> None:
    nested = b"0:]"
    for _ in range(5_000):  # deeper than the recursion limit
        nested = b"%d:%s]" % (len(nested), nested)
    headers = b"1:a,%s" % nested
    rejects(b"S 1 /p %d:%s}0:," % (len(headers), headers))


# -- property tests -----------------------------------------------------------------


def check_total(data: bytes) -> None:
    """parse_message either returns an event or raises Mongrel2ProtocolError."""
    try:
        event = parse_message(data)
    except Mongrel2ProtocolError as exc:
        assert exc.status_hint == 400
    else:
        assert isinstance(event, Event)


@FUZZ
@given(st.binary(max_size=400))
def test_fuzz_arbitrary_bytes(data: bytes) -> None:
    check_total(data)


@FUZZ
@given(st.sampled_from([b"S 1 /p ", b"S 1 /p 16:", b"S 1 /p 18:6:METHOD,3:GET,"]), st.binary())
def test_fuzz_after_a_valid_start(start: bytes, rest: bytes) -> None:
    check_total(start + rest)


MUTATION = st.tuples(st.sampled_from(["flip", "insert", "delete"]), st.integers(0), st.binary())


@FUZZ
@given(st.sampled_from(ALL_IN), st.lists(MUTATION, min_size=1, max_size=4))
def test_fuzz_mutated_captures(data: bytes, mutations: list[tuple[str, int, bytes]]) -> None:
    for kind, where, chunk in mutations:
        pos = where % (len(data) + 1)
        if kind == "flip" and pos < len(data):
            data = data[:pos] + bytes([data[pos] ^ (1 << (where % 8))]) + data[pos + 1 :]
        elif kind == "insert":
            data = data[:pos] + chunk[:8] + data[pos:]
        else:
            data = data[:pos] + data[pos + 1 + len(chunk) % 8 :]
    check_total(data)


NAME = st.binary(min_size=1, max_size=40).map(lambda b: b.replace(b" ", b"_"))
RESERVED = {b"METHOD", b"x-mongrel2-upload-start", b"x-mongrel2-upload-done"}


@st.composite
def requests(draw: st.DrawFn) -> tuple[bool, bytes, int, bytes, Headers, bytes]:
    tnet = draw(st.booleans())  # else JSON, with non-ASCII raw like Mongrel2 or \u-escaped
    # JSON carries text: header bytes must be UTF-8 there (docs/mongrel2.md).
    raw = st.binary(max_size=20) if tnet else st.text(max_size=20).map(str.encode)
    value = raw | st.lists(raw, min_size=1, max_size=5)
    headers: Headers = draw(st.dictionaries(raw.filter(lambda k: k not in RESERVED), value))
    headers[b"METHOD"] = draw(st.sampled_from([b"GET", b"POST", b"DELETE", b"M2"]))
    conn_id = draw(st.integers(0, 10**20 - 1))
    return tnet, draw(NAME), conn_id, draw(NAME), headers, draw(st.binary(max_size=200))


@FUZZ
@given(requests())
def test_round_trip_requests(req: tuple[bool, bytes, int, bytes, Headers, bytes]) -> None:
    tnet, sender, conn_id, path, headers, body = req
    for ascii_json in (False, True):
        data = encode(sender, conn_id, path, headers, body, tnet=tnet, ascii_json=ascii_json)
        assert parse_message(data) == HttpRequest(sender, conn_id, path, headers, body)


@pytest.mark.parametrize("value, number", [
    (None, None), (b"", None), (b"-1", None), (b"1 ", None), (b"0x10", None),
    (b"0", 0), (b"000", 0), (b"0042", 42), (b"9" * 18, 10**18 - 1),
    (b"9" * 19, 10**18), (b"9" * 5000, 10**18), (b"0" * 5000 + b"7", 7),
])
def test_content_length_is_a_bounded_number(value: bytes | None, number: int | None) -> None:
    assert content_length(value) == number
