"""The history exact auditing reads: which cohorts of which quantity a researcher was given.

Table `linear_cohorts` keys (researcher, catalog, quantity, cohort digest) to the job that
first released it; members live in `cohorts` (one row per distinct cohort). A digest is a
hash of the members, so parsed members are cached by it for the life of the process.
"""

from __future__ import annotations

import functools
import json
import sqlite3

from stimnetd.store.records import Release


@functools.lru_cache(maxsize=4096)
def _parse(members_json: str) -> frozenset[str]:
    return frozenset(json.loads(members_json))


def history(conn: sqlite3.Connection, release: Release,
            quantity: str) -> list[tuple[frozenset[str], str, str]]:
    """(members, digest, job) of every cohort of `quantity` released to the release's
    researcher (or its catalog's shared history) on its catalog, oldest first."""
    rows = conn.execute(
        "SELECT l.digest, l.job_id, c.members_json FROM linear_cohorts l JOIN cohorts c"
        " ON c.researcher = l.researcher AND c.catalog = l.catalog AND c.digest = l.digest"
        " WHERE l.researcher = ? AND l.catalog = ? AND l.quantity = ? ORDER BY l.rowid",
        (release.auditor, release.catalog, quantity)).fetchall()
    return [(_parse(m), d, j) for d, j, m in rows]


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
