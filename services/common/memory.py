"""Returning memory to the system after bursts. glibc's malloc keeps freed memory in per-thread arenas (up to
8 per core) and rarely gives it back: a service that served an overload with dozens of RPC threads stayed
at the burst's size. Fewer arenas and a periodic malloc_trim bring its RSS back to the baseline."""
from __future__ import annotations

import ctypes
import ctypes.util
import logging
import threading

log = logging.getLogger("hmi.memory")
M_ARENA_MAX = -8          # mallopt parameter (glibc malloc.h)


def _libc():
    name = ctypes.util.find_library("c")
    if not name:
        return None
    try:
        libc = ctypes.CDLL(name)
        return libc if hasattr(libc, "malloc_trim") and hasattr(libc, "mallopt") else None
    except OSError:
        return None


_LIBC = _libc()


def limit_arenas(arenas: int = 2) -> None:
    """Caps glibc's malloc arenas for threads created from now on (a no-op elsewhere)."""
    if _LIBC is not None:
        _LIBC.mallopt(M_ARENA_MAX, arenas)


def trim() -> None:
    """Gives free heap memory back to the system."""
    if _LIBC is not None:
        _LIBC.malloc_trim(0)


def start_trimming(interval: float = 30.0) -> threading.Event:
    """Trims every `interval` seconds in a daemon thread; set the returned event to stop."""
    stop = threading.Event()

    def loop() -> None:
        while not stop.wait(interval):
            trim()

    threading.Thread(target=loop, name="malloc-trim", daemon=True).start()
    return stop
