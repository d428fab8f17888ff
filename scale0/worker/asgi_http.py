"""An HTTP request at the ASGI worker: scope, body in, response out (ASGI 3.0 HTTP).

`HttpCycle` runs the app on one request's `http` scope (worker/asgi.py builds
it and frames the response bytes). `receive()` gives the body as
`http.request` events, from one of three places (docs/protocol.md 4.5):

* inline in the REQUEST's Mongrel2 message: one event;
* a file Mongrel2 spooled (`upload_dir`, opened by worker/upload.py): read
  in BODY_CHUNK pieces off the loop, deleted after the response;
* streamed (HELLO meta ``bodies=stream``): BODY pieces go to the request's
  `bodystream.BodyReader` and come out as events with ``more_body``, READ
  credits going back as the app takes them, so at most one window of a body
  waits here however slow the app.

After the body, `receive()` waits for the end: `http.disconnect` once the
response is complete or the broker CANCELs. An exception before the
response starts is a 500; after it, the connection is closed; an app that
returns without a response gets a 500 too.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from typing import Any, BinaryIO

from scale0.core.bodystream import BodyError, BodyReader
from scale0.wire import mongrel2 as m2
from scale0.wire import s0w1 as p
from scale0.worker import asgi
from scale0.worker.asgi_cycle import App, ClientDisconnected, Cycle, Message
from scale0.worker.upload import BadRequest, open_upload

log = logging.getLogger(__name__)

BODY_CHUNK = 64 * 1024  # pieces of a spooled upload handed to receive()


class HttpCycle(Cycle):
    """An HTTP request: its scope, body and response (module docstring)."""

    def __init__(self, *args: Any, **kw: Any) -> None:
        super().__init__(*args, **kw)
        self.response = asgi.HttpResponse(self.event)
        self._disconnected = asyncio.Event()
        self._body_done = False
        self._upload: BinaryIO | None = None
        self._upload_left = 0
        # A streamed body (upload.stream): BODY pieces paced by READ credits
        # (core/bodystream.py; docs/protocol.md 3.11, 3.12). None otherwise.
        self._body: BodyReader | None = None
        self._body_error: BodyError | None = None
        self._body_arrived = asyncio.Event()

    def cancel(self) -> None:
        super().cancel()
        self._disconnected.set()
        self._body_arrived.set()

    def on_body(self, data: bytes, end: bool) -> None:
        if self._body is None or self._body_error is not None:
            return
        try:
            self._body.feed(data, end)
        except BodyError as exc:
            self._body_error = exc
        self._body_arrived.set()

    def _credit(self, reader: BodyReader) -> None:
        n = reader.credit()
        if n and not self.cancelled and not self.ended:
            self.worker.send(self.link, [p.CMD[p.Command.READ], self.rid, b"%d" % n])

    async def _receive_streamed(self, reader: BodyReader) -> Message:
        """The next `http.request` of a streamed body: what is buffered, else
        the next piece. Invariant (core/bodystream.py): granted and not received +
        buffered <= the window, so at most a window waits here for the app;
        credits are granted only as the app takes, so a slow app paces the client."""
        while True:
            if self.cancelled:
                self._body_done = True
                return {"type": "http.disconnect"}
            data = reader.take()
            if not data and not reader.eof and self._body_error is not None:
                raise self._body_error
            self._credit(reader)  # the first call grants the window; then what was taken
            if data or reader.eof:
                self._body_done = reader.eof
                self.flow.progress_s = time.monotonic()  # reading the body is progress
                return {"type": "http.request", "body": data, "more_body": not reader.eof}
            self._body_arrived.clear()
            await self._body_arrived.wait()

    async def receive(self) -> Message:
        if not self._body_done:
            if self._body is not None:
                return await self._receive_streamed(self._body)
            if self._upload is None:
                self._body_done = True
                return {"type": "http.request", "body": self.event.body, "more_body": False}
            loop = asyncio.get_running_loop()
            chunk = await loop.run_in_executor(None, self._upload.read,
                                               min(BODY_CHUNK, self._upload_left))
            self._upload_left -= len(chunk)
            self._body_done = not chunk or self._upload_left <= 0
            return {"type": "http.request", "body": chunk, "more_body": not self._body_done}
        if not self.response.complete and not self.cancelled:
            await self._disconnected.wait()
        return {"type": "http.disconnect"}

    async def send(self, message: Message) -> None:
        if self.cancelled or self.ended:
            raise ClientDisconnected("the client is gone")
        kind = message.get("type")
        response = self.response
        if kind == "http.response.start":
            response.start(message)
        elif kind == "http.response.body":
            data = response.body(message.get("body", b""), bool(message.get("more_body")))
            if response.complete:
                await self.write(data, last=True, close=response.close)
                self._disconnected.set()  # receive() now answers http.disconnect
            elif data:
                await self.write(data)
        else:
            raise asgi.ProtocolError(f"unexpected message {kind!r} on an HTTP connection")

    async def run(self, app: App) -> None:
        event = self.event
        scope = asgi.http_scope(event, self.script_name, self.worker.app_state,
                                self.worker.settings.forwarded)
        try:
            if isinstance(event, m2.UploadDone):
                try:
                    self._upload = open_upload(event.upload_path, self.worker.settings.upload_dir)
                except BadRequest as exc:
                    log.warning("bad upload on connection %d: %s", event.conn_id, exc.message)
                    await self.write(asgi.error_response(exc.status, exc.message, close=True),
                                     last=True, close=True)
                    return
                self._upload_left = os.fstat(self._upload.fileno()).st_size
            elif m2.streamed_body(event.headers):  # the body follows as BODY pieces
                self._body = BodyReader(event.body,
                                        m2.content_length(event.header(b"content-length")))
            await app(scope, self.receive, self.send)
        except ClientDisconnected:
            pass
        except BodyError as exc:  # the pieces do not make the declared body
            log.warning("bad streamed body on connection %d: %s", event.conn_id, exc)
            if not self.response.headers_sent and not self.ended and not self.cancelled:
                with contextlib.suppress(ClientDisconnected):
                    await self.write(asgi.error_response(exc.status_hint, str(exc), close=True),
                                     last=True, close=True)
        except Exception:
            if not self.cancelled:
                log.exception("ASGI app failed on %s %s", scope["method"], scope["path"])
            if not self.response.headers_sent and not self.ended and not self.cancelled:
                with contextlib.suppress(ClientDisconnected):
                    await self.write(asgi.error_response(500, "Internal Server Error",
                                                         close=self.response.request_close),
                                     last=True, close=self.response.request_close)
        finally:
            if not self.ended and not self.cancelled and not self.response.started:
                log.error("ASGI app returned without a response on %s", scope["path"])
                with contextlib.suppress(ClientDisconnected):
                    await self.write(asgi.error_response(500, "Internal Server Error"),
                                     last=True)
            # A response cut short (an error after the headers, or no last body)
            # can only be ended by closing the connection.
            self.end(close=True)
            if self._upload is not None:
                self._upload.close()
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(self._upload.name)
