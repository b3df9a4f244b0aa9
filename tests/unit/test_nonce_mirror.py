"""The in-memory nonce mirror: exact answers for what it holds, a fixed size whatever the
request rate, and the oldest forgotten first when full (the store's transaction still
refuses those replays)."""

from __future__ import annotations

import tracemalloc

from stimnetd.store.nonces import NonceMirror


def test_a_remembered_nonce_is_seen_and_another_is_not() -> None:
    m = NonceMirror(capacity=8)
    m.add("n-1")
    assert "n-1" in m and "n-2" not in m and len(m) == 1


def test_the_oldest_leave_first_when_the_ring_is_full() -> None:
    m = NonceMirror(capacity=4)
    for i in range(6):
        m.add(f"n-{i}")
    assert [f"n-{i}" in m for i in range(6)] == [False, False, True, True, True, True]
    assert len(m) == 4


def test_load_keeps_the_newest_rows_it_can_hold() -> None:
    m = NonceMirror(capacity=3)
    m.load([(f"n-{i}", float(i)) for i in range(5)])
    assert [f"n-{i}" in m for i in range(5)] == [False, False, True, True, True]


def test_an_empty_ring_holds_no_nonce_whose_digest_is_zero_slots() -> None:
    """Unused slots are zero; a lookup only scans the filled part, so nothing is seen."""
    m = NonceMirror(capacity=16)
    assert not any(f"n-{i}" in m for i in range(1000))


def test_memory_does_not_grow_with_the_number_of_nonces() -> None:
    m = NonceMirror(capacity=1024)
    for i in range(1024):
        m.add(f"warm-{i}")
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for i in range(20_000):
            m.add(f"{i:032x}")
        grown = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert grown < 4096, grown  # a set of the strings would hold ~4 MB here
    assert f"{19_999:032x}" in m and f"{0:032x}" not in m
