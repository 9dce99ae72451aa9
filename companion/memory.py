"""Give freed heap memory back to the system, so a daemon that runs for months keeps a flat RSS.

piper needs working memory per character it speaks, Whisper and llama.cpp buffers per request;
glibc keeps what they free in its arenas (one per thread that allocated) and the RSS stays at
the high-water mark of the busiest moment. ``malloc_trim(0)`` returns the free pages of every
arena. Elsewhere (musl, macOS) it does not exist and this does nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
from collections.abc import Callable
from functools import cache


@cache
def _malloc_trim() -> Callable[[int], int] | None:
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        trim = ctypes.CDLL(name).malloc_trim
    except (OSError, AttributeError):
        return None
    trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    return trim


def release_free_memory() -> bool:
    """True when the C library gave memory back (blocking for a few ms: call it in a thread)."""
    trim = _malloc_trim()
    return bool(trim(0)) if trim is not None else False
