"""A site's per-query store work on a store with a long history vs a fresh one, one run.

Each federated query at a peer is one release transaction that also remembers the request's
nonce (pruning expired ones), and the node's metrics count jobs by state every 2 s. Both
must cost the same whatever the site has already served. Prints, for a store holding
`--history` remembered nonces and jobs against an empty store made in the same run:

1. the median release transaction (nonce + release + audit, fsync'd), and their ratio;
2. the jobs-by-state count the metrics read, and their ratio;
3. the median release of a new 2,000-subject cohort through the overlap guard, where the
   history also holds `--cohorts` earlier cohorts of the researcher of the very same size
   (none near it), and their ratio;
4. the same for a release grouped into 3 cells of COHORT/3, where the history also holds
   `--cohorts` earlier grouped releases of 3 cells of those sizes (unions of some cells of
   one are compared with unions of some of the other's: privacy/overlap.py).
Goal: all ratios near 1 (history must not make the hot path slower).
Then bench/store_sizes.py: bytes stored per map release and per table release.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import json
import sqlite3
import statistics
import time
import uuid
from pathlib import Path

from _common import workdir  # type: ignore[import-not-found]

from stimnetd.privacy.policy import PrivacyPolicy
from stimnetd.privacy.release import decide
from stimnetd.store import NonceClaim, Store
from stimnetd.store.records import Release, ReleaseRule, cohort_digest, cohort_sketch


def add_history(path: Path, n: int, now: float) -> None:
    """`n` nonces still inside the freshness window and `n` finished jobs, written directly."""
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("BEGIN")
    conn.executemany("INSERT INTO nonces (nonce, signer, seen_at) VALUES (?, 'alice', ?)",
                     ((uuid.uuid4().hex, now - i * 0.005) for i in range(n)))
    conn.executemany(
        "INSERT INTO jobs (id, kind, scope, catalog, owner, state, detail, created_at, "
        "updated_at, request_id, origin, payload, signature, signer_cert) VALUES "
        "(?, 'query', 'federated', 'c', 'alice', 'succeeded', '', ?, ?, 'r', 'client', "
        "x'', x'', x'')", ((uuid.uuid4().hex, now, now) for _ in range(n)))
    conn.execute("COMMIT")
    conn.close()


COHORT = 2000


def fingerprints(n: int) -> frozenset[str]:
    return frozenset(uuid.uuid4().hex for _ in range(n))


def add_cohorts(path: Path, n: int, sketched: bool = True) -> None:
    """`n` released cohorts of COHORT subjects each, as the release transaction stores them."""
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("BEGIN")
    for _ in range(n):
        members = fingerprints(COHORT)
        digest = cohort_digest(members)
        conn.execute("INSERT INTO cohorts (researcher, catalog, digest, size, members_json) "
                     "VALUES ('alice', 'c', ?, ?, ?)", (digest, COHORT, json.dumps(sorted(members))))
        if sketched:
            conn.execute("INSERT INTO cohort_sketches (researcher, catalog, digest, sketch) "
                         "VALUES ('alice', 'c', ?, ?)", (digest, cohort_sketch(members)))
    conn.execute("COMMIT")
    conn.close()


def grouped(job: str) -> Release:
    """A release grouped into 3 cells, as the site builds it (cells + union disclosed)."""
    cells = [fingerprints(COHORT // 3) for _ in range(3)]
    union = frozenset().union(*cells)
    disclosed = tuple((c, cohort_digest(c)) for c in (*cells, union))
    return Release(job_id=job, researcher="alice", catalog="c", decision="released",
                   epsilon=None, cohort=union, partials=b"x" * 300, at=time.time(),
                   guarded=disclosed, atoms=disclosed[:3])


async def add_families(store: Store, n: int) -> None:
    for i in range(n):
        await store.release(grouped(f"history-{i}"), decide=_rules(guarded=False),
                            audit_actor=("alice", "researcher"))


def _rules(*, guarded: bool) -> ReleaseRule:
    """The site's release rules: a budget of 10, and the overlap guard at k_min = 5."""
    return functools.partial(decide, policy=PrivacyPolicy(k_min=5, budget_epsilon=10.0),
                             overlap_guard=guarded)


async def measure(path: Path, history: int, cohorts: int, n: int
                  ) -> tuple[float, float, float, float]:
    now = time.time()
    store = Store(path)
    await store.open()
    await store.close()
    if history:
        add_history(path, history, now)
    if cohorts:
        add_cohorts(path, cohorts)
    store = Store(path)
    await store.open()
    try:
        releases = []
        for i in range(n):
            release = Release(job_id=f"bench-{i}", researcher="alice", catalog="c",
                              decision="released", epsilon=None, cohort=frozenset({"a", "b"}),
                              partials=b"x" * 300, at=time.time())
            t = time.perf_counter()
            await store.release(release, decide=_rules(guarded=False),
                                audit_actor=("alice", "researcher"),
                                nonce=NonceClaim(uuid.uuid4().hex, "alice", 300.0))
            releases.append(time.perf_counter() - t)
        counts = []
        for _ in range(max(5, n // 20)):
            t = time.perf_counter()
            await store.count_jobs_by_state()
            counts.append(time.perf_counter() - t)
        guarded = []
        for i in range(max(5, n // 10)):
            cohort = fingerprints(COHORT)
            release = Release(job_id=f"guarded-{i}", researcher="alice", catalog="c",
                              decision="released", epsilon=None, cohort=cohort,
                              partials=b"x" * 300, at=time.time())
            t = time.perf_counter()
            await store.release(release, decide=_rules(guarded=True),
                                audit_actor=("alice", "researcher"))
            guarded.append(time.perf_counter() - t)
            # Each guarded release adds a cohort: drop it so every one sees the same history.
            await store.db.execute("DELETE FROM cohorts WHERE digest = ?", (cohort_digest(cohort),))
            await store.db.commit()
        if cohorts:
            await add_families(store, cohorts)
        families = []
        for i in range(max(5, n // 10)):
            release = grouped(f"grouped-{i}")
            t = time.perf_counter()
            await store.release(release, decide=_rules(guarded=True),
                                audit_actor=("alice", "researcher"))
            families.append(time.perf_counter() - t)
            # As above: drop what it added (its family, cells and union), same history for all.
            await store.db.execute("DELETE FROM cohort_families WHERE rowid = "
                                   "(SELECT MAX(rowid) FROM cohort_families)")
            await store.db.executemany("DELETE FROM cohorts WHERE digest = ?",
                                       [(d,) for _, d in release.guarded])
            await store.db.commit()
        return (statistics.median(releases), statistics.median(counts),
                statistics.median(guarded), statistics.median(families))
    finally:
        await store.close()


async def main(history: int, cohorts: int, n: int) -> None:
    tmp = workdir()
    fresh = await measure(tmp / "fresh.sqlite3", 0, 0, n)
    old = await measure(tmp / "history.sqlite3", history, cohorts, n)
    print(f"{n} release transactions each; history = {history} nonces and {history} jobs, "
          f"{cohorts} cohorts of {COHORT}")
    for label, f, h in zip(("release transaction", "jobs-by-state count", "guarded release",
                            "grouped release"),
                           fresh, old, strict=True):
        print(f"{label:20}: fresh {f * 1000:7.3f} ms   with history {h * 1000:7.3f} ms   "
              f"ratio {h / f:5.2f}   (goal ~1)")


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--history", type=int, default=60_000,
                    help="remembered nonces and finished jobs (default: 100 q/s for 10 min)")
    ap.add_argument("--cohorts", type=int, default=300,
                    help="earlier released cohorts of the same size as the guarded ones")
    ap.add_argument("-n", type=int, default=200)
    ap.add_argument("--sizes", type=int, default=10,
                    help="queries of each kind for bytes per release (store_sizes.py); 0: skip")
    a = ap.parse_args()
    asyncio.run(main(a.history, a.cohorts, a.n))
    if a.sizes:
        import store_sizes  # type: ignore[import-not-found]

        asyncio.run(store_sizes.main(a.sizes))
