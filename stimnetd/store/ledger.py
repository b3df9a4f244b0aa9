"""The privacy ledger: epsilon charged per (researcher, catalog), and what a release rule
reads of the ledger inside the release's transaction."""

from __future__ import annotations

import sqlite3

import aiosqlite

from stimnetd.store import cohorts, linear
from stimnetd.store.records import Disclosed, Release

# A charge counts from the moment its release commits, while its partial is still on its
# way to the entry ("pending"), so concurrent requests cannot spend it twice; it stops
# counting only once refunded, which a site does only for a partial none of whose bytes
# left it (store/releases.refund).
COUNTED = "refunded_at IS NULL"
SPENT = ("SELECT COALESCE(SUM(epsilon), 0) FROM ledger WHERE researcher = ? "
         f"AND catalog = ? AND {COUNTED}")
SPENT_DELTA = ("SELECT COALESCE(SUM(delta), 0) FROM ledger WHERE researcher = ? "
               f"AND catalog = ? AND {COUNTED}")


class TransactionLedger:
    """A `records.LedgerView` of one release's researcher and catalog, read in the
    release's transaction. Cohorts are found near by size and sketch (store/cohorts.py);
    `sketches` keeps the new cohorts' own sketches, made while looking, for recording them."""

    def __init__(self, conn: sqlite3.Connection, release: Release) -> None:
        self._conn = conn
        self._release = release
        self.sketches: dict[str, bytes] = {}
        self._sized: dict[int, cohorts.SizedCohorts] = {}

    def spent(self) -> float:
        (spent,) = self._conn.execute(SPENT, (self._release.researcher,
                                              self._release.catalog)).fetchone()
        return float(spent)

    def catalog_spent(self) -> float:
        (spent,) = self._conn.execute("SELECT COALESCE(SUM(epsilon), 0) FROM ledger WHERE "
                                      f"catalog = ? AND {COUNTED}", (self._release.catalog,)).fetchone()
        return float(spent)

    def spent_delta(self) -> float:
        (spent,) = self._conn.execute(SPENT_DELTA, (self._release.researcher,
                                                    self._release.catalog)).fetchone()
        return float(spent)

    def linear_history(self, quantity: str) -> list[tuple[frozenset[str], str, str]]:
        return linear.history(self._conn, self._release, quantity)

    def linear_known(self, quantity: str, digests: list[str]) -> bool:
        return linear.known(self._conn, self._release, quantity, digests)

    def near_cohorts(self, members: frozenset[str], digest: str,
                     window: int) -> list[frozenset[str]]:
        # Read once per window for every cohort the release discloses: a grouped query's
        # cells are often of similar size.
        if window not in self._sized:
            sizes = [len(m) for m, _ in self._release.disclosed()]
            self._sized[window] = cohorts.sized_cohorts(self._conn, self._release, sizes, window)
        return cohorts.near_cohorts(self._conn, self._release, members, digest, window,
                                    self.sketches, self._sized[window])

    def near_families(self, atoms: Disclosed, window: int) -> list[list[frozenset[str]]]:
        return cohorts.near_family_cells(self._conn, self._release, atoms, window, self.sketches)


async def spent(db: aiosqlite.Connection, researcher: str, catalog: str) -> float:
    rows = await db.execute_fetchall(SPENT, (researcher, catalog))
    return float(list(rows)[0][0])


async def spent_delta(db: aiosqlite.Connection, researcher: str, catalog: str) -> float:
    rows = await db.execute_fetchall(SPENT_DELTA, (researcher, catalog))
    return float(list(rows)[0][0])


async def spent_by_catalog(db: aiosqlite.Connection) -> dict[str, float]:
    rows = await db.execute_fetchall(f"SELECT catalog, SUM(epsilon) FROM ledger WHERE {COUNTED} "
                                     "GROUP BY catalog")
    return {c: float(e) for c, e in rows}
