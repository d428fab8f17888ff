"""WebSockets at the broker (protocol.md section 12).

A WebSocket is one long request: its handshake takes a slot at a worker that
announced the feature, every later frame of the connection goes to that
worker as FRAME, and the slot frees on the worker's LAST. Idle for
websocket_idle_timeout_s either way, it is closed (1001).
"""

from __future__ import annotations

import logging
from collections import deque

from scale0.core.bodies import Bodies
from scale0.core.records import HANDSHAKE, Done, Request, Service
from scale0.wire import mongrel2 as m2
from scale0.wire import mongrel2_reply as m2r
from scale0.wire import s0w1 as p

log = logging.getLogger(__name__)


class WebSockets(Bodies):
    def on_websocket(self, link: int, raw: bytes,
                     event: m2.WebSocketHandshake | m2.WebSocketFrame, now: float) -> None:
        """A WebSocket is one long request: its handshake takes a slot at a worker
        that announced the feature, every later frame of the connection goes to
        that worker (FRAME), and the slot frees on the worker's LAST.

        Its Request belongs to the service's WebSocket twin: a Service sharing
        the real one's ready LRU, workers and queue, with an `active` of its own
        whose timeout is the idle timeout. A frame either way pushes the deadline
        to now + that timeout (for the worker's replies, _on_reply's streaming
        rule does it), so the twin's `active` stays in deadline order, and the
        request paths need no WebSocket test.
        """
        if isinstance(event, m2.WebSocketFrame):
            self._on_ws_frame(link, raw, event, now)
            return
        self.counters.requests += 1
        sender, conn_id = event.sender, event.conn_id
        if link not in self.link_credits:  # as in _on_request: the link's window size
            window = event.header(b"DOWNLOAD_CREDITS")
            if window is not None and window.isdigit() and len(window) <= m2.MAX_ID_DIGITS:
                self.link_credits[link] = int(window)
        try:
            prefix = m2r.reply_prefix(sender, conn_id)
        except m2r.ReplyError:
            self.counters.bad_mongrel2 += 1
            log.warning("unanswerable sender %r on link %d", sender, link)
            return
        match = self.routes.lookup(event.header(b"host"), event.path)
        if match is None:
            self.counters.no_route += 1
            self._refuse_handshake(link, raw, event, 404, "", now)
            return
        service = self.services[match.service]
        if service.workers and not all(w.websocket for w in service.workers.values()):
            # A WSGI worker would take the handshake for a plain GET.
            self.counters.websocket_refused += 1
            self._refuse_handshake(link, raw, event, 400, "this service does not take "
                                   "WebSockets", now)
            return
        self.counters.websockets += 1
        rid = self._next_rid
        self._next_rid = rid + 1
        r = Request(rid, link, sender, conn_id, event.method, raw, self._ws_service(service),
                    match.script_name.encode("latin-1"), now, True, reply_prefix=prefix)
        if self.record:
            r.uri = event.header(b"URI") or event.path
        self.requests[rid] = r
        key = (link, conn_id)
        on_conn = self.connections.get(key)
        if on_conn is not None:
            on_conn.append(r)
            return
        self.connections[key] = deque((r,))
        self._route(r, now)

    def _refuse_handshake(self, link: int, raw: bytes, event: m2.WebSocketHandshake,
                          status: int, text: str, now: float) -> None:
        """Answered at once and closed, even behind pipelined requests: with the
        connection closed, nothing can be answered out of order on it."""
        self._reply_error(link, event.sender, event.conn_id, status, text, close=True)
        if self.record:
            uri = (event.header(b"URI") or event.path).decode("latin-1")
            self.done.append(Done(link, event.conn_id, "GET", uri, "", "", status, len(raw), 0,
                                  now, now, 0))

    def _ws_service(self, service: Service) -> Service:
        twin = self._ws_services.get(service.name)
        if twin is None:
            twin = self._ws_services[service.name] = Service(
                service.name, service.name_bytes, ready=service.ready,
                timeout_s=self.settings.websocket_idle_timeout_s, queue=service.queue,
                workers=service.workers)
        return twin

    def _on_ws_frame(self, link: int, raw: bytes, event: m2.WebSocketFrame, now: float) -> None:
        on_conn = self.connections.get((link, event.conn_id))
        r = on_conn[0] if on_conn else None
        if r is None or r.method != HANDSHAKE:
            # No WebSocket of ours (its worker left, a broker restart, a timeout):
            # close it, so that the client is not left waiting.
            self.counters.websocket_strays += 1
            try:
                self.to_mongrel2.append((link, m2r.close_reply(event.sender, event.conn_id)))
            except m2r.ReplyError:
                pass
            return
        w = r.worker
        if w is None:  # still queued: a client must wait for the 101 before sending
            return
        r.deadline = now + r.service.timeout_s
        r.service.active.move_to_end(r.rid)
        self.to_workers.append([w.ident, p.VERSION, p.CMD[p.Command.FRAME],
                                p.encode_request_id(r.rid), raw])

    def _ws_idle(self, r: Request) -> None:
        """The idle timeout: a close frame (1001) if the WebSocket was accepted."""
        self.counters.websocket_timeouts += 1
        if r.reply_started:
            self._ws_close_frame(r, 1001, "idle timeout")
        self._fail(r, 504, "the WebSocket was not accepted in time", close=True)

    def _ws_close_frame(self, r: Request, code: int, reason: str) -> None:
        if not r.cancelled:
            payload = code.to_bytes(2, "big") + reason.encode()
            self.to_mongrel2.append(
                (r.link, m2r.reply(r.sender, r.conn_id, bytes((0x88, len(payload))) + payload)))
