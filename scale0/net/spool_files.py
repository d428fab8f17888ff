"""The request bodies Mongrel2 spooled to disk: read, and removed once nobody needs them.

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
to ``to_unlink`` when its request is over, and the broker loop (net/broker.py)
passes them to `remove`, which deletes them inside the broker's ``--upload-dir``
(Mongrel2's temp_store folder as the broker sees it). Genuine means: named by
an upload-start that Mongrel2 sent (not one a client forged) and, for the
done message, by the same path. A path is only ever taken by its file name,
inside the upload folder, so a forged ``/etc/passwd`` can name nothing else.

Bodies up to the broker's ``inline_body_max`` are also read here (`read`,
given to the dispatcher as its ``read_spooled`` by the command line) and put
into the request message itself (core/spool.py), so a worker
needs no shared disk for them; the file is then removed at once. Larger
bodies stay files, which only a worker given ``--upload-dir`` can read.
The dispatcher holds at most ``inline_budget_bytes`` of such bodies at once
(a request keeps its message until it ends, for a retry), so many parallel
uploads cannot grow the broker without bound: past it, bodies stay files.
"""

from __future__ import annotations

import logging
import os
import stat
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


def read(upload_path: bytes, upload_dir: str, max_bytes: int) -> bytes | None:
    """The spooled body, if it is a regular file of at most `max_bytes`; else
    None (too large, gone, or not a plain file: the caller forwards the file)."""
    path = spooled_file(upload_path, upload_dir)
    if path is None:
        return None
    try:
        # O_NOFOLLOW: not through a symlink; O_NONBLOCK: a FIFO cannot hang us.
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError:
        return None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode) or info.st_size > max_bytes:
            return None
        with os.fdopen(os.dup(fd), "rb") as file:
            body = file.read(max_bytes + 1)
        return body if len(body) <= max_bytes else None
    except OSError:
        return None
    finally:
        os.close(fd)
