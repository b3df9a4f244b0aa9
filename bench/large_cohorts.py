"""New cohorts on large tables: a federated query over a cohort no earlier query used,
against pandas doing the same work on the same data, in the same run.

Three loopback `stimnetd` processes, each with one table of `--rows` subjects (default
1,000,000), DP off, so every release goes through exact auditing's cohort bookkeeping (its
fingerprints, its stored member set, the span check). Each query is
`SELECT count(*), avg(score) FROM big WHERE age > a AND score < b` with (a, b) never used
before — a new cohort at every site — and, as the second figure, one cohort asked again.
The baseline is pandas on the three sites' frames (already in memory): the same filter,
count and mean per site, summed. Printed: median wall time of each and their ratio. Goal
(issue 25): a new cohort costs at most 2x pandas.

    python bench/large_cohorts.py              # 3 x 1M rows, 8 new cohorts
    python bench/large_cohorts.py --rows 200000 --queries 4
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
from _common import ROOT, rss_mb, workdir  # type: ignore[import-not-found]

sys.path.insert(0, str(ROOT))

from stimctl.client import AsyncClient  # noqa: E402
from stimnetd.testing import CertFactory, DaemonProcess, free_port, write_node_config  # noqa: E402
from tests.helpers import client_config  # noqa: E402

FIELDS = {
    "subject": {"table": "big", "type": "id"},
    "age": {"table": "big", "type": "numeric", "unit": "years", "bounds": [18, 90]},
    "score": {"table": "big", "type": "numeric", "unit": "points", "bounds": [0, 100]},
}


def write_site(root: Path, i: int, rows: int) -> pd.DataFrame:
    rng = np.random.default_rng([7, i])
    df = pd.DataFrame({"subject": [f"s{i}-{k}" for k in range(rows)],
                       "age": rng.integers(18, 91, rows),
                       "score": np.round(rng.uniform(0, 100, rows), 3)})
    root.mkdir(parents=True, exist_ok=True)
    df.to_csv(root / "big.csv", index=False)
    return df


def pandas_answer(frames: list[pd.DataFrame], a: int, b: float) -> tuple[int, float]:
    n, total = 0, 0.0
    for df in frames:
        sel = df[(df["age"] > a) & (df["score"] < b)]
        n += len(sel)
        total += float(sel["score"].sum())
    return n, total / n


async def main(rows: int, queries: int) -> None:
    tmp = workdir()
    pki = CertFactory(tmp / "pki")
    ops, alice = pki.issue("ops", "admin"), pki.issue("alice", "researcher")
    ports = [free_port() for _ in range(3)]
    frames, procs = [], []
    t0 = time.perf_counter()
    for i, port in enumerate(ports):
        name = f"big-{'abc'[i]}"
        root = tmp / f"catalog-{name}"
        frames.append(write_site(root, i, rows))
        cat = {"name": "big", "description": "synthetic", "root": str(root),
               "subject_key": "subject", "tables": {"big": "big.csv"}, "fields": FIELDS}
        cfg = write_node_config(tmp / name, pki.issue(name, "node"), name, port=port,
                                crl=pki.crl_path, catalogs=[cat], logging={"level": "warning"},
                                gossip={"enabled": False},
                                federation={"peers": [f"127.0.0.1:{p}" for p in ports if p != port],
                                            "subjob_timeout_s": 300.0})
        procs.append(DaemonProcess(cfg))
    try:
        for proc, port in zip(procs, ports, strict=True):
            await proc.wait_healthy(ops, f"127.0.0.1:{port}", timeout_s=600)
        print(f"3 sites x {rows:,} rows written and loaded in {time.perf_counter() - t0:.0f} s")
        await _measure(frames, alice, ports[0], queries)
        print("peak RSS: " + ", ".join(f"{rss_mb(p.proc.pid):.0f} MB" for p in procs))
    finally:
        for p in procs:
            p.stop()


async def _measure(frames: list[pd.DataFrame], alice: object, entry_port: int,
                   queries: int) -> None:
    fed_new, fed_again, base = [], [], []
    async with AsyncClient(client_config(alice, f"127.0.0.1:{entry_port}", 600)) as c:
        for q in range(queries + 1):
            a, b = 20 + q, 95.0 - 0.5 * q  # never asked before: a new cohort at every site
            sql = f"SELECT count(*), avg(score) FROM big WHERE age > {a} AND score < {b}"
            t = time.perf_counter()
            ans = await c.query(sql, federated=True, min_sites=3)
            took = time.perf_counter() - t
            t = time.perf_counter()
            n, mean = pandas_answer(frames, a, b)
            base_s = time.perf_counter() - t
            assert ans.rows[0][0] == n and abs(ans.rows[0][1] - mean) < 1e-9 * abs(mean), \
                (ans.rows, n, mean)
            t = time.perf_counter()
            await c.query(sql, federated=True, min_sites=3)
            again = time.perf_counter() - t
            if q == 0:
                continue  # the first query also warms the catalogs' column caches
            fed_new.append(took)
            fed_again.append(again)
            base.append(base_s)
    fn, fa, pb = (statistics.median(x) for x in (fed_new, fed_again, base))
    print(f"new cohort: federated {fn * 1000:.0f} ms, pandas {pb * 1000:.0f} ms: "
          f"{fn / pb:.2f}x (goal <= 2)")
    print(f"same cohort again: federated {fa * 1000:.0f} ms: {fa / pb:.2f}x pandas")


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=1_000_000, help="subjects per site")
    ap.add_argument("--queries", type=int, default=8, help="new cohorts measured")
    args = ap.parse_args()
    asyncio.run(main(args.rows, args.queries))
