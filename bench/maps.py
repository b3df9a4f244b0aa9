"""A federated voxel-map query against one process doing the same work over all files.

Three loopback `stimnetd` processes on demo catalogs (DP off, k_min 5), one federated
`SELECT count_map(vta_path), mean_map(vta_path, improvement_pct), tmap(...)` through the
entry, timed with a cold image cache (every image file touched first, so every cache key,
in memory and on disk, is new) and a warm one (median of --repeat runs each). In the
same run, single-process loops over all 3 x N files computing the same sums (n, Σw, Σw²):
dense (nibabel load, binarise, dense numpy `+=`), sparse (nibabel load, indices of the
non-zero voxels, adds at those indices) and gunzip only (every file read and gunzipped,
nothing else). Prints each time, the federated ones as ratios to each loop (issue 25's
goals: cold <= 0.5x the sparse loop and <= 1.0x gunzip-only; warm <= 0.1x gunzip-only),
the entry's health-check p99 during a cold query over its idle p99, each daemon's peak
RSS (and its decoding workers'), and checks the released counts against the loop's.
`--mm 1` upsamples the demo's 2 mm images and ROIs to the 1 mm MNI grid (182x218x182)
before the daemons start.

corr_map (`--corr-grid 2 1`): the same over synthetic continuous E-field images (float32
V/mm, 1.8/(1 + (d/3 mm)²) around a jittered left-STN contact, 0 below 0.2 V/mm) on the MNI
2 mm or 1 mm grid, `SELECT corr_map(efield, outcome, correction => 'none')`, against a
plain loop of dense sums n, Σx, Σx², Σxw and r per voxel. It also prints one site's share
as it travels (partials_to_doc + codec.pack, after k_min) against the same arrays dense.

`python bench/maps.py [--subjects 100] [--mm 2 1] [--repeat 3] [--corr-grid 2 1]
[--corr-subjects 100]`.
"""

from __future__ import annotations

import argparse
import asyncio
import gzip
import os
import statistics
import sys  # noqa: E402,I001 - after _common, which puts the repo on sys.path
import threading
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import psutil
from _common import ROOT, percentile, start_demo_sites, timed, workdir  # type: ignore[import-not-found]
from memory import PeakSampler  # type: ignore[import-not-found]

from stimctl.client import AsyncClient

sys.path.insert(0, str(ROOT))
from stimnet import codec  # noqa: E402
from stimnetd.privacy.suppress import suppress_small_cells  # noqa: E402
from stimnetd.query.aggregate import Partial  # noqa: E402
from stimnetd.query.fieldsums import chunk_field_sums  # noqa: E402
from stimnetd.query.partial_docs import partials_to_doc  # noqa: E402
from tests.helpers import client_config  # noqa: E402

QUERY = ("SELECT count_map(vta_path) AS c, mean_map(vta_path, improvement_pct) AS m, "
         "tmap(vta_path, improvement_pct, correction => 'none') AS t FROM dbs_outcomes")
# 2 mm voxel -> the eight 1 mm voxels it holds: voxel i' of the new grid is at old voxel
# coordinate (i' - 0.5) / 2.
TO_1MM = np.array([[0.5, 0, 0, -0.25], [0, 0.5, 0, -0.25], [0, 0, 0.5, -0.25], [0, 0, 0, 1]])


def to_1mm(root: Path, entry: dict) -> dict:
    for path in [*root.glob("images/vta/*.nii.gz"), *root.glob("rois/*.nii.gz")]:
        img = nib.load(path)
        data = np.asarray(img.dataobj)
        fine = data.repeat(2, 0).repeat(2, 1).repeat(2, 2)
        affine = img.affine @ TO_1MM
        out = nib.Nifti1Image(fine, affine, img.header)
        out.set_sform(affine, code=int(img.header["sform_code"]))
        out.set_qform(affine, code=int(img.header["qform_code"]))
        path.write_bytes(gzip.compress(out.to_bytes(), compresslevel=6, mtime=0))
    for f in entry["fields"].values():
        if f.get("max_voxels"):
            f["max_voxels"] *= 8
    return entry


def subjects_of(roots: list[Path]) -> list[tuple[Path, float]]:
    out = []
    for root in roots:
        rows = pd.read_csv(root / "stimulation.csv").merge(
            pd.read_csv(root / "outcomes.csv"), on="subject_id")
        out += [(root / rel, float(w)) for rel, w in
                zip(rows["vta_path"], rows["improvement_pct"], strict=True)
                if not (pd.isna(rel) or pd.isna(w))]
    return out


def dense_loop(files: list[tuple[Path, float]]) -> np.ndarray:
    n = s1 = s2 = None
    for path, w in files:
        m = np.asarray(nib.load(path).dataobj) > 0
        if n is None:
            n, s1, s2 = (np.zeros(m.shape) for _ in range(3))
        n += m
        s1 += w * m
        s2 += w * w * m
    assert n is not None
    return n


def sparse_loop(files: list[tuple[Path, float]]) -> np.ndarray:
    n = s1 = s2 = None
    for path, w in files:
        img = np.asarray(nib.load(path).dataobj)
        idx = np.flatnonzero(img > 0)
        if n is None:
            n, s1, s2 = (np.zeros(img.size) for _ in range(3))
        n[idx] += 1
        s1[idx] += w
        s2[idx] += w * w
    assert n is not None
    return n


def gunzip_only(files: list[tuple[Path, float]]) -> int:
    return sum(len(gzip.decompress(path.read_bytes())) for path, _ in files)


class Sampler:
    """Peak RSS of each daemon and of its child processes together (the decoding pool)."""

    def __init__(self, pids: list[int]) -> None:
        self.procs = [psutil.Process(p) for p in pids]
        self.own = dict.fromkeys(pids, 0.0)
        self.kids = dict.fromkeys(pids, 0.0)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            for p in self.procs:
                try:
                    self.own[p.pid] = max(self.own[p.pid], p.memory_info().rss / 2**20)
                    kids = sum(c.memory_info().rss for c in p.children(recursive=True))
                    self.kids[p.pid] = max(self.kids[p.pid], kids / 2**20)
                except psutil.Error:
                    pass
            time.sleep(0.05)

    def __enter__(self) -> Sampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


async def health_probe(addr: str, creds: object, stop: asyncio.Event) -> list[float]:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    out = []
    async with grpc.aio.secure_channel(addr, creds) as ch:
        stub = health_pb2_grpc.HealthStub(ch)
        while not stop.is_set():
            t = time.perf_counter()
            await stub.Check(health_pb2.HealthCheckRequest(), timeout=10)
            out.append(time.perf_counter() - t)
            await asyncio.sleep(0.02)
    return out


def touch(files: list[tuple[Path, float]]) -> None:
    now = time.time_ns()
    for path, _ in files:
        os.utime(path, ns=(now, now))


async def one(subjects: int, mm: int, repeat: int) -> None:
    import grpc

    tmp = workdir()
    procs, ports, _dbs, alice = await start_demo_sites(
        tmp, f"maps{mm}mm", subjects, prepare=to_1mm if mm == 1 else None,
        federation={"subjob_timeout_s": 600.0})
    roots = sorted(tmp.glob("catalog-*"))
    files = subjects_of(roots)
    addr = f"127.0.0.1:{ports[0]}"
    creds = grpc.ssl_channel_credentials(
        root_certificates=alice.ca.read_bytes(), private_key=alice.key.read_bytes(),
        certificate_chain=alice.cert.read_bytes())
    try:
        pids = [p.proc.pid for p in procs]
        async with AsyncClient(client_config(alice, addr, 1800)) as c:
            async def run() -> float:
                t = time.perf_counter()
                await c.query(QUERY, federated=True, min_sites=3)
                return time.perf_counter() - t

            first = await run()  # starts the pools, fills the caches
            with Sampler(pids) as sampler:
                cold = []
                for _ in range(repeat):
                    touch(files)
                    cold.append(await run())
                warm = [await run() for _ in range(repeat)]
            stop = asyncio.Event()
            idle_task = asyncio.create_task(health_probe(addr, creds, stop))
            await asyncio.sleep(max(2.0, statistics.median(cold)))
            stop.set()
            idle = await idle_task
            stop = asyncio.Event()
            busy_task = asyncio.create_task(health_probe(addr, creds, stop))
            touch(files)
            await run()
            stop.set()
            busy = await busy_task
            ans = await c.query(QUERY, federated=True, min_sites=3)
    finally:
        for p in procs:
            p.stop()
    dense = timed(lambda: dense_loop(files), repeat, warmup=False)
    sparse = timed(lambda: sparse_loop(files), repeat, warmup=False)
    gunzip = timed(lambda: gunzip_only(files), repeat, warmup=False)
    fc, fw = statistics.median(cold), statistics.median(warm)
    n_pooled = sparse_loop(files).reshape(ans.map_array("c", "count").shape)
    count = ans.map_array("c", "count")
    released = np.isfinite(count) & (count > 0)
    exact = bool(np.array_equal(count[released & (count == n_pooled)],
                                n_pooled[released & (count == n_pooled)]))
    print(f"3 sites x {subjects} subjects, {mm} mm, count_map + mean_map + tmap "
          f"({len(files)} files; a shared 2-core machine, other work running):")
    print(f"  loops over all files: dense {dense:.2f} s, sparse {sparse:.2f} s, "
          f"gunzip only {gunzip:.2f} s; federated first query {first:.2f} s")
    print(f"  federated cold {fc:.2f} s = {fc / dense:.2f}x dense, {fc / sparse:.2f}x sparse "
          f"(goal <= 0.5), {fc / gunzip:.2f}x gunzip-only (goal <= 1.0)")
    print(f"  federated warm {fw:.2f} s = {fw / dense:.3f}x dense, {fw / sparse:.3f}x sparse, "
          f"{fw / gunzip:.3f}x gunzip-only (goal <= 0.1)")
    print(f"  entry health p99: idle {percentile(idle, 99) * 1e3:.1f} ms ({len(idle)} probes), "
          f"during a cold query {percentile(busy, 99) * 1e3:.1f} ms ({len(busy)} probes): "
          f"ratio {percentile(busy, 99) / percentile(idle, 99):.2f} (goal <= 2)")
    print("  peak RSS during the cold and warm runs (daemon + its decoding workers): " + ", ".join(
        f"{'abc'[i]} {sampler.own[pid]:.0f} + {sampler.kids[pid]:.0f} MB"
        for i, pid in enumerate(pids)))
    print(f"  released counts equal the loop's where every site released a voxel: {exact} "
          f"({int((released & (count == n_pooled)).sum())} voxels)")


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


async def main(sizes: list[int], grids: list[int], repeat: int, corr_grids: list[int],
               corr_subjects: int) -> None:
    for mm in grids:
        for n in sizes:
            await one(n, mm, repeat)
    for mm in corr_grids:
        await one_corr(corr_subjects, mm, repeat)


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--subjects", type=int, nargs="*", default=[100], help="subjects per site")
    ap.add_argument("--mm", type=int, nargs="+", default=[2], choices=[1, 2],
                    help="the VTA maps on these MNI grids (mm)")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--corr-grid", type=int, nargs="*", default=[2], choices=sorted(GRIDS),
                    help="corr_map on these MNI grids (mm)")
    ap.add_argument("--corr-subjects", type=int, default=100, help="E-fields per site")
    args = ap.parse_args()
    asyncio.run(main(args.subjects, args.mm, args.repeat, args.corr_grid, args.corr_subjects))
