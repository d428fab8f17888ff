"""One request's reply path on a worker loop: the send window and the stream.

`FlowWindow` is sans-IO: Mongrel2's download credits (docs/protocol.md 3.9,
``download.flow_control``). The rule is "the reply bytes of a connection that
Mongrel2 has not yet credited back never exceed its window"; the window is
the connection's, and Mongrel2 announces it (DOWNLOAD_CREDITS) on a
connection's first request only, so a request starts with the REQUEST's
window frame (what the broker says is left of it), else its DOWNLOAD_CREDITS
header, else it has none. At most MAX_OUTSTANDING_MESSAGES messages are
unacknowledged (Mongrel2's 16-message limit without flow control). CREDIT n
from the broker returns n bytes, oldest message first. Without a window
(flow control off) pieces are only capped in size.

`ReplyStream` is what the app's response is written to. It runs on the loop
thread that owns the request's socket (worker/loop.py), so a send is a plain
non-blocking send on that DEALER, under the loop's lock (the lock hands the
socket between the loop and the heartbeat thread, see worker/process.py). When the
window is full, the same thread reads its own sockets (CREDIT, CANCEL,
HEARTBEAT...) until it may send: no other thread, no condition variable.
Time spent waiting there is left out of the request's age for `--timeout`.
"""

from __future__ import annotations

import time
from collections import deque
from typing import TYPE_CHECKING

from scale0.errors import Scale0Error
from scale0.wire import mongrel2 as m2
from scale0.wire import mongrel2_reply as m2r
from scale0.wire import s0w1 as p

if TYPE_CHECKING:
    from scale0.core.bodystream import BodyInput
    from scale0.worker.loop import BrokerConn, Loop

MAX_OUTSTANDING_MESSAGES = 8  # well under Mongrel2's 16 queued messages per connection
MAX_MESSAGE_BYTES = 1 << 20  # docs/protocol.md 3.9: a BODY is at most 1 MiB

_REPLY_HEAD = (p.VERSION, p.CMD[p.Command.REPLY])


class Cancelled(Scale0Error):
    """The broker cancelled the request (client gone, timed out, broker lost)."""


class FlowWindow:
    """Download credits of one request: what may be sent now (sans-IO)."""

    __slots__ = ("credits", "outstanding")

    def __init__(self, credits: int) -> None:
        self.credits = credits
        self.outstanding: deque[int] = deque()  # body bytes of unacknowledged messages

    def take(self, wanted: int) -> int:
        """Bytes (<= wanted) the next message may carry, now taken; 0: wait for CREDIT."""
        if self.credits > 0 and len(self.outstanding) < MAX_OUTSTANDING_MESSAGES:
            n = min(wanted, self.credits, MAX_MESSAGE_BYTES)
            self.credits -= n
            self.outstanding.append(n)
            return n
        return 0

    def grant(self, n: int) -> None:
        """Mongrel2 wrote `n` more bytes: they come back, and acknowledge messages."""
        self.credits += n
        outstanding = self.outstanding
        while outstanding and n >= outstanding[0]:
            n -= outstanding.popleft()
        if outstanding and n:
            outstanding[0] -= n


class ReplyStream:
    """The HTTP response of one request, written by the app on its loop thread.

    `send` streams bytes within the window; `last` sends the final bytes and
    ends the request in the same message (REPLY with FLAG_LAST, the Mongrel2
    messages, and the empty close message when `close`). A request not ended
    by `last` is ended by the loop when the handler returns (`end`).
    """

    __slots__ = (
        "_conn_id",
        "_loop",
        "_prefix",
        "_sender",
        "blocked",
        "body",
        "cancelled",
        "conn",
        "ended",
        "flow",
        "rid",
        "started_s",
    )

    def __init__(self, loop: Loop, conn: BrokerConn, rid: bytes, event: m2.Message,
                 flow: FlowWindow | None, now: float) -> None:
        self._loop = loop
        self.conn = conn
        self.rid = rid
        self._sender = event.sender
        self._conn_id = event.conn_id
        self._prefix = b""  # the Mongrel2 reply prefix, built (and checked) once
        self.flow = flow
        self.cancelled = False
        self.ended = False
        # Read by the heartbeat thread without the lock (one attribute each,
        # atomic under the GIL): the request's last progress (its start, then
        # each piece of reply), moved later by the time spent waiting for
        # credits. So `--timeout` reaps an app that is stuck, never a long
        # download that keeps going.
        self.started_s = now
        self.blocked = False
        # upload.stream: the request's wsgi.input, fed BODY pieces by the loop.
        self.body: BodyInput | None = None

    def _reply(self, body: m2r.Body) -> bytes:
        if not self._prefix:
            self._prefix = m2r.reply_prefix(self._sender, self._conn_id)  # m2r.ReplyError if bad
        return self._prefix + body

    def _take(self, wanted: int) -> int:
        """Bytes that may go now (<= wanted), waiting on our socket for credits.
        Raises Cancelled. Called with the loop's lock held."""
        if self.cancelled:
            raise Cancelled
        flow = self.flow
        if flow is None:
            return min(wanted, MAX_MESSAGE_BYTES)
        n = flow.take(wanted)
        if n:
            return n
        blocked_at = time.monotonic()
        self.blocked = True
        try:
            while True:
                self._loop.wait_io()  # reads CREDIT/CANCEL for us, keeps heartbeats going
                if self.cancelled:
                    raise Cancelled
                n = flow.take(wanted)
                if n:
                    return n
        finally:
            self.started_s += time.monotonic() - blocked_at
            self.blocked = False

    def send(self, data: m2r.Body) -> None:
        if self.ended:
            raise RuntimeError("the request has already ended")
        loop = self._loop
        with loop.lock:
            loop.read_now()  # a CANCEL or CREDIT that came meanwhile
            self.started_s = time.monotonic()  # the app made progress: a piece to send
            while data:
                n = self._take(len(data))
                piece, data = m2r.split_body(data, n)
                loop.send(self.conn, [*_REPLY_HEAD, self.rid, p.FLAG_MORE, self._reply(piece)])

    def last(self, data: m2r.Body, close: bool) -> None:
        if self.ended:
            raise RuntimeError("the request has already ended")
        loop = self._loop
        with loop.lock:
            # No read_now() here: a CANCEL not read yet only means the broker
            # discards these messages (docs/protocol.md 3.4, rule 5).
            frames = [*_REPLY_HEAD, self.rid, p.FLAG_LAST]
            while data:
                n = self._take(len(data))  # these n bytes of credit are ours now
                piece, data = m2r.split_body(data, n)
                if data:  # over the window: stream this piece, the tail ends the request
                    loop.send(self.conn, [*_REPLY_HEAD, self.rid, p.FLAG_MORE,
                                          self._reply(piece)])
                else:
                    frames.append(self._reply(piece))
            if close:
                frames.append(self._reply(b""))
            self.ended = True
            loop.send(self.conn, frames)

    def end_locked(self, close: bool) -> None:
        """End the request if `last` did not (also after errors and cancels).
        The loop calls it with its lock held."""
        if not self.ended:
            self.ended = True
            frames = [*_REPLY_HEAD, self.rid, p.FLAG_LAST]
            if close and not self.cancelled:
                try:
                    frames.append(self._reply(b""))
                except m2r.ReplyError:  # a sender no reply can name: nothing to close
                    pass
            self._loop.send(self.conn, frames)
