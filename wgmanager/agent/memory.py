"""The agent process's malloc settings: fewer arenas, freed memory returned after big passes.

glibc gives each thread that allocates its own malloc arena (up to 8 per core); the agent
has a handful of threads (watch, link watch, health and metrics servers), and memory
freed in one arena is not reusable by the others, so a full pass's transient copies (a
device dump of thousands of peers, the mesh being rebuilt) stay resident several times
over. Two arenas are plenty for a process whose work runs under one interpreter lock.
After a full pass, ``malloc_trim`` hands the pages it freed back to the kernel.
Both are process-wide by nature; the agent command is the only caller.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging

log = logging.getLogger(__name__)

M_ARENA_MAX = -8  # mallopt parameter number in glibc's malloc.h
ARENAS = 2


def _libc() -> ctypes.CDLL | None:
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None


def limit_arenas(arenas: int = ARENAS) -> bool:
    """Caps glibc's malloc arenas for threads started from now on; False if not glibc."""
    libc = _libc()
    mallopt = getattr(libc, "mallopt", None)
    if mallopt is None:
        return False
    return bool(mallopt(M_ARENA_MAX, arenas))


def trim() -> None:
    """Returns freed heap pages to the kernel (no-op where malloc_trim does not exist)."""
    libc = _libc()
    fn = getattr(libc, "malloc_trim", None)
    if fn is not None:
        fn(0)
