"""Opening a body Mongrel2 spooled to disk, for the WSGI and ASGI workers.

With ``upload.temp_store`` Mongrel2 writes a large body to a file and sends
an upload-done message naming it (docs/protocol.md 4.5). That name comes in
a header a client can forge (``x-mongrel2-upload-done``), so `open_upload`
takes only its file name, inside the worker's ``--upload-dir`` (Mongrel2's
temp_store folder as this host sees it), and refuses anything that would
leave that folder or is not a regular file. A refusal is `BadRequest`: the
worker answers 400 and closes the connection; nothing else is touched.

The broker removes a spooled file once its request is over whatever
happened (core/spool.py); the worker that read it deletes it after the
response too, so it does not wait for that.
"""

from __future__ import annotations

import os
import stat
from typing import BinaryIO

from scale0.errors import ProtocolError


class BadRequest(ProtocolError):
    """The request cannot be given to the app; answer `status` (its
    `status_hint`) and close."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message, status_hint=status)
        self.status = status
        self.message = message


def open_upload(upload_path: bytes, upload_dir: str | None) -> BinaryIO:
    """Open the temp_store file named by a client-forgeable path, only inside
    `upload_dir`, for reading; raises BadRequest (400) otherwise. The caller
    closes (and may delete) it."""
    if upload_dir is None:
        raise BadRequest(400, "uploads are not accepted here")
    name = os.fsdecode(os.path.basename(upload_path))
    if name in ("", ".", "..") or "\0" in name:
        raise BadRequest(400, "invalid upload path")
    real_dir = os.path.realpath(upload_dir)
    candidate = os.path.join(real_dir, name)
    if os.path.dirname(os.path.realpath(candidate)) != real_dir:  # symlink escape
        raise BadRequest(400, "upload path outside the upload folder")

    def opener(path: str, flags: int) -> int:
        # O_NOFOLLOW: no symlink swapped in after the check; O_NONBLOCK: a FIFO can't hang us.
        return os.open(path, flags | os.O_NOFOLLOW | os.O_NONBLOCK)

    try:
        file = open(candidate, "rb", opener=opener)  # noqa: SIM115 - the caller closes it
    except OSError as exc:
        raise BadRequest(400, f"upload file unreadable: {exc.strerror}") from exc
    if not stat.S_ISREG(os.fstat(file.fileno()).st_mode):
        file.close()
        raise BadRequest(400, "upload path is not a regular file")
    os.set_blocking(file.fileno(), True)
    return file
