"""Signed-request nonces: the table that refuses a replay, and its mirror in memory.

A nonce is inserted by the transaction that records what its request did (a job, a release,
a refusal), so of two concurrent copies only one commits. Nonces older than twice the
freshness window can never be replayed (the timestamp check refuses them first), so they
need not be kept; each insert prunes them.
"""

from __future__ import annotations

import collections
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
    transactions that insert a nonce remain the guarantee."""

    def __init__(self) -> None:
        self._nonces: set[str] = set()
        self._order: collections.deque[tuple[float, str]] = collections.deque()

    def load(self, rows: list[tuple[str, float]]) -> None:
        for nonce, seen_at in rows:
            self._nonces.add(nonce)
            self._order.append((seen_at, nonce))

    def __contains__(self, nonce: str) -> bool:
        return nonce in self._nonces

    def add(self, nonce: str, now: float, max_age_s: float) -> None:
        # As in the table: nonces older than twice the freshness window are forgotten.
        while self._order and self._order[0][0] < now - 2 * max_age_s:
            self._nonces.discard(self._order.popleft()[1])
        self._nonces.add(nonce)
        self._order.append((now, nonce))
