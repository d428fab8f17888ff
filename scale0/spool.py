"""Removing the request bodies Mongrel2 spooled to disk, once nobody needs them.

Theory of operation
-------------------
With ``upload.temp_store``, Mongrel2 writes a body over
``limits.content_length`` (and every chunked body, de-chunked) to a file and
sends an upload-start and an upload-done message naming it; it deletes the
file itself only when the upload fails (the client leaves mid-body, or the
handler closes the connection before the body is in), never once it is
complete. A worker deletes the file after its response, but a crashed
worker, a refused request (400, 404, 413, 503), a worker with no
``--upload-dir``, a timeout or a client that leaves while the request waits
would leave it on disk for good: one client could fill the disk.

So the broker, the component that sees every request end, owns the cleanup:
`Dispatcher` (pure) appends the Mongrel2 path of each genuine spooled file
to ``to_unlink`` when its request is over, and the broker loop passes them
to `remove`, which deletes them inside the broker's ``--upload-dir``
(Mongrel2's temp_store folder as the broker sees it). Genuine means: named by
an upload-start that Mongrel2 sent (not one a client forged) and, for the
done message, by the same path. A path is only ever taken by its file name,
inside the upload folder, so a forged ``/etc/passwd`` can name nothing else.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable

log = logging.getLogger(__name__)


def spooled_file(upload_path: bytes, upload_dir: str) -> str | None:
    """The file in `upload_dir` that Mongrel2's `upload_path` names (by its
    file name: Mongrel2 gives it relative to its own chroot), or None."""
    name = os.fsdecode(os.path.basename(upload_path))
    if name in ("", ".", "..") or "\0" in name:
        return None
    return os.path.join(upload_dir, name)


def remove(upload_paths: Iterable[bytes], upload_dir: str | None) -> int:
    """Delete the spooled files; the number removed. Without an upload folder
    nothing can be removed (and nothing is looked at)."""
    if upload_dir is None:
        return 0
    removed = 0
    for upload_path in upload_paths:
        path = spooled_file(upload_path, upload_dir)
        if path is None:
            continue
        try:
            os.unlink(path)
            removed += 1
        except FileNotFoundError:
            pass  # the worker (or Mongrel2) removed it first
        except OSError as exc:
            log.warning("cannot remove spooled body %s: %s", path, exc.strerror)
    return removed
