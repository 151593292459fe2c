"""How the server's C heap gives memory back: glibc settings made at start, and a trim when sessions end.

Tensors and request buffers of a few hundred KiB to a few MiB come and go with every request. Left at
its defaults, glibc serves them from per-thread arenas under a mmap threshold that grows to 32 MiB after
the first large free, and keeps freed pages for reuse: the RSS of a server that holds nothing then stays
far above its start (bench/abuse.py measures it). A fixed mmap threshold hands every large buffer back
to the OS when it is freed, and few arenas leave less memory stranded between them.
"""

from __future__ import annotations

import ctypes
import logging

log = logging.getLogger(__name__)

# mallopt parameter numbers from glibc's malloc.h.
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD, _M_ARENA_MAX = -1, -3, -8
MMAP_THRESHOLD = 256 * 1024  # buffers from this size up are mapped and unmapped on their own
ARENA_MAX = 2


def _libc():
    try:
        libc = ctypes.CDLL(None)
        return libc if hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else None
    except OSError:
        return None


_LIBC = _libc()


def configure() -> bool:
    """Sets the server's allocator to give memory back (glibc only; elsewhere a no-op). Call before threads start."""
    if _LIBC is None:
        return False
    ok = all(
        _LIBC.mallopt(p, v) == 1
        for p, v in (
            (_M_MMAP_THRESHOLD, MMAP_THRESHOLD),
            (_M_TRIM_THRESHOLD, 2 * MMAP_THRESHOLD),
            (_M_ARENA_MAX, ARENA_MAX),
        )
    )
    if not ok:
        log.debug("mallopt refused a setting; the allocator keeps its defaults")
    return ok


def return_freed_memory() -> None:
    """Hands heap pages freed by closed sessions back to the OS (glibc keeps them for reuse otherwise)."""
    if _LIBC is not None:
        _LIBC.malloc_trim(0)
