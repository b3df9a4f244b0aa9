"""The heap trimmer gives freed memory back to the kernel (real glibc, this process)."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from stimnetd import memtrim


def _fragment_heap() -> list[np.ndarray]:
    """Free ~400 MB of arrays that came from the heap, with small live objects between
    them: the pattern a map query leaves behind. Returns the live objects."""
    first = np.ones(2_000_000)
    del first  # freeing one 16 MB mmap raises glibc's mmap threshold past 16 MB
    keep, big = [], []
    for _ in range(25):
        big.append(np.ones(2_000_000))  # now from the heap
        keep.append(np.ones(1000))  # small live blocks between the big ones
    del big
    return keep


@pytest.mark.skipif(memtrim._libc_trim() is None, reason="not glibc: nothing to trim")
async def test_trim_loop_returns_freed_heap_memory_to_the_idle_floor() -> None:
    floor = memtrim.rss_bytes()
    task = asyncio.get_running_loop().create_task(memtrim.trim_loop(interval_s=0.05))
    try:
        await asyncio.sleep(0.1)  # the loop has read its floor
        keep = _fragment_heap()
        for _ in range(100):
            await asyncio.sleep(0.05)
            if memtrim.rss_bytes() - floor < memtrim.GROWTH_BYTES:
                break
        assert memtrim.rss_bytes() - floor < memtrim.GROWTH_BYTES, (
            f"RSS stayed {(memtrim.rss_bytes() - floor) / 2**20:.0f} MB above its floor")
        assert len(keep) == 25
    finally:
        task.cancel()


def test_rss_is_read() -> None:
    assert memtrim.rss_bytes() > 10 * 2**20
