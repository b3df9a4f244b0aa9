"""The history exact auditing reads: which cohorts of which quantity a researcher was given.

Table `linear_cohorts` keys (researcher, catalog, quantity, cohort digest) to the job that
first released it; members live in `cohorts` (one row per distinct cohort). A digest is a
hash of the members, so parsed members are cached by it for the life of the process.
"""

from __future__ import annotations

import collections
import json
import sqlite3

from stimnetd.store.records import Release


class _ParsedCohorts:
    """Parsed member sets by digest, least recently used first out, bounded by the members
    they hold: a bound by count let 4096 cohorts of a million subjects each stay resident."""

    MAX_MEMBERS = 4_000_000

    def __init__(self) -> None:
        self._sets: collections.OrderedDict[str, frozenset[str]] = collections.OrderedDict()
        self._members = 0

    def get(self, digest: str) -> frozenset[str] | None:
        hit = self._sets.get(digest)
        if hit is not None:
            self._sets.move_to_end(digest)
        return hit

    def put(self, digest: str, members: frozenset[str]) -> frozenset[str]:
        if len(members) <= self.MAX_MEMBERS and digest not in self._sets:
            self._sets[digest] = members
            self._members += len(members)
            while self._members > self.MAX_MEMBERS:
                self._members -= len(self._sets.popitem(last=False)[1])
        return members


_PARSED = _ParsedCohorts()


def history(conn: sqlite3.Connection, release: Release,
            quantity: str) -> list[tuple[frozenset[str], str, str]]:
    """(members, digest, job) of every cohort of `quantity` released to the release's
    researcher (or its catalog's shared history) on its catalog, oldest first. A cohort's
    members are read (and parsed) only when they are not cached."""
    rows = conn.execute(
        # `l.rowid`: the form store/pg_sync.py translates to PostgreSQL's insertion order.
        "SELECT l.digest, l.job_id FROM linear_cohorts l WHERE l.researcher = ? AND"
        " l.catalog = ? AND l.quantity = ? ORDER BY l.rowid",
        (release.auditor, release.catalog, quantity)).fetchall()
    out = []
    for digest, job in rows:
        members = _PARSED.get(digest)
        if members is None:
            row = conn.execute(
                "SELECT members_json FROM cohorts WHERE researcher = ? AND catalog = ? AND"
                " digest = ?", (release.auditor, release.catalog, digest)).fetchone()
            if row is None:
                continue  # as the join this replaces: a history row without its cohort
            members = _PARSED.put(digest, frozenset(json.loads(row[0])))
        out.append((members, digest, job))
    return out


def known(conn: sqlite3.Connection, release: Release, quantity: str, digests: list[str]) -> bool:
    """Whether every one of `digests` was released before as `quantity` (nothing new)."""
    marks = ",".join("?" * len(digests))
    (n,) = conn.execute(
        f"SELECT COUNT(*) FROM linear_cohorts WHERE researcher = ? AND catalog = ? AND"
        f" quantity = ? AND digest IN ({marks})",
        (release.auditor, release.catalog, quantity, *digests)).fetchone()
    return int(n) == len(set(digests))


def record(conn: sqlite3.Connection, release: Release) -> None:
    """Add the release's linear cohorts to the history; members are serialised only for a
    cohort not stored before (a repeated query's are)."""
    stored: set[str] = set()
    for quantity, members, digest in release.linear:
        if conn.execute(
                "SELECT 1 FROM linear_cohorts WHERE researcher = ? AND catalog = ? AND"
                " quantity = ? AND digest = ?",
                (release.auditor, release.catalog, quantity, digest)).fetchone() is not None:
            continue
        if digest not in stored and conn.execute(
                "SELECT 1 FROM cohorts WHERE researcher = ? AND catalog = ? AND digest = ?",
                (release.auditor, release.catalog, digest)).fetchone() is None:
            conn.execute(
                "INSERT INTO cohorts (researcher, catalog, digest, size, members_json)"
                " VALUES (?,?,?,?,?)", (release.auditor, release.catalog, digest, len(members),
                                        json.dumps(sorted(members))))
        stored.add(digest)
        conn.execute(
            "INSERT INTO linear_cohorts (researcher, catalog, quantity, digest, job_id)"
            " VALUES (?,?,?,?,?)",
            (release.auditor, release.catalog, quantity, digest, release.job_id))
