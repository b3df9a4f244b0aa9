"""corr_map and mean_map of a continuous image (float32 E-field magnitudes) across three
real daemons on loopback: with dp off and k_min = 1 the client's maps (as NIfTI) equal
scipy.stats.pearsonr and the mean on the pooled subjects, FDR included; under DP each
site noises and charges the sums at the declared value and weight bounds."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
from scipy import stats

GRID = (6, 5, 4)
AFFINE = np.diag([2.0, 2.0, 2.0, 1.0])
AFFINE[:3, 3] = [-6.0, -5.0, -4.0]
SIZES = (13, 10, 16)
FIELDS = {
    "subject_id": {"table": "t", "type": "id"},
    "efield": {"table": "t", "type": "image", "continuous": True, "bounds": [0, 2],
               "unit": "V/mm", "max_voxels": int(np.prod(GRID))},
    "outcome": {"table": "t", "type": "numeric", "bounds": [-100, 100]},
}


def _site(root: Path, i: int, rng: np.random.Generator) -> tuple[dict, pd.DataFrame, list]:
    """One site's catalog: E-field magnitudes falling off from a random contact, zero
    below 0.2 V/mm (as thresholded E-fields are), at 2 decimals; outcomes at 3."""
    (root / "img").mkdir(parents=True)
    ids = [f"s{i}-{j}" for j in range(SIZES[i])]
    grid = np.stack(np.meshgrid(*(np.arange(s) for s in GRID), indexing="ij"), axis=-1)
    fields = []
    for sid in ids:
        contact = rng.uniform((1, 1, 1), np.array(GRID) - 2)
        dist = np.linalg.norm(grid - contact, axis=-1)
        x = np.round(np.clip(1.8 * np.exp(-dist / 1.2), 0, 2), 2).astype(np.float32)
        x[x < 0.2] = 0.0
        img = nib.Nifti1Image(x, AFFINE)
        img.set_sform(AFFINE, code="mni")
        img.set_qform(AFFINE, code="mni")
        nib.save(img, root / "img" / f"{sid}.nii.gz")
        fields.append(x.ravel().astype(np.float64))
    df = pd.DataFrame({"subject_id": ids, "efield": [f"img/{s}.nii.gz" for s in ids],
                       "outcome": np.round(rng.normal(30, 12, len(ids)), 3)})
    df.to_csv(root / "t.csv", index=False)
    cat = {"name": "ef", "description": "random E-fields", "root": str(root),
           "subject_key": "subject_id", "tables": {"t": "t.csv"}, "fields": FIELDS}
    return cat, df, fields


@pytest.fixture
def three_sites(tmp_path: Path) -> tuple[list[list[dict]], np.ndarray, np.ndarray]:
    rng = np.random.default_rng(23)
    cats, weights, images = [], [], []
    for i in range(3):
        cat, df, x = _site(tmp_path / f"ef{i}", i, rng)
        cats.append([cat])
        weights.append(df["outcome"].to_numpy())
        images += x
    return cats, np.stack(images), np.concatenate(weights)


def _close(got: np.ndarray, want: np.ndarray) -> None:
    np.testing.assert_allclose(np.asarray(got, dtype=np.float64).ravel(), want,
                               rtol=1e-5, atol=1e-7)


async def test_corr_map_and_mean_map_equal_scipy_on_the_pooled_subjects(
        federation, three_sites, tmp_path: Path) -> None:
    """Every voxel's r, p and FDR q is scipy's on the 39 pooled subjects (x = 0 where an
    image is zero), voxels with fewer than 8 non-zero subjects untested (min_n); the mean
    map is the pooled mean value; both come as MNI NIfTI with sidecars and PNGs."""
    cats, x, w = three_sites
    sql = ("SELECT corr_map(efield, outcome, min_n => 8) AS r, mean_map(efield) AS m "
           "FROM ef")
    async with federation(cats, privacy={"dp": "off"}, node={"k_min": 1}) as fed, \
            fed.client() as c:
        ans = await c.query(sql, federated=True, min_sites=3)
        efield = next(f for f in (await c.describe("ef")).fields if f.name == "efield")
    # The catalog says which images are values with a range, not masks.
    assert (efield.type, efield.continuous, efield.has_bounds, efield.lower, efield.upper) == (
        "image", True, True, 0.0, 2.0)
    assert {m["site"] for m in ans.manifest if m["state"] == "done"} == {"site-a", "site-b",
                                                                         "site-c"}
    count = (x != 0).sum(axis=0)
    tested = (count >= 8) & (np.ptp(x, axis=0) > 0)
    assert tested.any() and not tested.all()
    r, p = np.full(x.shape[1], np.nan), np.full(x.shape[1], np.nan)
    for v in np.flatnonzero(tested):
        res = stats.pearsonr(x[:, v], w)
        r[v], p[v] = res.statistic, res.pvalue
    img = ans.to_nifti("r", "stat")
    assert img.shape == GRID and int(img.header["sform_code"]) == 4
    _close(img.get_fdata(), r)
    _close(ans.map_array("r", "p"), p)
    q = np.full(x.shape[1], np.nan)
    q[tested] = stats.false_discovery_control(p[tested])
    _close(ans.map_array("r", "q"), q)
    _close(ans.map_array("r", "count"), np.where(count > 0, count, np.nan))
    entry = next(m for m in ans.maps if m["name"] == "r")
    assert (entry["func"], entry["n"], entry["tested_voxels"]) == ("corr_map", len(w),
                                                                  tested.sum())
    _close(ans.map_array("m"), np.where(count > 0, x.mean(axis=0), np.nan))

    written = {p.name for p in ans.save_maps(tmp_path / "maps")}
    assert {"r_stat.nii.gz", "r_stat.json", "r_stat.png", "r_q.nii.gz", "m_mean.nii.gz",
            "m_mean.json", "m_mean.png"} <= written
    assert ans.sidecar("r", "q")["correction"] == "fdr_bh"
    _close(nib.load(tmp_path / "maps" / "r_q.nii.gz").get_fdata(), q)


async def test_under_dp_the_sums_are_noised_at_the_declared_bounds_and_charged(
        federation, three_sites) -> None:
    """dp required: each site charges the query's epsilon and releases noised sums, so the
    entry's r is not the exact one; n is the noised cohort."""
    cats, x, w = three_sites
    privacy = {"dp": "required", "budget_epsilon": 5000.0, "max_epsilon_per_query": 3000.0,
               "delta": 1e-6, "budget_delta": 1e-3}
    async with federation(cats, privacy=privacy, node={"k_min": 1}) as fed, \
            fed.client() as c:
        ans = await c.query("SELECT corr_map(efield, outcome) AS r FROM ef", federated=True,
                            epsilon=3000.0, min_sites=3)
        spent = [await d.store.spent("alice", "ef") for d in fed.daemons]
    assert spent == [pytest.approx(3000.0)] * 3
    assert [(p["epsilon"], p["mechanism"]) for p in ans.privacy] == [(3000.0, "laplace")] * 3
    got = ans.map_array("r", "stat").ravel()
    exact = np.array([stats.pearsonr(x[:, v], w).statistic if np.ptp(x[:, v]) > 0 else np.nan
                      for v in range(x.shape[1])])
    shown = np.isfinite(got) & np.isfinite(exact)
    assert shown.any() and not np.allclose(got[shown], exact[shown])
    assert ans.maps[0]["n"] == pytest.approx(len(w), abs=3)
