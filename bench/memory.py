"""Memory and store growth of one grouped image query, against the answer's size.

Three loopback `stimnetd` processes on demo catalogs (MNI 2 mm VTAs, DP off, so nothing
is withheld and the answer is as large as the query makes it), one federated
`SELECT hemisphere, sex, target, mean_map(vta_path, pulse_width_us) ... GROUP BY
hemisphere, sex, target` through the entry (site-a). For each daemon: RSS when idle, its
peak while the query runs (sampled every 20 ms from /proc), and after the query; the
store's growth (pages in use after a WAL checkpoint). Printed as ratios:
- peak / (3 x idle + answer), goal <= 1 (issue: within 3x idle RSS plus the answer);
- after / idle, goal ~1 (memory returns to its idle level);
- store growth / compressed answer, goal <= 1 per site.
`python bench/memory.py [--subjects 60] [--queries 2]`.
"""

from __future__ import annotations

import argparse
import asyncio
import pickle
import sys
import threading
import time
import zlib

from _common import ROOT, rss_mb, start_demo_sites, workdir  # type: ignore[import-not-found]
from store_sizes import used_bytes  # type: ignore[import-not-found]

from stimctl.client import AsyncClient

sys.path.insert(0, str(ROOT))
from tests.helpers import client_config  # noqa: E402

QUERY = ("SELECT hemisphere, sex, target, mean_map(vta_path, pulse_width_us) AS m "
         "FROM dbs_outcomes GROUP BY hemisphere, sex, target")


class PeakSampler:
    """The highest RSS of each pid seen while it runs (a thread: the loop is busy)."""

    def __init__(self, pids: list[int]) -> None:
        self.pids, self.peak = pids, dict.fromkeys(pids, 0.0)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            for pid in self.pids:
                self.peak[pid] = max(self.peak[pid], rss_mb(pid))
            time.sleep(0.02)

    def __enter__(self) -> PeakSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


async def main(subjects: int, queries: int) -> None:
    tmp = workdir()
    procs, ports, dbs, alice = await start_demo_sites(tmp, "mem", subjects)
    try:
        pids = [p.proc.pid for p in procs]
        async with AsyncClient(client_config(alice, f"127.0.0.1:{ports[0]}", 600)) as c:
            await c.query("SELECT count(*) FROM dbs_outcomes", federated=True, min_sites=3)
            await asyncio.sleep(1.0)
            idle = {pid: rss_mb(pid) for pid in pids}
            before = [used_bytes(db) for db in dbs]
            started = time.perf_counter()
            with PeakSampler(pids) as sampler:
                for _ in range(queries):
                    ans = await c.query(QUERY, federated=True, min_sites=3)
            wall = time.perf_counter() - started
            await asyncio.sleep(8.0)  # past the daemons' heap-trim interval (memtrim.py)
            after = {pid: rss_mb(pid) for pid in pids}
            grown = [used_bytes(db) - b for db, b in zip(dbs, before, strict=True)]
    finally:
        for p in procs:
            p.stop()
    raw = pickle.dumps((ans.doc, ans.arrays), protocol=5)  # what the researcher holds
    answer_mb, packed_mb = len(raw) / 2**20, len(zlib.compress(raw, 6)) / 2**20
    print(f"grouped mean_map, 3 loopback sites x {subjects} subjects (2 mm), {queries} "
          f"queries in {wall:.1f} s; answer {answer_mb:.2f} MB ({packed_mb:.2f} MB compressed)")
    for i, pid in enumerate(pids):
        role = "entry" if i == 0 else "site "
        print(f"  {role} mem-{'abc'[i]}: idle {idle[pid]:6.1f} MB  peak {sampler.peak[pid]:6.1f} MB"
              f"  after {after[pid]:6.1f} MB | peak/(3*idle+answer) = "
              f"{sampler.peak[pid] / (3 * idle[pid] + answer_mb):.2f} (goal <= 1)  "
              f"after/idle = {after[pid] / idle[pid]:.2f}  store growth/compressed answer = "
              f"{grown[i] / queries / 2**20 / packed_mb:.2f} (goal <= 1)")


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--subjects", type=int, default=60, help="subjects per site")
    ap.add_argument("--queries", type=int, default=2, help="grouped map queries to run")
    args = ap.parse_args()
    asyncio.run(main(args.subjects, args.queries))
