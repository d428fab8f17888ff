"""A WebSocket at the ASGI worker (ASGI 3.0 WebSocket, docs/protocol.md section 12).

Mongrel2 passes a valid upgrade on as a request with METHOD
WEBSOCKET_HANDSHAKE, its body the Sec-WebSocket-Accept value it computed;
every later client frame comes as a FRAME of the same request id, unmasked,
with its FIN bit and opcode in FLAGS (fragments arrive joined).
`WebSocketCycle` holds its slot from the handshake to the close:

* `websocket.accept` sends the 101 (subprotocol and headers from the app);
  a close, or the app returning, before accept is HTTP 403 (ASGI spec);
* text and binary frames become `websocket.receive` (a stray fragment or a
  bad opcode is closed with 1002, a message over `websocket_max_size` with
  1009, bad UTF-8 with 1007); a ping is answered with a
  pong; a client's close is echoed, then the connection is closed;
* a CANCEL (client gone, broker lost) is `websocket.disconnect` 1006; a
  worker leaving after its graceful timeout closes with 1001.

Frames the server writes on the app's behalf (pong, close echo) are tasks
of the worker (`_later`), awaited before the LAST.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Coroutine
from typing import Any

from scale0.wire import mongrel2 as m2
from scale0.worker import asgi
from scale0.worker.asgi_cycle import App, ClientDisconnected, Cycle, Message

log = logging.getLogger(__name__)


class WebSocketCycle(Cycle):
    """A WebSocket, from its handshake to its close (module docstring)."""

    websocket = True

    def __init__(self, *args: Any, **kw: Any) -> None:
        super().__init__(*args, **kw)
        self.state = "connecting"  # -> "open" -> "closed"
        self.events: asyncio.Queue[Message] = asyncio.Queue()
        self.events.put_nowait({"type": "websocket.connect"})
        self._parts: list[bytes] = []
        self._parts_size = 0
        self._parts_text = False
        self._close_code = asgi.CLOSE_ABNORMAL
        self.offered: list[str] = []
        self._writes: list[asyncio.Task[None]] = []  # frames written on the app's behalf

    def _later(self, coro: Coroutine[Any, Any, None]) -> None:
        self._writes = [t for t in self._writes if not t.done()]
        self._writes.append(self.worker.spawn(coro))

    async def receive(self) -> Message:
        if self.state == "closed" and self.events.empty():
            return {"type": "websocket.disconnect", "code": self._close_code}
        return await self.events.get()

    def _gone(self, code: int, reason: str = "") -> None:
        """The connection is over for the app: it gets websocket.disconnect."""
        if self.state != "closed":
            self.state = "closed"
            self._close_code = code
            self.events.put_nowait({"type": "websocket.disconnect", "code": code,
                                    "reason": reason})

    async def _close(self, code: int, reason: str = "") -> None:
        """Send a close frame, end the request and close the TCP connection.
        The client's close answer is not awaited: Mongrel2 writes the frame,
        then closes (RFC 6455 7.1.1 lets the server close the TCP first)."""
        self._gone(code, reason)
        with contextlib.suppress(ClientDisconnected):
            await self.write(asgi.close_frame(code, reason), last=True, close=True)

    async def send(self, message: Message) -> None:
        kind = message.get("type")
        if self.cancelled or self.ended or (self.state == "closed"
                                            and kind != "websocket.close"):
            raise ClientDisconnected("the WebSocket is closed")
        if kind == "websocket.accept":
            if self.state != "connecting":
                raise asgi.ProtocolError("websocket.accept after the handshake")
            accept = asgi.accept_message(message, self.offered)
            self.state = "open"
            await self.write(asgi.handshake_response(self.event.body, accept))
        elif kind == "websocket.send":
            if self.state != "open":
                raise asgi.ProtocolError("websocket.send before websocket.accept")
            text, data = message.get("text"), message.get("bytes")
            if text is not None:
                if not isinstance(text, str):
                    raise asgi.ProtocolError("websocket.send text must be a str")
                await self.write(asgi.frame(asgi.OP_TEXT, text.encode("utf-8")))
            elif data is not None:
                if not isinstance(data, bytes):
                    raise asgi.ProtocolError("websocket.send bytes must be bytes")
                await self.write(asgi.frame(asgi.OP_BINARY, data))
            else:
                raise asgi.ProtocolError("websocket.send needs text or bytes")
        elif kind == "websocket.close":
            code = message.get("code", asgi.CLOSE_NORMAL)
            reason = message.get("reason") or ""
            if not asgi.valid_close_code(code) or not isinstance(reason, str):
                raise asgi.ProtocolError(f"invalid close code {code!r} or reason")
            if self.state == "connecting":  # refused before accept: HTTP 403 (ASGI spec)
                self._gone(code, reason)
                await self.write(asgi.error_response(403, "Forbidden", close=True),
                                 last=True, close=True)
            elif self.state == "open":
                await self._close(code, reason)
        else:
            raise asgi.ProtocolError(f"unexpected message {kind!r} on a WebSocket")

    def on_frame(self, event: m2.Message) -> None:
        """A client frame (Mongrel2 FLAGS: FIN bit and opcode, body unmasked)."""
        if self.state != "open" or not isinstance(event, m2.WebSocketFrame):
            return
        op, fin, body = event.flags & 0x0F, bool(event.flags & 0x80), event.body
        if op == asgi.OP_PING:
            self._later(self._quiet(self.write(asgi.frame(asgi.OP_PONG, body))))
        elif op == asgi.OP_PONG:
            pass
        elif op == asgi.OP_CLOSE:
            code, reason = asgi.parse_close(body)
            self._gone(code, reason)
            echo = code if asgi.valid_close_code(code) else asgi.CLOSE_NORMAL
            if code == asgi.CLOSE_NO_STATUS:
                echo = asgi.CLOSE_NO_STATUS  # an empty close is answered empty
            self._later(self._quiet(self.write(asgi.close_frame(echo), last=True,
                                                    close=True)))
        elif op in (asgi.OP_TEXT, asgi.OP_BINARY, asgi.OP_CONT):
            if (op == asgi.OP_CONT) != bool(self._parts):
                # Mongrel2 reassembles fragmented messages itself (seen with 1.12);
                # a stray continuation or an interleaved start is a protocol error.
                self._later(self._close(asgi.CLOSE_PROTOCOL, "bad fragmentation"))
                return
            if op != asgi.OP_CONT:
                self._parts_text = op == asgi.OP_TEXT
            self._parts.append(body)
            self._parts_size += len(body)
            if self._parts_size > self.worker.settings.websocket_max_size:
                self._parts.clear()
                self._later(self._close(asgi.CLOSE_TOO_BIG, "message too big"))
                return
            if fin:
                data = b"".join(self._parts)
                self._parts.clear()
                self._parts_size = 0
                if self._parts_text:
                    try:
                        text = data.decode("utf-8")
                    except UnicodeDecodeError:
                        self._later(self._close(asgi.CLOSE_INVALID_DATA, "invalid UTF-8"))
                        return
                    self.events.put_nowait({"type": "websocket.receive", "text": text})
                else:
                    self.events.put_nowait({"type": "websocket.receive", "bytes": data})
        else:
            self._later(self._close(asgi.CLOSE_PROTOCOL, "unknown opcode"))

    @staticmethod
    async def _quiet(write: Awaitable[None]) -> None:
        with contextlib.suppress(ClientDisconnected):
            await write

    def cancel(self) -> None:
        super().cancel()
        self._gone(asgi.CLOSE_ABNORMAL)

    def shutdown(self) -> None:
        if self.state == "open":
            self._later(self._close(asgi.CLOSE_GOING_AWAY, "server shutting down"))
        else:
            self.cancel()

    async def run(self, app: App) -> None:
        scope = asgi.websocket_scope(self.event, self.script_name, self.worker.app_state,
                                     self.worker.settings.forwarded)
        self.offered = scope["subprotocols"]
        try:
            await app(scope, self.receive, self.send)
        except ClientDisconnected:
            pass
        except Exception:
            if not self.cancelled:
                log.exception("ASGI app failed on WebSocket %s", scope["path"])
            if self.state == "connecting" and not self.ended:
                with contextlib.suppress(ClientDisconnected):
                    await self.write(asgi.error_response(500, "Internal Server Error",
                                                         close=True), last=True, close=True)
            elif self.state == "open":
                await self._close(asgi.CLOSE_INTERNAL)
        finally:
            if not self.ended and not self.cancelled:
                if self.state == "connecting":  # returned without accepting: refused
                    with contextlib.suppress(ClientDisconnected):
                        await self.write(asgi.error_response(403, "Forbidden", close=True),
                                         last=True, close=True)
                elif self.state == "open":
                    await self._close(asgi.CLOSE_NORMAL)
            if self._writes:  # a pong or close echo still being written goes first
                await asyncio.wait(self._writes)
            self.end(close=True)
