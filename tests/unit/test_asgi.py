"""The pure ASGI pieces (scale0/worker/asgi.py) and the per-connection state of the
runtime (asgi_http.HttpCycle, asgi_websocket.WebSocketCycle) on byte fixtures shaped like what
Mongrel2 1.12 sends (tnetstring handler protocol)."""

from __future__ import annotations

import ast
import asyncio
import struct
from pathlib import Path
from typing import Any

import pytest
import tnetstring

from scale0.wire import mongrel2 as m2
from scale0.wire import mongrel2_reply as m2r
from scale0.wire import s0w1 as p
from scale0.worker import asgi
from scale0.worker.asgi_cycle import ClientDisconnected
from scale0.worker.asgi_http import HttpCycle
from scale0.worker.asgi_link import AsgiLink
from scale0.worker.asgi_loop import AsgiSettings
from scale0.worker.asgi_websocket import WebSocketCycle
from scale0.worker.link import LinkSettings

SENDER = b"5ca1e000-0000-4000-8000-0000000e2e01"
LINK = LinkSettings(heartbeat_s=1.0, liveness=3, reconnect_max_s=10.0)  # of the stand-in link
ACCEPT = b"s3pPLMBiTxaQ9kYGzzhZRbK+xOo="


def message(path: bytes, headers: dict[bytes, Any], body: bytes = b"", conn_id: int = 7) -> bytes:
    head: bytes = tnetstring.dumps(headers)
    return b"%s %d %s %s%d:%s," % (SENDER, conn_id, path, head, len(body), body)


def request(path: bytes = b"/app/x", *, method: bytes = b"GET", version: bytes = b"HTTP/1.1",
            query: bytes | None = None, extra: dict[bytes, Any] | None = None,
            body: bytes = b"") -> m2.Message:
    headers: dict[bytes, Any] = {
        b"REMOTE_ADDR": b"127.0.0.1", b"METHOD": method, b"URL_SCHEME": b"http",
        b"PATTERN": b"/", b"URI": path + (b"?" + query if query else b""), b"VERSION": version,
        b"PATH": path, b"host": b"localhost:6767", b"x-forwarded-for": b"127.0.0.1",
        b"DOWNLOAD_CREDITS": b"102400"}
    if query:
        headers[b"QUERY"] = query
    headers.update(extra or {})
    return m2.parse_message(message(path, headers, body))


def handshake(path: bytes = b"/chat/ws", protocols: bytes | None = b"chat, v2") -> m2.Message:
    headers: dict[bytes, Any] = {b"METHOD": b"WEBSOCKET_HANDSHAKE", b"upgrade": b"websocket",
                                 b"sec-websocket-key": b"dGhlIHNhbXBsZSBub25jZQ=="}
    if protocols:
        headers[b"sec-websocket-protocol"] = protocols
    event = request(path, extra=headers)
    raw = message(path, dict(event.headers), ACCEPT)
    return m2.parse_message(raw)


# ---- scopes --------------------------------------------------------------------


def test_http_scope_fields() -> None:
    event = request(b"/app/a%20b/c", query=b"x=1&y=%20",
                    extra={b"x-dup": [b"one", b"two"], b"cookie": b"a=1",
                           b"x-mongrel2-upload-start": b"/etc/passwd"})
    scope = asgi.http_scope(event, "/app", {"db": "x"})
    assert scope["type"] == "http" and scope["asgi"] == {"version": "3.0", "spec_version": "2.4"}
    assert (scope["http_version"], scope["method"], scope["scheme"]) == ("1.1", "GET", "http")
    assert scope["path"] == "/app/a b/c" and scope["root_path"] == "/app"
    assert scope["raw_path"] == b"/app/a%20b/c"
    assert scope["query_string"] == b"x=1&y=%20"
    assert (b"x-dup", b"one") in scope["headers"] and (b"x-dup", b"two") in scope["headers"]
    names = [name for name, _ in scope["headers"]]
    assert names.index(b"x-dup") + 1 == names.index(b"x-dup", names.index(b"x-dup") + 1)
    assert b"METHOD" not in names and b"DOWNLOAD_CREDITS" not in names
    assert b"x-mongrel2-upload-start" not in names  # forgeable: never shown to the app
    assert scope["client"] == ["127.0.0.1", 0]
    assert scope["server"] == ["localhost", 6767]
    assert scope["state"] == {"db": "x"}


def test_http_scope_root_route_off_route_and_https() -> None:
    assert asgi.http_scope(request(b"/x"), "")["root_path"] == ""
    # Not under the route (a prefix of it, as Mongrel2 also matches): no root_path.
    scope = asgi.http_scope(request(b"/ap"), "/app")
    assert (scope["path"], scope["root_path"]) == ("/ap", "")
    # Normalised like routing: dot segments never climb out of the route.
    scope = asgi.http_scope(request(b"/app/../app/./y"), "/app")
    assert (scope["path"], scope["root_path"], scope["raw_path"]) == (
        "/app/y", "/app", b"/app/../app/./y")
    https = request(b"/x", version=b"HTTP/1.0", extra={b"URL_SCHEME": b"https",
                                                       b"host": b"[::1]"})
    scope = asgi.http_scope(https, "")
    assert (scope["scheme"], scope["http_version"], scope["server"]) == ("https", "1.0",
                                                                         ["[::1]", 443])
    assert "state" not in asgi.http_scope(request(), "")


def test_websocket_scope() -> None:
    scope = asgi.websocket_scope(handshake(), "/chat")
    assert scope["type"] == "websocket" and scope["scheme"] == "ws"
    assert scope["subprotocols"] == ["chat", "v2"]
    assert (scope["path"], scope["root_path"]) == ("/chat/ws", "/chat")
    assert asgi.websocket_scope(handshake(protocols=None), "")["subprotocols"] == []


# ---- HTTP responses ----------------------------------------------------------------


def start(response: asgi.HttpResponse, status: int = 200,
          headers: list[tuple[bytes, bytes]] | None = None, **kw: Any) -> None:
    response.start({"type": "http.response.start", "status": status,
                    "headers": headers or [], **kw})


def test_single_body_gets_a_content_length() -> None:
    r = asgi.HttpResponse(request())
    start(r, 200, [(b"content-type", b"text/plain"), (b"x-a", b"1"), (b"x-a", b"2")])
    out = r.body(b"hello", False)
    assert out == (b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\nx-a: 1\r\nx-a: 2\r\n"
                   b"content-length: 5\r\n\r\nhello")
    assert r.complete and not r.close


def test_streamed_body_is_chunked_on_http11_and_close_delimited_on_http10() -> None:
    r = asgi.HttpResponse(request())
    start(r)
    first = r.body(b"data: 1\n\n", True)
    assert first.startswith(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n")
    assert first.endswith(b"9\r\ndata: 1\n\n\r\n")
    assert r.body(b"", True) == b""  # an empty piece is no chunk (that would end it)
    assert r.body(b"", False) == b"0\r\n\r\n"
    assert r.complete and not r.close
    r10 = asgi.HttpResponse(request(version=b"HTTP/1.0"))
    start(r10)
    assert r10.body(b"x", True) == b"HTTP/1.0 200 OK\r\nconnection: close\r\n\r\nx"
    assert r10.close


def test_framing_headers_of_the_app_are_ours_and_connection_close_is_honoured() -> None:
    r = asgi.HttpResponse(request())
    start(r, 200, [(b"transfer-encoding", b"chunked"), (b"connection", b"close"),
                   (b"content-length", b"2")])
    assert r.body(b"ok", False) == (b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n"
                                    b"connection: close\r\n\r\nok")
    assert r.close


def test_head_204_and_client_close() -> None:
    r = asgi.HttpResponse(request(method=b"HEAD"))
    start(r, 200, [(b"content-length", b"10")])
    assert r.body(b"", False) == b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\n"
    r = asgi.HttpResponse(request())
    start(r, 204)
    assert r.body(b"", False) == b"HTTP/1.1 204 No Content\r\n\r\n"
    r = asgi.HttpResponse(request(extra={b"connection": b"close"}))
    start(r)
    assert b"connection: close" in r.body(b"", False) and r.close


@pytest.mark.parametrize(("headers", "kw", "error"), [
    ([], {"trailers": True}, "trailers are not supported"),
    ([(b"x", "str")], {}, "must be bytes"),
    ([(b"bad name", b"v")], {}, "invalid header"),
    ([(b"x", b"a\r\nb")], {}, "invalid header"),
    ([(b"content-length", b"1"), (b"content-length", b"2")], {}, "conflicting"),
])
def test_bad_response_start_is_refused(headers: list[Any], kw: dict[str, Any],
                                       error: str) -> None:
    with pytest.raises(asgi.ProtocolError, match=error):
        start(asgi.HttpResponse(request()), 200, headers, **kw)


def test_body_rules() -> None:
    r = asgi.HttpResponse(request())
    with pytest.raises(asgi.ProtocolError, match=r"before http\.response\.start"):
        r.body(b"x", False)
    start(r, 200, [(b"content-length", b"3")])
    with pytest.raises(asgi.ProtocolError, match="longer than content-length"):
        r.body(b"toolong", False)
    r = asgi.HttpResponse(request())
    start(r, 200, [(b"content-length", b"3")])
    with pytest.raises(asgi.ProtocolError, match="shorter"):
        r.body(b"x", False)
    r = asgi.HttpResponse(request())
    start(r)
    r.body(b"", False)
    with pytest.raises(asgi.ProtocolError, match="after the response completed"):
        r.body(b"", False)
    with pytest.raises(asgi.ProtocolError, match="sent twice"):
        start(r)


# ---- WebSocket frames ----------------------------------------------------------


@pytest.mark.parametrize(("size", "head"), [(0, b"\x81\x00"), (125, b"\x81\x7d"),
                                            (126, b"\x81\x7e\x00\x7e"),
                                            (65536, b"\x81\x7f" + struct.pack("!Q", 65536))])
def test_frame_lengths(size: int, head: bytes) -> None:
    assert asgi.frame(asgi.OP_TEXT, b"a" * size) == head + b"a" * size


def test_close_frames_and_codes() -> None:
    assert asgi.close_frame(4001, "bye") == b"\x88\x05\x0f\xa1bye"
    assert asgi.close_frame(1005) == b"\x88\x00"
    assert len(asgi.close_frame(1000, "x" * 500)) == 2 + 125
    assert asgi.parse_close(b"\x0f\xa1bye") == (4001, "bye")
    assert asgi.parse_close(b"") == (1005, "")
    assert asgi.valid_close_code(1000) and asgi.valid_close_code(4999)
    assert not any(asgi.valid_close_code(c) for c in (999, 1005, 1006, 1015, 2000, 5000, "1000"))


def test_accept_and_handshake_response() -> None:
    accept = asgi.accept_message({"subprotocol": "chat", "headers": [(b"x-a", b"1")]},
                                 ["chat", "v2"])
    assert asgi.handshake_response(ACCEPT, accept) == (
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Accept: " + ACCEPT + b"\r\nSec-WebSocket-Protocol: chat\r\n"
        b"x-a: 1\r\n\r\n")
    with pytest.raises(asgi.ProtocolError, match="not offered"):
        asgi.accept_message({"subprotocol": "v3"}, ["chat"])
    with pytest.raises(asgi.ProtocolError, match="may not set"):
        asgi.accept_message({"headers": [(b"Sec-WebSocket-Accept", b"x")]}, [])


# ---- the runtime's per-connection state, with a stand-in worker -------------------


class FakeWorker:
    def __init__(self, max_size: int = 1 << 20) -> None:
        self.settings = AsgiSettings(connect=(), services=(), websocket_max_size=max_size)
        self.app_state: dict[str, Any] | None = None
        self.sent: list[list[bytes]] = []
        self.tasks: list[asyncio.Task[None]] = []

    def send(self, link: AsgiLink, frames: list[bytes]) -> None:
        self.sent.append(frames)

    def spawn(self, coro: Any) -> asyncio.Task[None]:
        task = asyncio.get_running_loop().create_task(coro)
        self.tasks.append(task)
        return task

    def replies(self) -> list[tuple[bytes, list[bytes]]]:
        """(flag, reply bodies) of each REPLY sent."""
        out = []
        for frames in self.sent:
            assert frames[0] == p.CMD[p.Command.REPLY]
            out.append((frames[2], [m2r.parse_reply(m).body for m in frames[3:]]))
        self.sent.clear()
        return out


def ws_frame(flags: int, body: bytes) -> m2.Message:
    return m2.parse_message(message(b"/chat/ws", {b"METHOD": b"WEBSOCKET",
                                                  b"FLAGS": b"0x%X" % flags}, body))


async def open_ws(worker: FakeWorker) -> WebSocketCycle:
    ws = WebSocketCycle(worker, AsgiLink(0, "e", b"", LINK), b"\x00" * 8, handshake(), "/chat", 0.0)
    assert (await ws.receive()) == {"type": "websocket.connect"}
    await ws.send({"type": "websocket.accept"})
    ((flag, (body,)),) = worker.replies()
    assert flag == p.FLAG_MORE and body.startswith(b"HTTP/1.1 101 ")
    return ws


async def settle(worker: FakeWorker) -> None:
    while worker.tasks:
        await worker.tasks.pop(0)


def test_websocket_ping_text_close_echo() -> None:
    async def main() -> None:
        w = FakeWorker()
        ws = await open_ws(w)
        ws.on_frame(ws_frame(0x89, b"pp"))
        await settle(w)
        assert w.replies() == [(p.FLAG_MORE, [b"\x8a\x02pp"])]
        ws.on_frame(ws_frame(0x81, "héllo".encode()))
        ws.on_frame(ws_frame(0x82, b"\x00\x01"))
        assert await ws.receive() == {"type": "websocket.receive", "text": "héllo"}
        assert await ws.receive() == {"type": "websocket.receive", "bytes": b"\x00\x01"}
        ws.on_frame(ws_frame(0x88, b"\x0f\xa2done"))
        await settle(w)
        assert await ws.receive() == {"type": "websocket.disconnect", "code": 4002,
                                      "reason": "done"}
        # Echoed, then the connection is closed and the request ended.
        assert w.replies() == [(p.FLAG_LAST, [b"\x88\x02\x0f\xa2", b""])]
        with pytest.raises(ClientDisconnected):
            await ws.send({"type": "websocket.send", "text": "late"})
    asyncio.run(main())


@pytest.mark.parametrize(("frames", "code"), [
    ([(0x81, b"\xff\xfe")], 1007),                   # text that is not UTF-8
    ([(0x82, b"x" * 200)], 1009),                    # over websocket_max_size
    ([(0x80, b"stray continuation")], 1002),
    ([(0x83, b"")], 1002),                           # unknown opcode
])
def test_websocket_bad_frames_close_with_a_code(frames: list[tuple[int, bytes]],
                                                code: int) -> None:
    async def main() -> None:
        w = FakeWorker(max_size=100)
        ws = await open_ws(w)
        for flags, body in frames:
            ws.on_frame(ws_frame(flags, body))
        await settle(w)
        disconnect = await ws.receive()
        assert disconnect["type"] == "websocket.disconnect" and disconnect["code"] == code
        ((flag, bodies),) = w.replies()
        assert flag == p.FLAG_LAST and bodies[0][:4] == b"\x88" + bytes([len(bodies[0]) - 2]) \
            + struct.pack("!H", code) and bodies[1] == b""
    asyncio.run(main())


def test_fragments_are_reassembled() -> None:
    async def main() -> None:
        w = FakeWorker()
        ws = await open_ws(w)
        ws.on_frame(ws_frame(0x01, b"frag"))
        ws.on_frame(ws_frame(0x80, b"mented"))
        assert await ws.receive() == {"type": "websocket.receive", "text": "fragmented"}
    asyncio.run(main())


def test_websocket_close_before_accept_is_403_and_cancel_is_1006() -> None:
    async def main() -> None:
        w = FakeWorker()
        ws = WebSocketCycle(w, AsgiLink(0, "e", b"", LINK), b"\x00" * 8, handshake(), "", 0.0)
        await ws.receive()
        await ws.send({"type": "websocket.close", "code": 1000})
        ((flag, (body, close)),) = w.replies()
        assert flag == p.FLAG_LAST and body.startswith(b"HTTP/1.1 403 ") and close == b""
        ws = await open_ws(w)
        ws.cancel()  # the broker's CANCEL: Mongrel2 said the client is gone
        assert (await ws.receive())["code"] == 1006
        with pytest.raises(ClientDisconnected):
            await ws.send({"type": "websocket.send", "text": "x"})
    asyncio.run(main())


def test_http_flow_control_splits_a_body_within_credits() -> None:
    async def main() -> None:
        w = FakeWorker()
        event = request(extra={b"DOWNLOAD_CREDITS": b"10"})
        http = HttpCycle(w, AsgiLink(0, "e", b"", LINK), b"\x00" * 8, event, "", 0.0)
        await http.send({"type": "http.response.start", "status": 200,
                         "headers": [(b"content-length", b"30")]})
        task = asyncio.get_running_loop().create_task(
            http.send({"type": "http.response.body", "body": b"y" * 30}))
        await asyncio.sleep(0)
        (first,) = w.replies()  # 10 bytes of credit: the head's first 10 bytes only
        assert first[0] == p.FLAG_MORE and len(first[1][0]) == 10
        while not task.done():
            http.flow.grant(10)
            await asyncio.sleep(0)
        sent = w.replies()
        assert sent[-1][0] == p.FLAG_LAST
        assert all(len(b) <= 10 for _, bodies in sent for b in bodies)
        assert await http.receive() == {"type": "http.request", "body": b"",
                                        "more_body": False}
        assert await http.receive() == {"type": "http.disconnect"}
    asyncio.run(main())


def test_real_mongrel2_handshake_and_frame_capture() -> None:
    """Captured from Mongrel2 1.12.2 with the websockets client (docs/protocol.md 12)."""
    lines = (Path(__file__).parent.parent / "fixtures"
             / "mongrel2-websocket-capture.txt").read_text().splitlines()
    shake, text = (m2.parse_message(ast.literal_eval(line[3:])) for line in lines)
    assert isinstance(shake, m2.WebSocketHandshake) and len(shake.body) == 28
    assert shake.header(b"DOWNLOAD_CREDITS") == b"102400"
    scope = asgi.websocket_scope(shake, "")
    assert (scope["path"], scope["query_string"], scope["subprotocols"]) == (
        "/ws/x", b"a=1", ["chat", "v2"])
    assert isinstance(text, m2.WebSocketFrame) and (text.flags, text.body) == (0x81, b"hello")


def test_proxy_headers_from_a_trusted_front_only() -> None:
    from scale0.core.forwarded import trust
    headers = {b"x-forwarded-proto": b"https", b"x-real-ip": b"203.0.113.9",
               b"host": b"example.com"}
    trusted = asgi.http_scope(request(extra=headers), "")
    assert (trusted["scheme"], trusted["client"], trusted["server"]) == (
        "https", ["203.0.113.9", 0], ["example.com", 443])
    ws = asgi.websocket_scope(handshake(), "", None, trust("127.0.0.1"))
    assert ws["scheme"] == "ws"
    other = asgi.http_scope(request(extra={**headers, b"REMOTE_ADDR": b"10.0.0.9"}), "")
    assert (other["scheme"], other["client"]) == ("http", ["10.0.0.9", 0])
    anyone = asgi.http_scope(request(extra={**headers, b"REMOTE_ADDR": b"10.0.0.9"}), "",
                             None, trust("*"))
    assert anyone["scheme"] == "https"
