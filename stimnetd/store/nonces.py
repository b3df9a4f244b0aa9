"""Signed-request nonces: the table that refuses a replay, and its mirror in memory.

A nonce is inserted by the transaction that records what its request did (a job, a release,
a refusal), so of two concurrent copies only one commits. Nonces older than twice the
freshness window can never be replayed (the timestamp check refuses them first), so they
need not be kept; each insert prunes them.
"""

from __future__ import annotations

import hashlib
import sqlite3

from stimnetd.store.records import NonceClaim
from stimnetd.store.transaction import Transaction


def insert(tx: Transaction, claim: NonceClaim, now: float) -> bool:
    """Remember `claim` in `tx` (and append its accepted entry); False if it is a replay."""
    tx.conn.execute("DELETE FROM nonces WHERE seen_at < ?", (now - 2 * claim.max_age_s,))
    try:
        tx.conn.execute("INSERT INTO nonces (nonce, signer, seen_at) VALUES (?, ?, ?)",
                        (claim.nonce, claim.signer, now))
    except sqlite3.IntegrityError:
        return False
    if claim.accepted is not None:
        tx.append(*claim.accepted)
    return True


def load(conn: sqlite3.Connection) -> list[tuple[str, float]]:
    """Every remembered nonce with when it was seen, oldest first."""
    return [(n, float(at)) for n, at in
            conn.execute("SELECT nonce, seen_at FROM nonces ORDER BY seen_at")]


class NonceMirror:
    """The nonces the store holds, in memory (loaded at open, added after each commit), so
    that a replay is answered without a database round trip. Only a fast early answer: the
    transactions that insert a nonce remain the guarantee.

    A fixed ring of `capacity` 128-bit digests, allocated and touched once, so a node's
    memory does not grow with its request rate over the replay window (a set of the
    nonce strings took ~200 bytes per request for twice `request_max_age_s`). When more
    nonces than that arrive within the window the oldest leave the ring early; a replay
    of one of them is then refused by its inserting transaction, after the work, instead
    of at once. A digest older than the window can stay: its request is refused by its
    timestamp before the nonce is looked at. A false hit needs a 128-bit collision."""

    CAPACITY = 1 << 16

    def __init__(self, capacity: int = CAPACITY) -> None:
        import numpy as np

        self._np = np
        # np.full writes every page now: the ring's resident size is its size from the start.
        self._lo = np.full(capacity, 0, dtype=np.uint64)
        self._hi = np.full(capacity, 0, dtype=np.uint64)
        self._next = 0
        self._filled = 0

    @staticmethod
    def _digest(nonce: str) -> tuple[int, int]:
        d = hashlib.blake2b(nonce.encode(), digest_size=16, person=b"stimnet-nonce").digest()
        return int.from_bytes(d[:8], "little"), int.from_bytes(d[8:], "little")

    def load(self, rows: list[tuple[str, float]]) -> None:
        for nonce, _seen_at in rows[-len(self._lo):]:
            self.add(nonce)

    def __contains__(self, nonce: str) -> bool:
        lo, hi = self._digest(nonce)
        hits = self._np.flatnonzero(self._lo[:self._filled] == self._np.uint64(lo))
        return bool(len(hits)) and bool((self._hi[hits] == self._np.uint64(hi)).any())

    def __len__(self) -> int:
        return self._filled

    def add(self, nonce: str) -> None:
        lo, hi = self._digest(nonce)
        self._lo[self._next], self._hi[self._next] = lo, hi
        self._next = (self._next + 1) % len(self._lo)
        self._filled = min(self._filled + 1, len(self._lo))
