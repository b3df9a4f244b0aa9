"""Released cohorts: the history the overlap guard reads, and how a release adds to it.

Tables `cohorts` (members, size), `cohort_sketches` (records.cohort_sketch) and
`cohort_families` (a grouped query's cells). Reads rule candidates out cheaply first (by
size: |A xor B| >= ||A| - |B||; then by sketch, a lower bound on |A xor B| too) and parse
members only of what is left. Every function runs inside a write transaction: reading a
row stored without a sketch (schema before v3) sketches it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import sqlite3
from collections.abc import Callable, Iterable

import numpy as np

from stimnetd.store.records import SKETCH_BUCKETS, Disclosed, Release, cohort_sketch
from stimnetd.store.unions import UnionSizes, near_families, unions

SKETCH_BYTES = 4 * SKETCH_BUCKETS
# Below SQLite's limit on bound variables per statement.
DIGESTS_PER_QUERY = 500


def _spans(sizes: Iterable[int], window: int) -> list[list[int]]:
    """[size - window, size + window] for each size, overlapping ones merged, in order."""
    spans: list[list[int]] = []
    for size in sorted(set(sizes)):
        if spans and size - window <= spans[-1][1] + 1:
            spans[-1][1] = size + window
        else:
            spans.append([size - window, size + window])
    return spans


@dataclasses.dataclass
class SizedCohorts:
    """Earlier cohorts of the sizes a release's cohorts are near (`sized_cohorts`)."""

    digests: list[str]
    sizes: np.ndarray
    sketches: np.ndarray  # one row per cohort (zeros where it has none)
    sketched: np.ndarray  # stored with a sketch (schema v3 on)


def sized_cohorts(conn: sqlite3.Connection, release: Release, sizes: Iterable[int],
                  window: int) -> SizedCohorts:
    """The researcher's earlier cohorts on the catalog within `window` of any of `sizes`:
    read, and their sketches decoded, once for all the cohorts a release discloses (a
    grouped query's cells are often of similar size)."""
    rows: list[tuple[str, int, bytes | None]] = []
    for lo, hi in _spans(sizes, window):
        rows += conn.execute(
            "SELECT c.digest, c.size, s.sketch FROM cohorts c LEFT JOIN cohort_sketches s"
            " USING (researcher, catalog, digest) WHERE c.researcher = ? AND c.catalog = ?"
            " AND c.size BETWEEN ? AND ?", (release.researcher, release.catalog, lo, hi)
        ).fetchall()
    blank = bytes(SKETCH_BYTES)
    blobs = b"".join(sk if sk is not None and len(sk) == SKETCH_BYTES else blank
                     for _, _, sk in rows)
    return SizedCohorts(
        [d for d, _, _ in rows], np.array([n for _, n, _ in rows], np.int64),
        np.frombuffer(blobs, dtype="<u4").reshape(len(rows), SKETCH_BUCKETS).astype(np.int64),
        np.array([sk is not None and len(sk) == SKETCH_BYTES for _, _, sk in rows], bool))


def near_cohorts(conn: sqlite3.Connection, release: Release, members: frozenset[str], key: str,
                 window: int, sketches: dict[str, bytes],
                 sized: SizedCohorts) -> list[frozenset[str]]:
    """The researcher's earlier cohorts on the catalog that could be within `window`
    subjects of `members`: first by size (`sized` holds those of the sizes concerned), then
    by sketch; only those are parsed. A row without a sketch is parsed and sketched.
    `sketches` caches the new cohorts' own sketches."""
    candidates = [i for i in np.flatnonzero(np.abs(sized.sizes - len(members)) <= window).tolist()
                  if sized.digests[i] != key]  # the same cohort again discloses nothing new
    if not candidates:
        return []
    mine = sketches.get(key) or sketches.setdefault(key, cohort_sketch(members))
    own = np.frombuffer(mine, dtype="<u4").astype(np.int64)
    distances = np.abs(sized.sketches[candidates] - own).sum(axis=1)
    near = []
    for i, d in zip(candidates, distances.tolist(), strict=True):
        digest = sized.digests[i]
        if sized.sketched[i] and d > window:
            continue
        cohort = _members(conn, release, digest)
        if not sized.sketched[i]:
            _save_sketch(conn, release, digest, cohort_sketch(cohort))
        near.append(cohort)
    return near


def _members(conn: sqlite3.Connection, release: Release, digest: str) -> frozenset[str]:
    """An earlier cohort's members (empty if it is not stored: nothing to compare)."""
    row = conn.execute("SELECT members_json FROM cohorts WHERE researcher = ? AND catalog = ?"
                       " AND digest = ?", (release.researcher, release.catalog, digest)).fetchone()
    return frozenset(json.loads(row[0])) if row else frozenset()


def _family_digest(atoms: Disclosed) -> str:
    return hashlib.sha256(",".join(sorted(d for _, d in atoms)).encode()).hexdigest()


def _family_candidates(conn: sqlite3.Connection, release: Release, atoms: Disclosed,
                       window: int) -> list[tuple[list[str], str]]:
    """Earlier queries that sizes alone cannot rule out, as (cell digests, their sizes as
    JSON): earlier grouped queries (`cohort_families`) and, for three or more new cells,
    earlier single cohorts near a union of some but not all of them (each cell and all of
    them together are `near_cohorts`' work)."""
    sizes = [len(m) for m, _ in atoms]
    by_size = UnionSizes(sizes)
    own = {d for _, d in atoms}
    # Families have two or more cells: an ungrouped release (one) is never one of them.
    own_family = _family_digest(atoms) if len(atoms) > 1 else None
    found: list[tuple[list[str], str]] = []
    near_by_sizes: dict[str, bool] = {}  # researchers repeat groupings: judge each once
    for digest, sizes_json, atoms_json in conn.execute(
            "SELECT digest, sizes_json, atoms_json FROM cohort_families"
            " WHERE researcher = ? AND catalog = ?", (release.researcher, release.catalog)):
        if digest == own_family:
            continue
        if sizes_json not in near_by_sizes:
            near_by_sizes[sizes_json] = by_size.near(UnionSizes(json.loads(sizes_json)), window)
        if near_by_sizes[sizes_json]:
            found.append((json.loads(atoms_json), sizes_json))
    picks = unions(len(atoms))
    middle = picks[(picks.sum(axis=1) > 1) & (picks.sum(axis=1) < len(atoms))]
    for lo, hi in _spans((middle @ np.asarray(sizes, np.int64)).tolist(), window):
        for digest, size in conn.execute(
                "SELECT digest, size FROM cohorts WHERE researcher = ? AND catalog = ?"
                " AND size BETWEEN ? AND ?", (release.researcher, release.catalog, lo, hi)):
            if digest not in own:
                found.append(([digest], f"[{size}]"))
    return found


def _stored_sketches(conn: sqlite3.Connection, release: Release, wanted: list[str],
                     load: Callable[[str], frozenset[str]]) -> dict[str, bytes]:
    """The sketches of the cohorts `wanted`; one missing or damaged is made (and saved)."""
    stored: dict[str, bytes] = {}
    for lo in range(0, len(wanted), DIGESTS_PER_QUERY):
        chunk = wanted[lo:lo + DIGESTS_PER_QUERY]
        stored.update(conn.execute(
            "SELECT digest, sketch FROM cohort_sketches WHERE researcher = ? AND catalog = ?"
            f" AND digest IN ({','.join('?' * len(chunk))})",
            (release.researcher, release.catalog, *chunk)).fetchall())
    for d in wanted:
        if len(stored.get(d) or b"") != SKETCH_BYTES:
            stored[d] = cohort_sketch(load(d))
            _save_sketch(conn, release, d, stored[d])
    return stored


def near_family_cells(conn: sqlite3.Connection, release: Release, atoms: Disclosed, window: int,
                      sketches: dict[str, bytes]) -> list[list[frozenset[str]]]:
    """The researcher's earlier queries on the catalog (each as its released cells) some
    union of whose cells could be within `window` subjects of some union of `atoms`.
    Ruled out by sizes (`_family_candidates`), then by sketches; only the rest are parsed.
    `sketches` caches the new cells' own sketches."""
    found = _family_candidates(conn, release, atoms, window)
    if not found:
        return []
    members: dict[str, frozenset[str]] = {}

    def load(digest: str) -> frozenset[str]:
        if digest not in members:
            members[digest] = _members(conn, release, digest)
        return members[digest]

    stored = _stored_sketches(conn, release, sorted({d for ds, _ in found for d in ds}), load)

    def matrix(blobs: list[bytes]) -> np.ndarray:
        return np.frombuffer(b"".join(blobs), dtype="<u4").reshape(len(blobs), -1)

    mine = UnionSizes([len(m) for m, _ in atoms],
                      matrix([sketches.get(d) or sketches.setdefault(d, cohort_sketch(m))
                              for m, d in atoms]))
    parsed: dict[str, list[int]] = {}
    near = near_families(mine, [(parsed.get(their) or parsed.setdefault(their, json.loads(their)),
                                 matrix([stored[d] for d in digests]))
                                for digests, their in found], window)
    return [[load(d) for d in digests] for (digests, _), hit in zip(found, near, strict=True)
            if hit]


def record_disclosed(conn: sqlite3.Connection, release: Release, disclosed: Disclosed,
                     sketches: dict[str, bytes]) -> None:
    """Add each cohort `release` discloses to the history (once per digest), with its
    sketch, and a grouped release's cells as a family."""
    for members, key in disclosed:
        if conn.execute(
                "SELECT 1 FROM cohorts WHERE researcher = ? AND catalog = ? AND digest = ?",
                (release.researcher, release.catalog, key)).fetchone() is None:
            conn.execute(
                "INSERT INTO cohorts (researcher, catalog, digest, size, members_json)"
                " VALUES (?,?,?,?,?)", (release.researcher, release.catalog, key,
                                        len(members), json.dumps(sorted(members))))
            _save_sketch(conn, release, key, sketches.get(key) or cohort_sketch(members))
    if len(release.atoms) > 1 and release.decision != "suppressed":
        conn.execute(
            "INSERT OR IGNORE INTO cohort_families (researcher, catalog, digest,"
            " sizes_json, atoms_json) VALUES (?,?,?,?,?)",
            (release.researcher, release.catalog, _family_digest(release.atoms),
             json.dumps([len(m) for m, _ in release.atoms]),
             json.dumps([d for _, d in release.atoms])))


def _save_sketch(conn: sqlite3.Connection, release: Release, digest: str, sketch: bytes) -> None:
    conn.execute("INSERT OR REPLACE INTO cohort_sketches (researcher, catalog, digest, sketch)"
                 " VALUES (?,?,?,?)", (release.researcher, release.catalog, digest, sketch))
