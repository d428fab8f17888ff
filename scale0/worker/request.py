"""One request on a worker loop's thread, from its REQUEST to its LAST.

A loop (worker/loop.py) reads a REQUEST as a `Pending` and, once its sockets
are read empty, runs it here with `run_request`: parse the Mongrel2 message,
give the reply its send window (worker/reply.py: the REQUEST's window frame,
else DOWNLOAD_CREDITS, else none) and, with ``upload.stream``, its body input
(core/bodystream.py), then release the loop's lock and call the process's
`Handler` (the WSGI app's adapter, in scale0/cli.py) on this same thread.

Whatever happens the request ends with exactly one LAST (docs/protocol.md
3.4): a message that does not parse, a request cancelled while it waited,
or a broken streamed body get an empty LAST; a handler that raises, or is
cancelled (`Cancelled`, from its next send), is ended by `end_locked`.

A streamed body is read on this thread too: waiting for its pieces reads the
loop's own sockets (BODY, CANCEL, CREDIT, HEARTBEAT), as waiting for download
credits does, and READ credits go back as the app reads.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from scale0.core.bodystream import BodyError, BodyInput, BodyReader
from scale0.core.routing import normalize_path, split_script_name
from scale0.wire import mongrel2 as m2
from scale0.wire import s0w1 as p
from scale0.worker.reply import Cancelled, FlowWindow, ReplyStream

if TYPE_CHECKING:
    from scale0.worker.loop import BrokerConn, Loop

log = logging.getLogger(__name__)

# A request handler runs on its loop's thread and writes to its ReplyStream;
# it returns whether the client connection must be closed.
Handler = Callable[[m2.HttpRequest | m2.UploadDone, str, str, ReplyStream], bool]

_READ_HEAD = (p.VERSION, p.CMD[p.Command.READ])


@dataclass(slots=True)
class Pending:
    """A REQUEST read, waiting for its loop to run it (in arrival order)."""

    conn: BrokerConn
    rid: bytes
    script_name: bytes
    raw: bytes
    window: bytes | None  # the broker's REQUEST window frame, if any (protocol.md 3.9)
    cancelled: bool = field(default=False)


def run_request(loop: Loop, r: Pending) -> None:
    """Run one request's handler on this thread; the lock is held on entry
    and on return, and released while the app runs."""
    now = time.monotonic()
    loop.worker.count_request()
    try:
        event = m2.parse_message(r.raw)
    except m2.Mongrel2ProtocolError as exc:
        log.warning("unparseable request from broker: %s", exc)
        event = None
    if r.cancelled or not isinstance(event, (m2.HttpRequest, m2.UploadDone)):
        loop.send(r.conn, [p.VERSION, p.CMD[p.Command.REPLY], r.rid, p.FLAG_LAST])
        return
    # The broker's window frame wins: Mongrel2 puts DOWNLOAD_CREDITS only on
    # a connection's first request, and its window is the connection's.
    credits = r.window if r.window is not None else event.headers.get(b"DOWNLOAD_CREDITS")
    window = p.count_of(credits) if type(credits) is bytes else None
    flow = FlowWindow(window) if window is not None else None
    stream = ReplyStream(loop, r.conn, r.rid, event, flow, now)
    if m2.streamed_body(event.headers):  # upload.stream: the body follows as BODY
        try:
            stream.body = _body_input(loop, stream, event)
        except BodyError as exc:
            log.warning("bad streamed body from broker: %s", exc)
            loop.send(r.conn, [p.VERSION, p.CMD[p.Command.REPLY], r.rid, p.FLAG_LAST])
            return
    close = True
    loop.current = stream
    loop.current_since = now
    loop.lock.release()
    try:
        path = normalize_path(event.path)
        try:
            script, path_info = split_script_name(path, r.script_name.decode("latin-1"))
        except ValueError:
            script, path_info = split_script_name(path, "")
        close = loop.worker.handler(event, script, path_info, stream)
    except Cancelled:
        close = False
    except Exception:
        log.exception("request handler failed")
    finally:
        loop.lock.acquire()
        loop.alive_s = time.monotonic()  # before `current` clears (worker._report)
        loop.current = None
        if not loop.closed:
            stream.end_locked(close)


def _body_input(loop: Loop, stream: ReplyStream, event: m2.Message) -> BodyInput:
    """The wsgi.input of a streamed body (core/bodystream.py). The app reads it
    on this thread: waiting for pieces reads our own socket, as waiting
    for download credits does (worker/reply.py)."""
    reader = BodyReader(event.body, m2.content_length(event.header(b"content-length")))

    def wait() -> None:
        with loop.lock:
            if not stream.cancelled and not loop.closed:
                loop.wait_io()  # reads BODY, CANCEL, ... and keeps heartbeats going
            if stream.cancelled or loop.closed:
                raise Cancelled
        stream.started_s = time.monotonic()  # reading the body is progress

    def grant(n: int) -> None:
        with loop.lock:
            if not stream.cancelled and not loop.closed:
                loop.send(stream.conn, [*_READ_HEAD, stream.rid, b"%d" % n])

    return BodyInput(reader, wait, grant)
