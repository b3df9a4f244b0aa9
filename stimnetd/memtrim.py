"""Give freed heap memory back to the system after large queries.

A map query allocates and frees hundreds of megabytes of numpy arrays. glibc raises its
mmap threshold each time a large mmapped block is freed (up to 32 MiB), so later arrays
come from the heap, and a heap with a few live objects near its top is never shrunk: a
node stayed at 3-5x its idle RSS after one grouped map query (bench/memory.py).
`malloc_trim(0)` returns every free page, anywhere in the heap, to the kernel. It is
called from a thread (it holds malloc's lock for milliseconds) on a fixed interval,
and only while RSS is above the lowest level a trim has reached (the node's idle floor)
by GROWTH_BYTES, so an idle node pays nothing.
A fixed mmap threshold (mallopt) would also work, but makes every large array an
mmap + page-zeroing and slowed the same query by about a third.
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import os
from collections.abc import Callable

INTERVAL_S = 5.0
GROWTH_BYTES = 32 * 2**20  # RSS above the idle floor that makes a trim worth it


def _libc_trim() -> Callable[[], object] | None:
    """glibc's malloc_trim, or None (musl, macOS: nothing to call; their allocators
    return memory on their own terms)."""
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        fn = ctypes.CDLL(name).malloc_trim
    except (OSError, AttributeError):
        return None
    fn.argtypes, fn.restype = [ctypes.c_size_t], ctypes.c_int
    return lambda: fn(0)


def rss_bytes(pid: int | str = "self") -> int:
    """A process's resident set size, this one by default (Linux /proc; 0 elsewhere)."""
    try:
        with open(f"/proc/{pid}/statm", "rb") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


async def trim_now() -> None:
    """Trim once, now (off the loop): after a share whose arrays were large has been
    released, before the entry decodes and combines the sites' shares. The share was
    computed in a worker thread, so its freed arrays sit in that thread's malloc arena,
    where the loop thread's allocations cannot reuse them."""
    trim = _libc_trim()
    if trim is not None:
        await asyncio.to_thread(trim)


async def trim_loop(interval_s: float = INTERVAL_S) -> None:
    """Forever: every `interval_s`, trim the heap while RSS is GROWTH_BYTES above the
    floor. The floor is the lowest RSS seen after a trim, not the last one: a trim made
    while a query still holds its arrays must not raise the bar for the trim after it."""
    trim = _libc_trim()
    if trim is None:
        return
    floor = rss_bytes()
    while True:
        await asyncio.sleep(interval_s)
        if rss_bytes() - floor >= GROWTH_BYTES:
            await asyncio.to_thread(trim)
            floor = min(floor, rss_bytes())
