"""A request's way through the broker: routed, sent, failed, forgotten.

protocol.md section 4.3. A request is routed to the least recently used
ready worker of its service, or queued (deadline: queue_timeout_s); sent, it
has the request deadline of its service; answered (its LAST, or any broker
error), it leaves its connection, and the next pipelined request there is
routed. `_fail` answers at most once: a request it has answered is
`cancelled`, and a worker still holding one keeps it until its LAST.
"""

from __future__ import annotations

import logging
import struct
from collections import deque

from scale0.core import spool
from scale0.core.dispatch_state import DispatchState
from scale0.core.records import REFUSED_TEXT, SAFE_TO_RETRY, Request, Service, Worker, head
from scale0.wire import mongrel2 as m2
from scale0.wire import mongrel2_reply as m2r
from scale0.wire import s0w1 as p

log = logging.getLogger(__name__)

# Built once for the hot path.
_REQUEST = p.CMD[p.Command.REQUEST]
pack_id = struct.Struct(">Q").pack


def may_wait(r: Request) -> bool:
    """Whether `r` may wait at a busy worker (prefetch, protocol.md 4.6):
    only a request that could be retried elsewhere if that worker died
    before running it."""
    return r.method in SAFE_TO_RETRY and not r.streamed


class Lifecycle(DispatchState):
    def _route(self, r: Request, now: float) -> None:
        """Send `r` to its service's LRU ready worker, or queue it."""
        service = r.service
        if r.refused:
            self._fail(r, r.refused, REFUSED_TEXT.get(r.refused, ""))
        elif service.ready:
            self._send(r, service.ready.popitem(last=False)[1], now)
        elif service.room and not service.queue and may_wait(r) and (
                w := self._prefetch_target(service, now)) is not None:
            self.counters.prefetched += 1
            self._send(r, w, now)  # it waits there, in order (protocol.md 4.6)
        elif not service.workers:
            self.counters.no_worker += 1
            self._fail(r, 503, "no worker serves this service",
                       page=self._maintenance.get(service.name))
        elif len(service.queue) >= self.settings.queue_size:
            self.counters.queue_full += 1
            self._fail(r, 503, "queue full")
        else:
            r.deadline = now + self.settings.queue_timeout_s
            service.queue[r.rid] = r
            if log.isEnabledFor(logging.DEBUG):  # the args cost even when not logged
                log.debug("request %d queued for %s (%d waiting)", r.rid, service.name,
                          len(service.queue))

    def _send(self, r: Request, w: Worker, now: float) -> None:
        """Hand `r` to `w` (just popped from ready queues or known to be free)."""
        if r.streamed and not w.streams_bodies:
            self._fail(r, 501, "this worker cannot take a streamed request body")
            self._update_ready(w)
            return
        if r.upload and not r.inline and not w.reads_uploads and self.read_spooled:
            self._inline(r)  # no shared disk there: the body goes inside (core/spool.py)
        r.worker = w
        r.worker_label = w.label
        r.attempts += 1
        if not w.in_flight:
            w.progress_at = now  # idle until now: its stall clock starts here
        w.in_flight[r.rid] = r
        r.deadline = now + r.service.timeout_s
        r.service.active[r.rid] = r
        frames = [w.ident, p.VERSION, _REQUEST, pack_id(r.rid), r.service.name_bytes,
                  r.script_name, r.raw]
        window = self.link_credits.get(r.link)
        if window is not None:  # what is left of the connection's window
            frames.append(b"%d" % max(0, window - self.unacked.get((r.link, r.conn_id), 0)))
        self.to_workers.append(frames)
        self._update_ready(w)

    def _inline(self, r: Request) -> None:
        """Put `r`'s spooled body into its message, when it fits inline_body_max
        and the budget; else it stays a file (a worker without it answers 400)."""
        s = self.settings
        room = min(s.inline_body_max, s.inline_budget_bytes - self.inline_bytes)
        if room <= 0 or self.read_spooled is None:
            return
        body = self.read_spooled(r.upload, room)
        event = m2.parse_message(r.raw) if body is not None else None
        if body is None or not isinstance(event, m2.UploadDone):
            return
        r.raw = spool.inline_message(event, body)
        r.inline = len(body)
        self.inline_bytes += r.inline
        self.to_unlink.append(r.upload)  # in memory now: the file can go

    def _finish(self, r: Request, w: Worker, now: float) -> None:
        """`r` is over at `w`: free the slot, start the next on its connection."""
        w.in_flight.pop(r.rid, None)
        r.worker = None
        w.progress_at = now
        if not r.cancelled:  # a reply in time: the streak of timeouts is over
            w.timeouts_in_row = w.ejections = 0
        self._forget(r, cancel=False)
        self._update_ready(w)
        self._pull_queued(w, now)

    def _pull_queued(self, w: Worker, now: float) -> None:
        """Give a free worker the oldest queued requests of its services: into
        its free slots, then into its prefetch room while the oldest may
        wait there (protocol.md 4.6) and it is not stalled. Oldest first:
        a request that may not wait blocks the ones behind it, so nothing
        overtakes it for good."""
        while w.ident in self.workers and not w.draining and not w.ejected_until:
            n = len(w.in_flight)
            free = n < w.capacity
            if not free and (n >= w.capacity + w.prefetch or self._stalled(w, now)):
                return
            oldest: Service | None = None
            for service in w.services:
                if service.queue and (oldest is None or head(service.queue).received_at
                                      < head(oldest.queue).received_at):
                    oldest = service
            if oldest is None or not (free or may_wait(head(oldest.queue))):
                return
            r = oldest.queue.popitem(last=False)[1]
            for service in w.services:
                service.ready.pop(w.ident, None)
            if not free:
                self.counters.prefetched += 1
            self._send(r, w, now)

    def _fail(self, r: Request, status: int, text: str, *, close: bool = False,
              page: bytes | None = None) -> None:
        """Answer `r` with an error (or just close if its reply had started)."""
        if r.worker is not None:
            self._cancel_at_worker(r)
        close = close or (r.streamed and not r.body_done)  # Mongrel2 waits for upload credits
        if not r.cancelled:
            self._record(r, r.status if r.reply_started else status)
            if r.reply_started:
                self.to_mongrel2.append((r.link, m2r.close_reply(r.sender, r.conn_id)))
            else:
                self._reply_error(r.link, r.sender, r.conn_id, status, text,
                                  close=close or r.close_after, page=page)
        r.cancelled = True
        # Answered: the connection moves on now, even if a worker still holds
        # `r` (after a 504 it may never answer), or a pipelined request would
        # wait behind it with no deadline of its own.
        self._forget(r, cancel=False)

    def _forget(self, r: Request, *, cancel: bool) -> None:
        """Drop `r` from every index and start the next request on its connection.

        A request that a worker still holds stays in `requests` (cancelled)
        until that worker's last reply, or its removal, frees the slot.
        """
        if cancel:
            self._cancel_at_worker(r)
            r.cancelled = True
        r.service.queue.pop(r.rid, None)
        r.service.active.pop(r.rid, None)
        if r.worker is None and self.requests.pop(r.rid, None) is not None and r.upload:
            self.to_unlink.append(r.upload)  # over: nobody reads its body any more
            self.inline_bytes -= r.inline
        key = (r.link, r.conn_id)
        on_conn = self.connections.get(key)
        if not on_conn:
            return
        if on_conn[0] is r:
            on_conn.popleft()
            if not on_conn:
                del self.connections[key]
            elif key not in self._starting:  # else the loop up the stack routes it
                self._start_next(key, on_conn)
        elif r in on_conn:
            on_conn.remove(r)

    def _start_next(self, key: tuple[int, int], on_conn: deque[Request]) -> None:
        """Route the new head of a connection, and the next while heads fail at once.

        A loop, not recursion: a head that fails at once (no worker, queue full)
        is forgotten inside `_route`, and that `_forget` leaves the next head to
        this loop, so a long pipeline cannot overflow the stack.
        """
        self._starting.add(key)
        try:
            while on_conn:
                head = on_conn[0]
                self._route(head, self._now)
                if on_conn and on_conn[0] is head:
                    break  # queued or sent: it has a deadline now
        finally:
            self._starting.discard(key)
