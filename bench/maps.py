"""A federated voxel-wise t-test against one process doing the same work over all files.

Three loopback `stimnetd` processes on demo catalogs (MNI 2 mm VTAs, DP off, k_min 5), one
federated `SELECT tmap(vta_path, improvement_pct, correction => 'none') ...` through the
entry, timed (median of --repeat runs after a warm-up); against, in the same run, a plain
single-process loop over all 3 x N images (nibabel load, binarise, dense numpy sums of n,
Σw and Σw², then t per voxel), which is what a researcher holding every file would write.
Prints each time, their ratio (goal <= 1.5: each site reads only its third of the files,
in parallel) and each daemon's peak RSS during the federated runs.
`python bench/maps.py [--subjects 100 500] [--repeat 3]`. The demo generator makes 2 mm
grids only, and `corr_map` (continuous images) is not a query aggregate yet, so neither
the 1 mm grid nor corr_map is measured here.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys  # noqa: E402,I001 - after _common, which puts the repo on sys.path
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
from _common import ROOT, start_demo_sites, timed, workdir  # type: ignore[import-not-found]
from memory import PeakSampler  # type: ignore[import-not-found]

from stimctl.client import AsyncClient

sys.path.insert(0, str(ROOT))
from tests.helpers import client_config  # noqa: E402

QUERY = ("SELECT tmap(vta_path, improvement_pct, correction => 'none') AS t "
         "FROM dbs_outcomes")


def plain_tmap(roots: list[Path]) -> tuple[np.ndarray, np.ndarray]:
    """The pooled one-sample t of improvement_pct among the subjects covering each voxel."""
    n = s1 = s2 = None
    for root in roots:
        rows = pd.read_csv(root / "stimulation.csv").merge(
            pd.read_csv(root / "outcomes.csv"), on="subject_id")
        for rel, w in zip(rows["vta_path"], rows["improvement_pct"], strict=True):
            if pd.isna(rel) or pd.isna(w):
                continue
            m = np.asarray(nib.load(root / rel).dataobj) > 0
            if n is None:
                n, s1, s2 = (np.zeros(m.shape) for _ in range(3))
            n += m
            s1 += w * m
            s2 += w * w * m
    assert n is not None and s1 is not None and s2 is not None
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = s1 / n
        var = (s2 - n * mean ** 2) / (n - 1)
        return mean / np.sqrt(var / n), n


async def one(subjects: int, repeat: int) -> None:
    tmp = workdir()
    procs, ports, _dbs, alice = await start_demo_sites(tmp, f"maps{subjects}", subjects)
    roots = sorted(tmp.glob("catalog-*"))
    try:
        pids = [p.proc.pid for p in procs]
        async with AsyncClient(client_config(alice, f"127.0.0.1:{ports[0]}", 1800)) as c:
            await c.query(QUERY, federated=True, min_sites=3)  # warm-up
            times = []
            with PeakSampler(pids) as sampler:
                for _ in range(repeat):
                    t = time.perf_counter()
                    ans = await c.query(QUERY, federated=True, min_sites=3)
                    times.append(time.perf_counter() - t)
        fed = statistics.median(times)
    finally:
        for p in procs:
            p.stop()
    pooled: list[np.ndarray] = []
    loop = timed(lambda: pooled.append(plain_tmap(roots)), repeat)
    stat, count = ans.map_array("t", "stat"), ans.map_array("t", "count")
    t_pooled, n_pooled = pooled[-1]
    tested = np.isfinite(stat)
    # The same t where every site released the voxel (k_min withholds a site's thin ones,
    # and the voxel is then tested over the sites that released it).
    whole = tested & (count == n_pooled)
    diff = float(np.max(np.abs(stat[whole] - t_pooled[whole]))) if whole.any() else 0.0
    print(f"tmap, 3 sites x {subjects} subjects (2 mm): federated {fed:.2f} s, plain loop over "
          f"{3 * subjects} files {loop:.2f} s | federated/loop = {fed / loop:.2f} (goal <= 1.5); "
          f"{int(tested.sum())} voxels tested; where every site released one "
          f"({int(whole.sum())}), max |t - pooled t| = {diff:.1e}")
    print("  peak RSS during the federated runs: " + ", ".join(
        f"maps{subjects}-{'abc'[i]} {sampler.peak[pid]:.0f} MB" for i, pid in enumerate(pids)))


async def main(sizes: list[int], repeat: int) -> None:
    for n in sizes:
        await one(n, repeat)


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--subjects", type=int, nargs="+", default=[100], help="subjects per site")
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    asyncio.run(main(args.subjects, args.repeat))
