"""Federated voxel-wise maps against one process doing the same work over all files.

tmap: three loopback `stimnetd` processes on demo catalogs (MNI 2 mm VTAs, DP off, k_min 5),
one federated `SELECT tmap(vta_path, improvement_pct, correction => 'none') ...` through the
entry, timed (median of --repeat runs after a warm-up); against, in the same run, a plain
single-process loop over all 3 x N images (nibabel load, binarise, dense numpy sums of n,
Σw and Σw², then t per voxel), which is what a researcher holding every file would write.

corr_map (`--corr-grid 2 1`): the same over synthetic continuous E-field images (float32
V/mm, 1.8/(1 + (d/3 mm)²) around a jittered left-STN contact, 0 below 0.2 V/mm) on the MNI
2 mm or 1 mm grid, `SELECT corr_map(efield, outcome, correction => 'none')`, against a
plain loop of dense sums n, Σx, Σx², Σxw and r per voxel. It also prints one site's share
as it travels (partials_to_doc + codec.pack, after k_min) against the same arrays dense.

Prints each time, their ratio (goal <= 1.5: each site reads only its third of the files,
in parallel) and each daemon's peak RSS during the federated runs.
`python bench/maps.py [--subjects 100 500] [--repeat 3] [--corr-grid 2 1]
[--corr-subjects 100]`. The demo generator makes 2 mm VTA grids only, so tmap runs at 2 mm.
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
from stimnet import codec  # noqa: E402
from stimnetd.privacy.suppress import suppress_small_cells  # noqa: E402
from stimnetd.query.aggregate import Partial  # noqa: E402
from stimnetd.query.fieldsums import chunk_field_sums  # noqa: E402
from stimnetd.query.partial_docs import partials_to_doc  # noqa: E402
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


CORR_QUERY = "SELECT corr_map(efield, outcome, correction => 'none') AS r FROM efields"
GRIDS = {2: ((91, 109, 91), [[-2.0, 0, 0, 90], [0, 2.0, 0, -126], [0, 0, 2.0, -72], [0, 0, 0, 1]]),
         1: ((182, 218, 182), [[-1.0, 0, 0, 90], [0, 1.0, 0, -126], [0, 0, 1.0, -72],
                               [0, 0, 0, 1]])}


def efield_site(root: Path, site: int, subjects: int, mm: int) -> dict:
    """One site's catalog of E-field images and outcomes; its config entry."""
    shape, affine = GRIDS[mm]
    aff = np.asarray(affine)
    rng = np.random.default_rng(100 + site)
    (root / "img").mkdir(parents=True)
    inverse = np.linalg.inv(aff)
    reach = int(np.ceil(12 / mm))
    rows = []
    for j in range(subjects):
        contact = np.array([-12.0, -13.0, -5.0]) + rng.normal(0, 2.0, 3)
        c = np.rint(inverse[:3, :3] @ contact + inverse[:3, 3]).astype(int)
        lo, hi = np.maximum(c - reach, 0), np.minimum(c + reach + 1, shape)
        idx = np.stack(np.meshgrid(*(np.arange(a, b) for a, b in zip(lo, hi, strict=True)),
                                   indexing="ij"), axis=-1)
        d = np.linalg.norm(idx @ aff[:3, :3].T + aff[:3, 3] - contact, axis=-1)
        amp = rng.uniform(0.8, 1.2)
        x = np.zeros(shape, dtype=np.float32)
        box = (1.8 * amp / (1 + (d / 3.0) ** 2)).astype(np.float32)
        box[box < 0.2] = 0.0
        x[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]] = np.minimum(box, 2.0)
        img = nib.Nifti1Image(x, aff)
        img.set_sform(aff, code="mni")
        img.set_qform(aff, code="mni")
        rel = f"img/s{site}-{j}.nii.gz"
        nib.save(img, root / rel)
        # Outcomes that grow with the field at the contact's sweet spot, plus noise.
        rows.append((f"s{site}-{j}", rel, round(40 - 3 * float(np.linalg.norm(
            contact - [-12.5, -13.5, -5.5])) + rng.normal(0, 8), 3)))
    pd.DataFrame(rows, columns=["subject_id", "efield", "outcome"]).to_csv(root / "t.csv",
                                                                            index=False)
    return {"name": "efields", "description": "synthetic E-fields", "root": str(root),
            "subject_key": "subject_id", "tables": {"t": "t.csv"},
            "fields": {"subject_id": {"table": "t", "type": "id"},
                       "efield": {"table": "t", "type": "image", "continuous": True,
                                  "bounds": [0, 2], "unit": "V/mm"},
                       "outcome": {"table": "t", "type": "numeric", "bounds": [-100, 200]}}}


def plain_corr(roots: list[Path]) -> np.ndarray:
    """Pearson r of the E-field value and the outcome per voxel over every subject."""
    n = sx = sxx = sxw = None
    ws: list[float] = []
    for root in roots:
        rows = pd.read_csv(root / "t.csv")
        for rel, w in zip(rows["efield"], rows["outcome"], strict=True):
            x = np.asarray(nib.load(root / rel).dataobj, dtype=np.float64)
            if n is None:
                n, sx, sxx, sxw = (np.zeros(x.shape) for _ in range(4))
            n += x != 0
            sx += x
            sxx += x * x
            sxw += x * w
            ws.append(float(w))
    assert n is not None and sx is not None and sxx is not None and sxw is not None
    w_ = np.asarray(ws)
    big_n, sw, sww = len(w_), w_.sum(), (w_ * w_).sum()
    with np.errstate(invalid="ignore", divide="ignore"):
        num = sxw - sx * sw / big_n
        r = num / np.sqrt((sxx - sx * sx / big_n) * (sww - sw * sw / big_n))
    return np.where(n > 0, r, np.nan)


def share_bytes(root: Path, mm: int, k_min: int) -> tuple[int, int]:
    """One site's corr_map share as packed for the wire (after k_min), and dense."""
    shape, affine = GRIDS[mm]
    rows = pd.read_csv(root / "t.csv")
    items = list(zip(rows["efield"], rows["outcome"].astype(float), strict=True))
    n, count, sx, sxx, sxw = chunk_field_sums(
        lambda rel: np.asarray(nib.load(root / rel).dataobj), "efield", shape, None, None,
        items)
    w = rows["outcome"].to_numpy(dtype=np.float64)
    stats = {"count": count, "sx": sx, "sxx": sxx, "sxw": sxw, "total_n": np.array([n * 1.0]),
             "total_sum": np.array([w.sum()]), "total_sum2": np.array([(w * w).sum()])}
    p = Partial("r", "voxel_stats", (), n, stats,
                {"func": "corr_map", "column": "efield", "weight": "outcome", "condition": None,
                 "shape": list(shape), "affine": affine})
    released, _ = suppress_small_cells([p], k_min)
    docs, arrays = partials_to_doc(released)
    dense = sum(a.nbytes for a in arrays.values())
    return len(codec.pack({"partials": docs}, arrays)), dense


async def one_corr(subjects: int, mm: int, repeat: int) -> None:
    tmp = workdir()
    t0 = time.perf_counter()
    roots = [tmp / f"efields-{i}" for i in range(3)]
    entries = [efield_site(root, i, subjects, mm) for i, root in enumerate(roots)]
    made = time.perf_counter() - t0
    procs, ports, _dbs, alice = await start_demo_sites(tmp, f"corr{mm}mm", subjects,
                                                       catalogs=entries)
    try:
        pids = [p.proc.pid for p in procs]
        async with AsyncClient(client_config(alice, f"127.0.0.1:{ports[0]}", 1800)) as c:
            await c.query(CORR_QUERY, federated=True, min_sites=3)  # warm-up
            times = []
            with PeakSampler(pids) as sampler:
                for _ in range(repeat):
                    t = time.perf_counter()
                    ans = await c.query(CORR_QUERY, federated=True, min_sites=3)
                    times.append(time.perf_counter() - t)
        fed = statistics.median(times)
    finally:
        for p in procs:
            p.stop()
    pooled: list[np.ndarray] = []
    loop = timed(lambda: pooled.append(plain_corr(roots)), repeat)
    r = ans.map_array("r", "stat")
    entry = ans.maps[0]
    cohort = ans.map_array("r", "cohort")
    whole = np.isfinite(r) & (cohort == 3 * subjects)
    diff = float(np.nanmax(np.abs(r[whole] - pooled[-1][whole]))) if whole.any() else 0.0
    packed, dense = share_bytes(roots[0], mm, 5)
    print(f"corr_map, 3 sites x {subjects} subjects ({mm} mm, {np.prod(GRIDS[mm][0]):,} "
          f"voxels; images made in {made:.0f} s): federated {fed:.2f} s, plain loop over "
          f"{3 * subjects} files {loop:.2f} s | federated/loop = {fed / loop:.2f} (goal <= 1.5); "
          f"{entry['tested_voxels']} voxels tested; where every site released one "
          f"({int(whole.sum())}), max |r - pooled r| = {diff:.1e}")
    print(f"  one site's share on the wire: {packed / 2**20:.2f} MiB packed "
          f"(its arrays dense: {dense / 2**20:.0f} MiB)")
    print("  peak RSS during the federated runs: " + ", ".join(
        f"corr{mm}mm-{'abc'[i]} {sampler.peak[pid]:.0f} MB" for i, pid in enumerate(pids)))


async def main(sizes: list[int], repeat: int, grids: list[int], corr_subjects: int) -> None:
    for n in sizes:
        await one(n, repeat)
    for mm in grids:
        await one_corr(corr_subjects, mm, repeat)


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--subjects", type=int, nargs="*", default=[100], help="subjects per site")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--corr-grid", type=int, nargs="*", default=[2], choices=sorted(GRIDS),
                    help="corr_map on these MNI grids (mm)")
    ap.add_argument("--corr-subjects", type=int, default=100, help="E-fields per site")
    args = ap.parse_args()
    asyncio.run(main(args.subjects, args.repeat, args.corr_grid, args.corr_subjects))
