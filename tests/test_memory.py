"""Freed heap memory goes back to the system (companion/memory.py), on glibc."""

from __future__ import annotations

import ctypes
import ctypes.util
import platform

import psutil
import pytest

from companion.memory import release_free_memory


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="malloc_trim is glibc's")
def test_freed_heap_memory_below_a_live_block_is_given_back() -> None:
    """200 MB of small blocks freed under one block still in use: glibc keeps them (the heap
    cannot shrink past a live block) until malloc_trim gives their pages back."""
    libc = ctypes.CDLL(ctypes.util.find_library("c"))
    libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
    libc.free.argtypes = [ctypes.c_void_p]
    process = psutil.Process()
    blocks = []
    for _ in range(50_000):
        block = libc.malloc(4096)
        ctypes.memset(block, 1, 4096)  # touched: resident
        blocks.append(block)
    live = libc.malloc(4096)  # above them all
    for block in blocks:
        libc.free(block)
    held = process.memory_info().rss
    assert release_free_memory()
    given_back = held - process.memory_info().rss
    libc.free(live)
    assert given_back > 100 * 2**20, given_back


def test_it_never_raises() -> None:
    assert release_free_memory() in (True, False)
