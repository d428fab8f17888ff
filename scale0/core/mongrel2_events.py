"""The Mongrel2 side of the dispatcher: `on_mongrel2`.

One message PULLed from a Mongrel2 link is parsed (wire/mongrel2.py) and
becomes a request (screened first: core/screen.py, protocol.md 4.4), a
disconnect, credits, a piece of a body or a WebSocket event. A request
refused before routing (400, 404, 413, 426) is answered at once, or in its
turn behind the active request of its connection (RFC 9112 section 9.3.2).
"""

from __future__ import annotations

from collections import deque

from scale0.core.records import REFUSED_TEXT, Done, Request
from scale0.core.screen import screen
from scale0.core.websockets import WebSockets
from scale0.wire import mongrel2 as m2
from scale0.wire import mongrel2_reply as m2r

_CREDITS_TAIL = b'{"type":"credits"},'


class Mongrel2Events(WebSockets):
    def on_mongrel2(self, link: int, raw: bytes, now: float) -> None:
        self._now = now
        if raw.endswith(_CREDITS_TAIL):
            # download.flow_control sends one per write; most arrive after the
            # request ended (Mongrel2 reports the write before the client can
            # send its next request). Those need no parse (the only per-reply
            # extra cost). Only a '@' path is a special message: a request
            # body may end alike. A longer id is malformed (and int() refuses
            # thousands of digits): parse_message decides.
            head = raw.split(b" ", 3)
            if (len(head) == 4 and head[2][:1] == b"@" and head[1].isdigit()
                    and len(head[1]) <= m2.MAX_ID_DIGITS):
                key = (link, int(head[1]))
                if key not in self.connections:
                    if key not in self.unacked:
                        return
                    credits = m2.credits_of(head[3])  # the end of a reply: count only
                    if credits is not None:
                        self._credited(key, credits)
                        return
        try:
            event = m2.parse_message(raw)
        except m2.Mongrel2ProtocolError as exc:
            self.counters.bad_mongrel2 += 1
            self.warnings.warning("malformed Mongrel2", now,
                                  "malformed Mongrel2 message on link %d: %s", link, exc)
            self._answer_malformed(link, raw, exc.status_hint)
            return
        if isinstance(event, (m2.HttpRequest, m2.UploadDone)):
            self._on_request(link, raw, event, now)
        elif isinstance(event, m2.Disconnect):
            self._on_disconnect(link, event.conn_id)
        elif isinstance(event, m2.Credits):
            self._on_credits(link, event.conn_id, event.credits)
        elif isinstance(event, m2.UploadStart):
            self._on_request(link, raw, event, now)
        elif isinstance(event, (m2.WebSocketHandshake, m2.WebSocketFrame)):
            self.on_websocket(link, raw, event, now)
        elif isinstance(event, m2.UploadChunk):
            self._on_chunk(link, event, now)
        else:  # JSON socket messages: not served
            self._reply_error(link, event.sender, event.conn_id, 501, close=True)

    def _on_request(self, link: int, raw: bytes,
                    req: m2.HttpRequest | m2.UploadStart | m2.UploadDone, now: float) -> None:
        if isinstance(req, m2.UploadDone) and self._refused_done(link, req):
            return
        if not isinstance(req, m2.UploadStart):
            self.counters.requests += 1
        sender, conn_id = req.sender, req.conn_id
        try:
            prefix = m2r.reply_prefix(sender, conn_id)
        except m2r.ReplyError:
            # parse_message takes any SENDER without a space, but a reply's must
            # be [A-Za-z0-9-]+ (docs/mongrel2.md): nobody could ever be answered.
            self.counters.bad_mongrel2 += 1
            self.warnings.warning("unanswerable sender", now, "unanswerable sender %r on link %d",
                                  sender, link)
            return
        close = _wants_close(req)
        key = (link, conn_id)
        if link not in self.link_credits:
            window = req.header(b"DOWNLOAD_CREDITS")  # upper case: Mongrel2's own
            if window is not None and window.isdigit() and len(window) <= m2.MAX_ID_DIGITS:
                self.link_credits[link] = int(window)
        refused = 0
        match = None
        req, raw, problem = screen(req, raw)
        # A done message matching its start names Mongrel2's own file (net/spool_files.py).
        spooled = b""
        if isinstance(req, m2.UploadDone) and self.uploads.pop(key, None) == req.upload_path:
            spooled = req.upload_path
        declared = m2.content_length(req.header(b"content-length"))
        if problem:  # duplicate Host, conflicting lengths (core/screen.py)
            self.counters.bad_requests += 1
            self.warnings.warning("bad request", now, "bad request on conn %d: %s", conn_id,
                                  problem)
            refused, close = 400, True
        elif isinstance(req, m2.UploadStart) and (req.body or not (declared or _chunked(req))):
            # Mongrel2's own upload-start has an empty body and a Content-Length
            # over limits.content_length, or is chunked (always spooled); a
            # client-forged header on a small request has neither.
            self.counters.forged_uploads += 1
            self.warnings.warning("forged upload", now, "forged upload-start on conn %d", conn_id)
            refused, close = 400, True
        elif isinstance(req, m2.UploadDone) and not spooled:
            self.counters.forged_uploads += 1
            self.warnings.warning("forged upload", now,
                                  "upload-done without matching upload-start on conn %d", conn_id)
            refused, close = 400, True
        elif declared is not None and declared > self.settings.max_body_bytes:
            self.counters.too_large += 1
            refused, close = 413, True  # for an upload: at its start, not after it
        elif isinstance(req, m2.UploadStart):
            self._on_upload_start(link, req)
            return
        elif b"upgrade" in req.headers and _websocket_upgrade(req):
            # Mongrel2 passes an upgrade it does not take as a handshake (no key or
            # version) as a plain GET: no app may answer it as one.
            self.counters.websocket_refused += 1
            refused, close = 426, True
        else:
            match = self.routes.lookup(req.header(b"host"), req.path)
            if match is None:
                self.counters.no_route += 1
                refused = 404
        on_conn = self.connections.get(key)
        if refused and isinstance(req, m2.UploadStart):
            self.counters.requests += 1  # refused at its start: it ends here, counted once
            if not req.body and (declared or _chunked(req)):  # genuine: Mongrel2's file
                self._refuse_upload(key, req.upload_path)
        if refused and on_conn is None:
            if spooled:
                self.to_unlink.append(spooled)
            self._reply_error(link, sender, conn_id, refused,
                              problem or REFUSED_TEXT.get(refused, ""), close=close)
            if self.record:
                uri = req.header(b"URI") or req.path
                self.done.append(Done(link, conn_id, req.method.decode("latin-1"),
                                      uri.decode("latin-1"), "", "", refused, len(raw),
                                      0, now, now, 0))
            return
        rid = self._next_rid
        self._next_rid = rid + 1
        if match is None:  # refused, but pipelined: answer in turn (RFC 9112 section 9.3.2)
            service, script_name = self._nowhere, b""
        else:
            service = self.services[match.service]
            script_name = match.script_name.encode("latin-1")
        r = Request(rid, link, sender, conn_id, req.method, raw, service, script_name, now,
                    close, reply_prefix=prefix, refused=refused, upload=spooled)
        if self.record:
            r.uri = req.header(b"URI") or req.path
        if m2.streamed_body(req.headers):  # upload.stream: the body follows (core/bodystream.py)
            r.streamed, r.body_in = True, len(req.body)
        self.requests[rid] = r
        if on_conn is not None:  # pipelined: wait behind the active request
            on_conn.append(r)
            return
        self.connections[key] = deque((r,))
        self._route(r, now)

    def _on_disconnect(self, link: int, conn_id: int) -> None:
        key = (link, conn_id)
        started = self.uploads.pop(key, None)  # Mongrel2 removes a half-written file
        if started is not None:  # itself, but it may have been complete
            self.to_unlink.append(started)
        self.refused_uploads.pop(key, None)
        self.unacked.pop(key, None)
        on_conn = self.connections.pop(key, None)
        if not on_conn:
            return
        self.counters.client_gone += 1
        for r in on_conn:
            if not r.cancelled:
                self._record(r, 499)
            self._forget(r, cancel=True)


def _chunked(req: m2.Message) -> bool:
    """A chunked body: Mongrel2 spools it whatever its size, with no Content-Length."""
    return b"chunked" in (req.header(b"transfer-encoding") or b"").lower()


def _wants_close(req: m2.Message) -> bool:
    connection = req.header(b"connection")
    if req.header(b"VERSION") == b"HTTP/1.0":
        return connection is None or connection.lower() != b"keep-alive"
    return connection is not None and b"close" in connection.lower()


def _websocket_upgrade(req: m2.Message) -> bool:
    """An HTTP request asking for a WebSocket (RFC 6455 4.1) that Mongrel2 did not
    take as a handshake: it lacks a valid key or version."""
    value = req.headers.get(b"upgrade")
    values = value if isinstance(value, list) else [value] if value else []
    return any(b"websocket" in v.lower() for v in values)
