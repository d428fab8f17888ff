"""The broker's side of streamed request bodies (upload.stream=1): pieces to
the worker as BODY, the worker's READ to Mongrel2 as upload credits."""

from __future__ import annotations

import tnetstring

from scale0.wire import mongrel2 as m2
from scale0.wire import mongrel2_reply as m2r
from scale0.wire import s0w1 as p
from tests.unit.test_dispatch import SENDER, Harness, m2_message, m2_request

Cmd = p.Command


def hello(h: Harness, ident: bytes, *, streams: bool = True) -> None:
    meta = {"bodies": "stream"} if streams else {}
    h.worker(ident, Cmd.HELLO, p.Hello((p.ServiceSpec("app", ("/app",)),), 1,
                                       worker=ident.decode(), heartbeat_ms=600_000,
                                       meta=meta).encode())
    h.take_workers()  # the WELCOME


def stream_start(conn_id: int, first: bytes = b"", *, length: int | None = 100_000,
                 method: bytes = b"POST") -> bytes:
    """What Mongrel2 sends first for a streamed body: the request, UPLOAD_STREAM 0."""
    extra = {b"UPLOAD_STREAM": b"0"}
    if length is None:
        extra[b"transfer-encoding"] = b"chunked"
    else:
        extra[b"content-length"] = b"%d" % length
    raw = m2_request(conn_id, b"/app/up", method=method, extra=extra)
    if first:  # m2_request sets content-length from body: build it by hand
        head, _, _ = raw.rpartition(b"0:,")
        raw = head + b"%d:%s," % (len(first), first)
    return raw


def chunk(conn_id: int, offset: int, data: bytes, done: bool = False) -> bytes:
    headers = {b"UPLOAD_STREAM": b"%d" % offset}
    if done:
        headers[b"UPLOAD_STREAM_DONE"] = b"1"
    return m2_message(SENDER, conn_id, b"/app/up", headers, data)


def ctl_credits(message: bytes) -> int:
    reply = m2r.parse_reply(message)
    assert reply.ctl
    ctl = tnetstring.loads(reply.body)
    assert ctl[0] == b"ctl"
    credits: int = ctl[1][b"credits"]
    return credits


def test_pieces_go_to_the_worker_and_its_reads_become_upload_credits() -> None:
    h = Harness()
    hello(h, b"w1")
    h.m2(stream_start(7, b"abc", length=9))
    sent = h.take_one_request()
    assert m2.streamed_body(sent.event.headers) and sent.event.body == b"abc"
    h.quiet()
    h.worker(b"w1", Cmd.READ, sent.rid_frame, b"262144")
    (link, message), = h.d.to_mongrel2
    h.d.to_mongrel2.clear()
    assert link == 0 and ctl_credits(message) == 262144
    assert m2r.parse_reply(message).conn_ids == (7,)
    h.m2(chunk(7, 3, b"def"))
    h.m2(chunk(7, 6, b"ghi", done=True))
    pieces = h.take_workers()
    assert [(m.command, m.args) for m in pieces] == [
        (Cmd.BODY, (sent.rid_frame, p.BODY_MORE, b"def")),
        (Cmd.BODY, (sent.rid_frame, p.BODY_END, b"ghi"))]
    h.worker(b"w1", Cmd.READ, sent.rid_frame, b"100")  # after the end: nothing to let in
    h.quiet()
    h.serve(sent)
    out = h.take_mongrel2()
    assert [m.status for m in out] == [200]  # the body was in: no close
    assert h.d.counters.body_pieces == 2


def test_an_answer_before_the_body_is_in_closes_the_connection() -> None:
    h = Harness()
    hello(h, b"w1")
    h.m2(stream_start(7, length=1_000_000))
    sent = h.take_one_request()
    h.serve(sent)
    out = h.take_mongrel2()
    assert out[0].status == 200 and out[1].is_close
    h.m2(chunk(7, 0, b"late"))  # credited before the end: dropped
    h.quiet()
    assert h.d.counters.body_dropped == 1


def test_a_chunked_body_over_max_body_gets_413_and_a_cancel() -> None:
    h = Harness(max_body_bytes=10)
    hello(h, b"w1")
    h.m2(stream_start(7, length=None))
    sent = h.take_one_request()
    h.m2(chunk(7, 0, b"12345678"))
    assert [m.command for m in h.take_workers()] == [Cmd.BODY]
    h.m2(chunk(7, 8, b"9abc"))
    assert [(m.command, m.rid) for m in h.take_workers()] == [(Cmd.CANCEL, sent.rid)]
    h.take_error(413, 7, close=True)
    h.worker(b"w1", Cmd.READ, sent.rid_frame, b"100")  # cancelled: no more credits
    h.quiet()
    h.reply(sent, last=True)  # the worker's LAST frees the slot
    h.quiet()
    assert h.d.counters.too_large == 1


def test_a_declared_body_over_max_body_is_413_at_the_start() -> None:
    h = Harness(max_body_bytes=10)
    hello(h, b"w1")
    h.m2(stream_start(7, length=11))
    h.take_error(413, 7, close=True)
    h.quiet()


def test_a_worker_without_body_streaming_gets_none_501() -> None:
    h = Harness()
    hello(h, b"old", streams=False)
    h.m2(stream_start(7))
    h.take_error(501, 7, close=True)
    h.request(8)  # the worker is still free for the next
    assert h.take_one_request().conn_id == 8


def test_a_streamed_request_is_never_retried_and_its_connection_closes() -> None:
    h = Harness()
    hello(h, b"w1")
    hello(h, b"w2")
    h.m2(stream_start(7, method=b"GET"))
    sent = h.take_one_request()
    h.worker(sent.ident, Cmd.BYE)
    h.take_error(502, 7, close=True)
    h.quiet()


def test_body_progress_rearms_the_request_deadline() -> None:
    h = Harness(request_timeout_s=10.0, keepalive_s=1000.0)
    hello(h, b"w1")
    h.m2(stream_start(7, length=30))
    sent = h.take_one_request()
    for i in range(3):
        h.tick(8.0 * (i + 1))
        h.m2(chunk(7, i * 10, b"x" * 10, done=i == 2))
        assert [m.command for m in h.take_workers()] == [Cmd.BODY]
    h.tick(30.0)
    h.quiet()
    h.tick(34.1)
    assert [m.command for m in h.take_workers()] == [Cmd.CANCEL]
    h.take_error(504, 7)
    h.reply(sent, last=True)


def test_read_is_checked() -> None:
    h = Harness()
    hello(h, b"w1")
    h.m2(stream_start(7))
    sent = h.take_one_request()
    h.worker(b"w1", Cmd.READ, sent.rid_frame, b"-1")
    (error,) = h.take_workers()
    assert error.command == Cmd.ERROR and error.args[0] == b"400"
    h.worker(b"w1", Cmd.READ, sent.rid_frame)
    assert h.take_workers()[0].command == Cmd.ERROR


def test_a_whole_body_in_the_first_message_is_an_ordinary_request() -> None:
    h = Harness()
    hello(h, b"old", streams=False)  # needs no streaming
    raw = m2_request(7, b"/app/up", method=b"POST", body=b"abc",
                     extra={b"UPLOAD_STREAM": b"0", b"UPLOAD_STREAM_DONE": b"1"})
    h.m2(raw)
    assert h.take_one_request().event.body == b"abc"


def test_upload_chunks_parse_as_mongrel2_sends_them() -> None:
    # As captured from Mongrel2 1.12.2 with upload.stream=1 (docs/protocol.md 4.5).
    event = m2.parse_message(chunk(7, 16384, b"data"))
    assert isinstance(event, m2.UploadChunk)
    assert (event.conn_id, event.offset, event.done, event.body) == (7, 16384, False, b"data")
    last = m2.parse_message(chunk(7, 4988928, b"", done=True))
    assert isinstance(last, m2.UploadChunk) and last.done
    bad = m2_message(SENDER, 7, b"/app/up", {b"UPLOAD_STREAM": b"x1"}, b"data")
    try:
        m2.parse_message(bad)
    except m2.Mongrel2ProtocolError:
        pass
    else:
        raise AssertionError("a non-decimal offset must not parse")
    start = m2.parse_message(stream_start(7, b"ab"))
    assert isinstance(start, m2.HttpRequest) and m2.streamed_body(start.headers)
    assert m2r.upload_credits_reply(SENDER, 7, 5) == (
        SENDER + b" 3:X 7, 24:3:ctl,14:7:credits,1:5#}]")
