"""Request bodies and reply credits from Mongrel2.

* Spooled uploads (``upload.temp_store``, net/spool_files.py): an upload-start is
  remembered by its connection, so that only the done message naming the
  same file counts as genuine; an upload refused at its start has its file
  removed, and its done message, if one still comes, is dropped.
* Streamed bodies (``upload.stream``, core/bodystream.py, protocol.md 4.5):
  each piece goes to the worker holding the request as BODY, within the
  credits that worker grants with READ.
* Reply credits (``download.flow_control``, protocol.md 3.9): relayed to
  the worker of the connection's active request as CREDIT.
"""

from __future__ import annotations

from scale0.core.lifecycle import pack_id
from scale0.core.records import Worker
from scale0.core.registry import Registry
from scale0.wire import mongrel2 as m2
from scale0.wire import mongrel2_reply as m2r
from scale0.wire import s0w1 as p

_CREDIT = p.CMD[p.Command.CREDIT]
MAX_UPLOADS_KEPT = 10_000  # upload-starts (and refusals) remembered, at most


class Bodies(Registry):
    def _on_credits(self, link: int, conn_id: int, credits: int) -> None:
        key = (link, conn_id)
        self._credited(key, credits)
        on_conn = self.connections.get(key)
        if on_conn:
            r = on_conn[0]
            if r.worker is not None:
                self.to_workers.append([
                    r.worker.ident, p.VERSION, _CREDIT, pack_id(r.rid), b"%d" % credits,
                ])

    def _on_chunk(self, link: int, event: m2.UploadChunk, now: float) -> None:
        """The next piece of the active request's streamed body: to its worker
        as BODY, within the credits that worker granted (core/bodystream.py)."""
        on_conn = self.connections.get((link, event.conn_id))
        r = on_conn[0] if on_conn else None
        if r is None or not r.streamed or r.body_done:
            self.counters.body_dropped += 1  # its request was answered (e.g. 413) or is gone
            return
        r.body_in += len(event.body)
        r.body_done = event.done
        if r.body_in > self.settings.max_body_bytes:  # chunked: no length said so at the start
            self.counters.too_large += 1
            self._fail(r, 413, "", close=True)
            return
        w = r.worker
        if w is None or r.cancelled:
            self.counters.body_dropped += 1
            return
        self.counters.body_pieces += 1
        self.to_workers.append([w.ident, p.VERSION, p.CMD[p.Command.BODY],
                                p.encode_request_id(r.rid),
                                p.BODY_END if event.done else p.BODY_MORE, event.body])
        # An upload making progress is alive, like a streaming reply.
        r.deadline = now + r.service.timeout_s
        r.service.active.move_to_end(r.rid)

    def _on_read(self, w: Worker, frames: list[bytes]) -> None:
        """READ n: the worker lets n more body bytes come; Mongrel2 gets them as
        upload credits for the request's connection."""
        if len(frames) != 4 or not frames[3].isdigit() or len(frames[3]) > 10:
            raise p.WireError("READ takes request id, decimal byte count")
        r = w.in_flight.get(p.decode_request_id(frames[2]))
        if r is None or r.cancelled or not r.streamed or r.body_done:
            return  # ended meanwhile: the body is not wanted any more
        self.to_mongrel2.append(
            (r.link, m2r.upload_credits_reply(r.sender, r.conn_id, int(frames[3]))))

    def _on_upload_start(self, link: int, event: m2.UploadStart) -> None:
        key = (link, event.conn_id)
        self.uploads[key] = event.upload_path
        self.uploads.move_to_end(key)
        while len(self.uploads) > MAX_UPLOADS_KEPT:  # bounded even if no upload-done ever comes
            self.to_unlink.append(self.uploads.popitem(last=False)[1])

    def _refuse_upload(self, key: tuple[int, int], upload_path: bytes) -> None:
        """A genuine upload refused at its start: its file goes, and so does its
        done message, if Mongrel2 still sends one (the body was in first)."""
        self.to_unlink.append(upload_path)
        self.refused_uploads[key] = upload_path
        self.refused_uploads.move_to_end(key)
        while len(self.refused_uploads) > MAX_UPLOADS_KEPT:
            self.refused_uploads.popitem(last=False)

    def _refused_done(self, link: int, req: m2.UploadDone) -> bool:
        """The done message of an upload refused at its start: already answered."""
        key = (link, req.conn_id)
        if self.refused_uploads.get(key) != req.upload_path:
            return False
        del self.refused_uploads[key]
        self.to_unlink.append(req.upload_path)
        return True
