"""A site's per-query store work on a store with a long history vs a fresh one, one run.

Each federated query at a peer is one release transaction that also remembers the request's
nonce (pruning expired ones), and the node's metrics count jobs by state every 2 s. Both
must cost the same whatever the site has already served. Prints, for a store holding
`--history` remembered nonces and jobs against an empty store made in the same run:

1. the median release transaction (nonce + release + audit, fsync'd), and their ratio;
2. the jobs-by-state count the metrics read, and their ratio.
Goal: both ratios near 1 (history must not make the hot path slower).
"""

from __future__ import annotations

import argparse
import asyncio
import sqlite3
import statistics
import time
import uuid
from pathlib import Path

from _common import workdir  # type: ignore[import-not-found]

from stimnetd.store import NonceClaim, Store
from stimnetd.store.records import Release


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


async def measure(path: Path, history: int, n: int) -> tuple[float, float]:
    now = time.time()
    store = Store(path)
    await store.open()
    await store.close()
    if history:
        add_history(path, history, now)
    store = Store(path)
    await store.open()
    try:
        releases = []
        for i in range(n):
            release = Release(job_id=f"bench-{i}", researcher="alice", catalog="c",
                              decision="released", epsilon=None, cohort=frozenset({"a", "b"}),
                              partials=b"x" * 300, at=time.time())
            t = time.perf_counter()
            await store.release(release, budget=10.0, audit_actor=("alice", "researcher"),
                                nonce=NonceClaim(uuid.uuid4().hex, "alice", 300.0))
            releases.append(time.perf_counter() - t)
        counts = []
        for _ in range(max(5, n // 20)):
            t = time.perf_counter()
            await store.count_jobs_by_state()
            counts.append(time.perf_counter() - t)
        return statistics.median(releases), statistics.median(counts)
    finally:
        await store.close()


async def main(history: int, n: int) -> None:
    tmp = workdir()
    fresh = await measure(tmp / "fresh.sqlite3", 0, n)
    old = await measure(tmp / "history.sqlite3", history, n)
    print(f"{n} release transactions each; history = {history} nonces and {history} jobs")
    print(f"release transaction : fresh {fresh[0] * 1000:7.3f} ms   with history "
          f"{old[0] * 1000:7.3f} ms   ratio {old[0] / fresh[0]:5.2f}   (goal ~1)")
    print(f"jobs-by-state count : fresh {fresh[1] * 1000:7.3f} ms   with history "
          f"{old[1] * 1000:7.3f} ms   ratio {old[1] / fresh[1]:5.2f}   (goal ~1)")


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--history", type=int, default=60_000,
                    help="remembered nonces and finished jobs (default: 100 q/s for 10 min)")
    ap.add_argument("-n", type=int, default=200)
    a = ap.parse_args()
    asyncio.run(main(a.history, a.n))
