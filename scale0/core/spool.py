"""A spooled request body put into its request message (pure).

Mongrel2 spools a body over ``limits.content_length`` (and every chunked
body) to a file; bodies up to the broker's ``inline_body_max`` are read by
the broker loop (net/spool_files.py) and handed back to the dispatcher,
which puts them into the request with `inline_message`, so that a worker
needs no shared disk for them. Reading and removing the files is I/O and
lives in net/spool_files.py, beside its caller.
"""

from __future__ import annotations

import tnetstring

from scale0.wire import mongrel2 as m2

_UPLOAD_HEADERS = (b"x-mongrel2-upload-start", b"x-mongrel2-upload-done",
                   b"transfer-encoding", b"content-length")


def inline_message(req: m2.UploadDone, body: bytes) -> bytes:
    """`req` as an ordinary request message with `body` in it: what Mongrel2
    sends for a small body (tnetstring headers, Content-Length set; chunked
    framing is gone, as the spooled file holds the de-chunked body)."""
    headers = {k: v for k, v in req.headers.items() if k not in _UPLOAD_HEADERS}
    headers[b"content-length"] = b"%d" % len(body)
    encoded: bytes = tnetstring.dumps(headers)
    return b"%s %d %s %s%d:%s," % (req.sender, req.conn_id, req.path, encoded, len(body), body)
