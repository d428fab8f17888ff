"""glibc malloc thresholds for the processes a large body passes through.

A 1 MiB reply exists in each process on its path as a few 1 MiB buffers at
once (the app's body, the Mongrel2 reply built from it, libzmq's message,
the bytes read back). glibc's defaults give such memory back to the kernel
as soon as it is freed: a block of 128 KiB or more is mmap()ed and unmapped
on free; after the first such free glibc raises that threshold to the size
of the block, but it still trims the top of a heap once more than twice
that size is free there. A process that handles one large body after
another therefore faults every page of its buffers in again for each one:
measured with 1 MiB replies, about 480 minor faults per request in Mongrel2,
and at 16 connections 147 in the broker and 143-300 in each worker: more
CPU than the copies themselves (docs/performance.md).

The fix is the one glibc documents for this: fixed thresholds, high enough
that a body's buffers come from a heap and stay mapped for the next one.

- MMAP_THRESHOLD (32 MiB): blocks below it come from a heap. It is the most
  glibc accepts, and where glibc's own threshold stops rising; setting it
  stops that rise, so a lower value would mmap (and fault in) every body
  above it each time (docs/performance.md: two 8 MiB bodies per round).
- TRIM_THRESHOLD (32 MiB): a heap keeps up to this much free memory at its
  top before giving it back. This is what the setting costs: per malloc
  arena (the main thread's, and about one per busy thread), up to 32 MiB
  more resident memory at the heap's top, and only after that much was in
  use. Freed memory below live blocks stays resident with or without it.

Scale0's own processes set them at start (`tune_this_process`, through
mallopt); Mongrel2, which Scale0 starts but does not build, gets them
through its environment (`child_overrides`, the GLIBC_TUNABLES variable,
which its command line sets: deploy/m2server.py).

Invariant: an operator's own choice wins. Where the environment already sets
either threshold (GLIBC_TUNABLES `glibc.malloc.mmap_threshold` or
`glibc.malloc.trim_threshold`, or MALLOC_MMAP_THRESHOLD_ or
MALLOC_TRIM_THRESHOLD_), nothing is changed. Other C libraries (musl) have
no mallopt of this kind and are left alone.
"""

from __future__ import annotations

import ctypes
import os
from collections.abc import Mapping

MMAP_THRESHOLD = 32 << 20
TRIM_THRESHOLD = 32 << 20

# mallopt() parameter numbers, from glibc's <malloc.h>.
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3

TUNABLES = (f"glibc.malloc.mmap_threshold={MMAP_THRESHOLD}"
            f":glibc.malloc.trim_threshold={TRIM_THRESHOLD}")
_OPERATOR_KEYS = ("glibc.malloc.mmap_threshold", "glibc.malloc.trim_threshold")
_OPERATOR_VARIABLES = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")


def operator_chose(environ: Mapping[str, str]) -> bool:
    """Does `environ` already set either threshold?"""
    if any(name in environ for name in _OPERATOR_VARIABLES):
        return True
    tunables = environ.get("GLIBC_TUNABLES", "")
    names = {item.partition("=")[0].strip() for item in tunables.split(":")}
    return any(key in names for key in _OPERATOR_KEYS)


def child_overrides(environ: Mapping[str, str]) -> dict[str, str]:
    """The variables to add to `environ` for a child (Mongrel2) to use the
    thresholds: GLIBC_TUNABLES with ours appended; {} if the operator chose."""
    if operator_chose(environ):
        return {}
    theirs = environ.get("GLIBC_TUNABLES", "")
    return {"GLIBC_TUNABLES": f"{theirs}:{TUNABLES}" if theirs else TUNABLES}


def _glibc() -> bool:
    try:
        return (os.confstr("CS_GNU_LIBC_VERSION") or "").startswith("glibc")
    except (ValueError, OSError):  # no such name here: not glibc
        return False


def tune_this_process(environ: Mapping[str, str]) -> bool:
    """Set both thresholds in this process unless the operator chose; True if set.

    Call it before other threads start: the thresholds are globals every
    arena reads, but mallopt locks only the main arena while it sets them."""
    if operator_chose(environ) or not _glibc():
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt  # this process's own libc
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    mallopt.restype = ctypes.c_int
    # mallopt returns 1 on success; glibc refuses an mmap threshold over
    # 32 MiB (on 64-bit), so MMAP_THRESHOLD must not exceed it.
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)
                and mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))
