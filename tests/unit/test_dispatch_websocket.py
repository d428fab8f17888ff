"""The broker's WebSocket side (dispatch.on_websocket): routing a handshake to a
worker that announced the feature, FRAMEs to that worker, slots, idle timeout,
keep-alives, refusals. Byte fixtures are shaped like Mongrel2 1.12's
(docs/protocol.md section 12)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from scale0.wire import mongrel2_reply as m2r
from scale0.wire import s0w1 as p
from tests.unit.test_dispatch import SENDER, Cmd, Harness, Sent, m2_message

ACCEPT = b"s3pPLMBiTxaQ9kYGzzhZRbK+xOo="


def handshake(conn_id: int, path: bytes = b"/app/ws") -> bytes:
    headers = {b"METHOD": b"WEBSOCKET_HANDSHAKE", b"VERSION": b"HTTP/1.1", b"PATH": path,
               b"URI": path, b"PATTERN": b"/", b"URL_SCHEME": b"http",
               b"REMOTE_ADDR": b"127.0.0.1", b"host": b"localhost", b"upgrade": b"websocket",
               b"sec-websocket-key": b"dGhlIHNhbXBsZSBub25jZQ==",
               b"DOWNLOAD_CREDITS": b"102400"}
    return m2_message(SENDER, conn_id, path, headers, ACCEPT)


def ws_frame(conn_id: int, body: bytes, flags: bytes = b"0x81", path: bytes = b"/app/ws") -> bytes:
    headers = {b"METHOD": b"WEBSOCKET", b"FLAGS": flags, b"PATH": path, b"host": b"localhost"}
    return m2_message(SENDER, conn_id, path, headers, body)


def hello_ws(h: Harness, ident: bytes, capacity: int = 2, websocket: bool = True) -> None:
    features = (p.FEATURE_WEBSOCKET,) if websocket else ()
    # Configured alike: the worker announces the broker's own heartbeat interval.
    hello = p.Hello((p.ServiceSpec("app", ("/app",)),), capacity, ident.decode(),
                    heartbeat_ms=int(h.d.settings.heartbeat_s * 1000), features=features)
    h.worker(ident, Cmd.HELLO, hello.encode())
    (welcome,) = h.take_workers()
    assert welcome.command == Cmd.WELCOME


def accept(h: Harness, sent: Sent) -> None:
    h.reply(sent, m2r.reply(SENDER, sent.conn_id, b"HTTP/1.1 101 Switching Protocols\r\n\r\n"),
            last=False)
    (out,) = h.take_mongrel2()
    assert out.status == 101


def test_handshake_frames_and_close_go_to_one_worker_holding_a_slot() -> None:
    h = Harness()
    hello_ws(h, b"w1", capacity=1)
    raw = handshake(3)
    h.m2(raw)
    sent = h.take_one_request()
    assert (sent.ident, sent.raw, sent.script_name) == (b"w1", raw, b"/app")
    accept(h, sent)
    frame = ws_frame(3, b"hello")
    h.m2(frame)
    (fwd,) = h.take_workers()
    assert (fwd.ident, fwd.command, fwd.args) == (b"w1", Cmd.FRAME, (sent.rid_frame, frame))
    # The WebSocket holds the worker's only slot: a request waits in the queue.
    h.request(4)
    h.quiet()
    assert len(h.d.services["app"].queue) == 1
    # The worker closes: a close frame, the close reply, LAST; the slot frees.
    h.reply(sent, m2r.reply(SENDER, 3, b"\x88\x02\x03\xe8"), m2r.close_reply(SENDER, 3))
    out = h.take_mongrel2()
    assert [m.body for m in out] == [b"\x88\x02\x03\xe8", b""]
    assert h.take_one_request().conn_id == 4
    assert h.d.counters.websockets == 1


def test_mongrel2_disconnect_cancels_the_websocket_at_its_worker() -> None:
    h = Harness()
    hello_ws(h, b"w1")
    h.m2(handshake(3))
    sent = h.take_one_request()
    accept(h, sent)
    h.m2(m2_message(SENDER, 3, b"@*", {b"METHOD": b"JSON"}, b'{"type":"disconnect"}'))
    (cancel,) = h.take_workers()
    assert (cancel.command, cancel.rid) == (Cmd.CANCEL, sent.rid)
    h.reply(sent)  # LAST, no messages
    h.quiet()
    assert h.d.requests == {} and len(h.d.workers[b"w1"].in_flight) == 0


def test_credits_reach_the_websocket_worker() -> None:
    h = Harness()
    hello_ws(h, b"w1")
    h.m2(handshake(3))
    sent = h.take_one_request()
    accept(h, sent)
    h.m2(m2_message(SENDER, 3, b"@*", {b"METHOD": b"JSON", b"DOWNLOAD_CREDITS": b"129"},
                    b'{"type":"credits"}'))
    (credit,) = h.take_workers()
    assert (credit.command, credit.args) == (Cmd.CREDIT, (sent.rid_frame, b"129"))


def test_idle_websocket_is_closed_with_1001_and_cancelled() -> None:
    h = Harness(websocket_idle_timeout_s=50.0, keepalive_s=1000.0)
    hello_ws(h, b"w1")
    h.m2(handshake(3))
    sent = h.take_one_request()
    accept(h, sent)
    h.tick(40.0)
    h.m2(ws_frame(3, b"still here"))  # activity pushes the idle deadline
    h.take_workers()
    h.tick(80.0)
    h.quiet()
    h.tick(91.0)
    out = h.take_mongrel2()
    assert out[0].body[:4] == b"\x88\x0e\x03\xe9" and out[1].is_close  # 1001 "idle timeout"
    (cancel,) = h.take_workers()
    assert cancel.command == Cmd.CANCEL
    assert h.d.counters.websocket_timeouts == 1
    h.reply(sent)
    assert h.d.requests == {}


def test_websockets_get_keep_alives() -> None:
    h = Harness(keepalive_s=30.0)
    hello_ws(h, b"w1")
    h.m2(handshake(3))
    sent = h.take_one_request()
    accept(h, sent)
    h.tick(31.0)
    h.tick(61.0)
    ctl = [m2r.parse_reply(raw) for _, raw in h.d.to_mongrel2]
    assert ctl and all(r.ctl and r.conn_ids == (3,) for r in ctl)
    assert b"keep-alive" in ctl[0].body


@pytest.mark.parametrize("websocket_workers", [0, 1])
def test_handshake_to_a_service_with_wsgi_workers_is_refused(websocket_workers: int) -> None:
    h = Harness()
    hello_ws(h, b"w1", websocket=False)
    if websocket_workers:
        hello_ws(h, b"w2")  # a mixed service: a WSGI worker could take it
    h.m2(handshake(3))
    error = h.take_error(400, 3, close=True)
    assert b"does not take WebSockets" in error.body
    h.quiet()
    assert h.d.counters.websocket_refused == 1 and h.d.requests == {}


def test_upgrade_that_mongrel2_passed_as_a_get_never_reaches_a_worker() -> None:
    """Without Sec-WebSocket-Key (or version) Mongrel2 sends the upgrade as a GET."""
    h = Harness()
    hello_ws(h, b"w1", websocket=False)
    h.request(3, b"/app/ws", extra={b"upgrade": b"websocket", b"connection": b"Upgrade"})
    h.take_error(426, 3, close=True)
    h.quiet()
    # Another Upgrade (h2c) is still an ordinary request.
    h.request(4, b"/app/x", extra={b"upgrade": b"h2c"})
    assert h.take_one_request().conn_id == 4


def test_handshake_without_route_is_404_and_without_worker_503() -> None:
    h = Harness()
    h.m2(handshake(3, b"/nowhere"))
    h.take_error(404, 3, close=True)
    h.d.add_route("/app", "app")
    h.m2(handshake(4))
    h.take_error(503, 4, close=True)


def test_worker_lost_under_an_open_websocket_closes_the_connection() -> None:
    h = Harness()
    hello_ws(h, b"w1")
    h.m2(handshake(3))
    sent = h.take_one_request()
    accept(h, sent)
    h.worker(b"w1", Cmd.BYE)
    (close,) = h.take_mongrel2()
    assert close.conn_id == 3 and close.is_close
    assert h.d.requests == {} and h.d.connections == {}


def test_broker_shutdown_closes_open_websockets_with_1001() -> None:
    h = Harness()
    hello_ws(h, b"w1")
    h.m2(handshake(3))
    sent = h.take_one_request()
    accept(h, sent)
    assert h.d.shutdown(h.now) == 1
    out = h.take_mongrel2()
    assert out[0].body.startswith(b"\x88") and out[0].body[2:4] == b"\x03\xe9"
    assert out[-1].is_close


def test_queued_handshake_goes_to_the_next_free_websocket_worker() -> None:
    h = Harness()
    hello_ws(h, b"w1", capacity=1)
    h.request(1)
    first = h.take_one_request()
    h.m2(handshake(3))
    h.quiet()
    h.serve(first)
    h.take_mongrel2()
    sent = h.take_one_request()
    assert sent.conn_id == 3 and sent.event.method == b"WEBSOCKET_HANDSHAKE"


def test_frames_of_a_queued_handshake_are_dropped() -> None:
    h = Harness()
    hello_ws(h, b"w1", capacity=1)
    h.request(1)
    h.take_one_request()
    h.m2(handshake(3))
    h.m2(ws_frame(3, b"early"))
    h.quiet()
    assert len(h.d.services["app"].queue) == 1


ACTIONS = st.lists(st.tuples(
    st.sampled_from(("handshake", "frame", "request", "disconnect", "accept", "close",
                     "bye", "hello", "tick", "drain")),
    st.integers(1, 6)), max_size=60)


@settings(max_examples=200, deadline=None, database=None)
@given(ACTIONS)
def test_random_websocket_traffic_keeps_the_invariants(actions: list[tuple[str, int]]) -> None:
    """Handshakes, frames, plain requests, disconnects, accepts, closes, workers
    leaving and joining, time: the dispatcher's invariants hold after every step,
    nothing is written to a connection after its disconnect, and every
    handshake sent to a worker went to one that announced the feature."""
    h = Harness(websocket_idle_timeout_s=5.0, keepalive_s=2.0, request_timeout_s=4.0)
    gone: set[int] = set()
    at_worker: dict[int, Sent] = {}  # conn id -> its REQUEST at a worker
    capable = {b"w1": True, b"w2": True}
    for ident in capable:
        hello_ws(h, ident)

    def drain_outboxes() -> None:
        for msg in h.take_workers():
            if msg.command == Cmd.REQUEST:
                sent = Sent(msg.ident, *msg.args)
                if sent.event.method == b"WEBSOCKET_HANDSHAKE":
                    assert capable.get(msg.ident)
                at_worker[sent.conn_id] = sent
        out, h.d.to_mongrel2 = h.d.to_mongrel2, []
        for _, raw in out:
            for conn_id in m2r.parse_reply(raw).conn_ids:
                assert conn_id not in gone, f"write to gone connection {conn_id}"

    for action, n in actions:
        if action == "handshake" and n not in gone:
            h.m2(handshake(n))
        elif action == "frame" and n not in gone:  # Mongrel2 sends none after a disconnect
            h.m2(ws_frame(n, b"x"))
        elif action == "request" and n not in gone:
            h.request(n)
        elif action == "disconnect":
            h.m2(m2_message(SENDER, n, b"@*", {b"METHOD": b"JSON"}, b'{"type":"disconnect"}'))
            gone.add(n)
        elif action == "accept" and n in at_worker and at_worker[n].ident in h.d.workers:
            sent = at_worker[n]
            h.reply(sent, m2r.reply(SENDER, n, b"HTTP/1.1 101 Switching Protocols\r\n\r\n"),
                    last=False)
        elif action == "close" and n in at_worker and at_worker[n].ident in h.d.workers:
            h.reply(at_worker.pop(n), m2r.close_reply(SENDER, n))
        elif action == "bye":
            ident = (b"w1", b"w2")[n % 2]
            h.worker(ident, Cmd.BYE)
            at_worker = {c: s for c, s in at_worker.items() if s.ident != ident}
        elif action == "hello":
            ident = (b"w1", b"w2")[n % 2]
            hello = p.Hello((p.ServiceSpec("app", ("/app",)),), n % 3 + 1, ident.decode(),
                            heartbeat_ms=int(h.d.settings.heartbeat_s * 1000),
                            features=(p.FEATURE_WEBSOCKET,))
            at_worker = {c: s for c, s in at_worker.items() if s.ident != ident}
            h.worker(ident, Cmd.HELLO, hello.encode())
        elif action == "tick":
            h.tick(h.now + n)
        elif action == "drain":
            w = h.d.workers.get((b"w1", b"w2")[n % 2])
            if w is not None:
                h.d.drain_worker(w)
        h.d.check_invariants()
        drain_outboxes()


def test_a_queued_handshake_gets_one_keep_alive_per_round() -> None:
    h = Harness(keepalive_s=30.0, queue_timeout_s=100.0)
    hello_ws(h, b"w1", capacity=1)
    h.request(1)
    h.take_one_request()
    h.m2(handshake(3))  # waits in the queue its service shares with its twin
    h.tick(31.0)  # one keep-alive round
    ctl = [m2r.parse_reply(raw) for _, raw in h.d.to_mongrel2]
    assert sorted(r.conn_ids[0] for r in ctl) == [1, 3]  # once each, not twice for 3
    assert h.d.next_deadline() <= 100.0
