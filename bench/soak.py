"""RSS slope of each site under a steady query load (the soak).

Three loopback `stimnetd` processes on demo catalogs (DP off); one researcher keeps
`--concurrency` federated table queries in flight (counts, means, a grouped count and
mean, new WHERE cohorts drawn in turn) through the entry for `--minutes`. Each daemon's RSS is sampled every
2 s; after the first third (warm-up: caches, pools and the store's pages fill), the
least-squares slope of RSS over time is printed per site in MB/min, with the rate of
queries answered. Goal: flat after warm-up, at most 0.1 MB/min. The WHERE sequence
(age > 20, 21, ...) is a differencing sequence: exact auditing refuses much of it after
the first rounds, which the run counts and prints (refusals are load too).
The on-demand run is `python bench/soak.py --minutes 10`; the default is a bounded 2.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import itertools
import re
import sys
import time

from _common import ROOT, rss_mb, start_demo_sites, workdir  # type: ignore[import-not-found]

from stimctl.client import AsyncClient

sys.path.insert(0, str(ROOT))
from tests.helpers import client_config  # noqa: E402

QUERIES = (
    "SELECT count(*) FROM dbs_outcomes",
    "SELECT avg(age), avg(improvement_pct) FROM dbs_outcomes",
    "SELECT sex, count(*), avg(improvement_pct) FROM dbs_outcomes GROUP BY sex",
    "SELECT count(*), avg(age) FROM dbs_outcomes WHERE age > {a}",
)
SAMPLE_S = 2.0


def slope_per_min(points: list[tuple[float, float]]) -> float:
    """Least-squares slope of (seconds, MB) points, in MB per minute."""
    n = len(points)
    mt = sum(t for t, _ in points) / n
    mv = sum(v for _, v in points) / n
    var = sum((t - mt) ** 2 for t, _ in points)
    return 60 * sum((t - mt) * (v - mv) for t, v in points) / var if var else 0.0


async def main(minutes: float, concurrency: int, subjects: int) -> None:
    tmp = workdir()
    procs, ports, _dbs, alice = await start_demo_sites(tmp, "soak", subjects)
    pids = [p.proc.pid for p in procs]
    samples: dict[int, list[tuple[float, float]]] = {pid: [] for pid in pids}
    done = 0
    errors: collections.Counter[str] = collections.Counter()
    stop = time.perf_counter() + minutes * 60
    ages = itertools.cycle(range(20, 80))

    async def caller(c: AsyncClient) -> None:
        nonlocal done
        for sql in itertools.cycle(QUERIES):
            if time.perf_counter() >= stop:
                return
            try:
                await c.query(sql.format(a=next(ages)), federated=True, min_sites=3)
                done += 1
            except Exception as exc:  # refusals (exact auditing, limits) are load too
                errors[f"{type(exc).__name__}: {re.sub(r'[0-9a-f]{24}', 'ID', str(exc))[:150]}"] += 1

    async def sampler(t0: float) -> None:
        while time.perf_counter() < stop:
            now = time.perf_counter() - t0
            for pid in pids:
                samples[pid].append((now, rss_mb(pid)))
            await asyncio.sleep(SAMPLE_S)

    try:
        async with AsyncClient(client_config(alice, f"127.0.0.1:{ports[0]}", 120)) as c:
            t0 = time.perf_counter()
            await asyncio.gather(sampler(t0), *[caller(c) for _ in range(concurrency)])
            wall = time.perf_counter() - t0
    finally:
        for p in procs:
            p.stop()
    print(f"soak: {minutes:g} min, {concurrency} concurrent queries (one researcher), "
          f"3 loopback sites x {subjects} subjects: {done / wall:.1f} queries/s answered, "
          f"{sum(errors.values())} refused or failed")
    for what, n in errors.most_common(3):
        print(f"    {n:6d} x {what}")
    for i, pid in enumerate(pids):
        pts = samples[pid]
        steady = pts[len(pts) // 3:]
        print(f"  {'entry' if i == 0 else 'site '} soak-{'abc'[i]}: RSS {pts[0][1]:6.1f} -> "
              f"{pts[-1][1]:6.1f} MB; slope after warm-up {slope_per_min(steady):+.3f} MB/min "
              f"(goal <= 0.1)")


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--minutes", type=float, default=2.0)
    ap.add_argument("--concurrency", type=int, default=20)
    ap.add_argument("--subjects", type=int, default=60, help="subjects per site")
    args = ap.parse_args()
    asyncio.run(main(args.minutes, args.concurrency, args.subjects))
