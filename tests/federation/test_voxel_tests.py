"""Voxel-wise tests (tmap, tmap2, prop_map) across three real daemons on loopback: with dp
off and k_min = 1 the maps the client gets (as NIfTI) equal scipy.stats on the pooled
subjects, FDR and Bonferroni included; at a larger k_min, voxels with too few subjects on
either side at a site are withheld and say so."""

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
SIZES = (14, 11, 17)
FIELDS = {
    "subject_id": {"table": "t", "type": "id"},
    "vta": {"table": "t", "type": "image", "max_voxels": int(np.prod(GRID))},
    "outcome": {"table": "t", "type": "numeric", "bounds": [-100, 100]},
}
SQL = ("SELECT tmap(vta, outcome, mu => 1) AS t1, "
       "tmap2(vta, outcome, correction => 'bonferroni', min_frac => 0.3) AS t2, "
       "prop_map(vta, outcome > 2, correction => 'fdr') AS pm FROM vt")


def _site(root: Path, i: int, rng: np.random.Generator) -> tuple[dict, pd.DataFrame, list]:
    """One site's catalog: random binary images (each voxel covered with probability
    0.55) and outcomes at 3 decimals, so sums are exact enough for 1e-9."""
    (root / "img").mkdir(parents=True)
    ids = [f"s{i}-{j}" for j in range(SIZES[i])]
    masks = []
    for sid in ids:
        mask = rng.random(GRID) < 0.55
        img = nib.Nifti1Image(mask.astype(np.uint8), AFFINE)
        img.set_sform(AFFINE, code="mni")
        img.set_qform(AFFINE, code="mni")
        nib.save(img, root / "img" / f"{sid}.nii.gz")
        masks.append(mask.ravel())
    df = pd.DataFrame({"subject_id": ids, "vta": [f"img/{s}.nii.gz" for s in ids],
                       "outcome": np.round(rng.normal(2.5, 4.0, len(ids)), 3)})
    df.to_csv(root / "t.csv", index=False)
    cat = {"name": "vt", "description": "random VTAs", "root": str(root),
           "subject_key": "subject_id", "tables": {"t": "t.csv"}, "fields": FIELDS}
    return cat, df, masks


@pytest.fixture
def three_sites(tmp_path: Path) -> tuple[list[list[dict]], np.ndarray, np.ndarray]:
    rng = np.random.default_rng(22)
    cats, weights, masks = [], [], []
    for i in range(3):
        cat, df, m = _site(tmp_path / f"vt{i}", i, rng)
        cats.append([cat])
        weights.append(df["outcome"].to_numpy())
        masks += m
    return cats, np.stack(masks), np.concatenate(weights)


def _close(got: np.ndarray, want: np.ndarray) -> None:
    np.testing.assert_allclose(np.asarray(got, dtype=np.float64).ravel(), want,
                               rtol=1e-5, atol=1e-9)


async def test_voxel_tests_equal_scipy_on_the_pooled_subjects(federation, three_sites,
                                                              tmp_path: Path) -> None:
    """tmap against mu, Welch tmap2 with a 30 % N-threshold and Bonferroni, prop_map with
    FDR: every voxel's statistic, p and corrected p is scipy's on the 42 pooled subjects.
    (The client's NIfTI is float32, hence rtol 1e-5.)"""
    cats, masks, w = three_sites
    async with federation(cats, privacy={"dp": "off"}, node={"k_min": 1}) as fed, fed.client() as c:
        ans = await c.query(SQL, federated=True, min_sites=3)
    assert {m["site"] for m in ans.manifest if m["state"] == "done"} == {"site-a", "site-b",
                                                                         "site-c"}
    voxels = range(masks.shape[1])
    img = ans.to_nifti("t1", "stat")
    assert img.shape == GRID and int(img.header["sform_code"]) == 4
    np.testing.assert_array_equal(img.affine, AFFINE)

    one = [stats.ttest_1samp(w[masks[:, v]], 1.0) for v in voxels]
    p1 = np.array([r.pvalue for r in one])
    _close(ans.to_nifti("t1", "stat").get_fdata(), np.array([r.statistic for r in one]))
    _close(ans.to_nifti("t1", "p").get_fdata(), p1)
    _close(ans.to_nifti("t1", "q").get_fdata(), stats.false_discovery_control(p1))
    _close(ans.to_nifti("t1", "count").get_fdata(), masks.sum(axis=0))

    n = masks.sum(axis=0)
    ok = np.minimum(n, len(w) - n) >= 0.3 * len(w)
    assert ok.any() and not ok.all()
    two = [stats.ttest_ind(w[masks[:, v]], w[~masks[:, v]], equal_var=False) for v in voxels]
    t2 = np.where(ok, [r.statistic for r in two], np.nan)
    p2 = np.where(ok, [r.pvalue for r in two], np.nan)
    _close(ans.map_array("t2", "stat"), t2)
    _close(ans.map_array("t2", "df"), np.where(ok, [r.df for r in two], np.nan))
    _close(ans.map_array("t2", "q"), np.where(ok, np.minimum(1.0, p2 * ok.sum()), np.nan))
    assert next(m for m in ans.maps if m["name"] == "t2")["tested_voxels"] == ok.sum()

    met = w > 2
    pm = [stats.binomtest(int(met[masks[:, v]].sum()), int(n[v]), met.mean()).pvalue
          for v in voxels]
    _close(ans.map_array("pm", "stat"), [met[masks[:, v]].mean() for v in voxels])
    _close(ans.map_array("pm", "p"), pm)
    q = stats.false_discovery_control(np.asarray(pm))
    _close(ans.map_array("pm", "q"), q)
    thr = ans.map_array("pm", "thresholded").ravel()
    np.testing.assert_array_equal(np.isfinite(thr), q <= 0.05)

    written = {p.name for p in ans.save_maps(tmp_path / "maps")}
    for which in ("stat", "p", "q", "thresholded", "df", "count"):
        assert {f"t1_{which}.nii.gz", f"t1_{which}.json", f"t1_{which}.png"} <= written
    assert "pm_df.nii.gz" not in written
    back = nib.load(tmp_path / "maps" / "t2_q.nii.gz")
    _close(back.get_fdata(), np.where(ok, np.minimum(1.0, p2 * ok.sum()), np.nan))


async def test_k_min_withholds_thin_sides_and_tests_over_the_releasing_sites(
        federation, three_sites) -> None:
    """At k_min = 4 a site withholds a voxel unless 4 of its subjects cover it and 4 do not;
    the entry tests each voxel over the subjects of the sites that released it, so t and p
    are scipy's on exactly those subjects, and `cohort` says how many there are."""
    cats, masks, w = three_sites
    async with federation(cats, privacy={"dp": "off"}, node={"k_min": 4}) as fed, \
            fed.client() as c:
        ans = await c.query("SELECT tmap2(vta, outcome) AS t FROM vt", federated=True,
                            min_sites=3)
    bounds = np.cumsum((0, *SIZES))
    site = np.repeat(np.arange(3), SIZES)
    released = np.zeros((3, masks.shape[1]), dtype=bool)
    for i, (lo, hi) in enumerate(zip(bounds[:-1], bounds[1:], strict=True)):
        n = masks[lo:hi].sum(axis=0)
        released[i] = (n >= 4) & (hi - lo - n >= 4)
    some = released.any(axis=0)
    assert some.any() and not released.all(axis=0).all() and (~released).any(axis=0).any()
    t, p, cohort = (ans.map_array("t", k).ravel() for k in ("stat", "p", "cohort"))
    np.testing.assert_array_equal(np.isfinite(t), some)
    for v in np.flatnonzero(some):
        mine = released[site, v]
        cov, rest = w[mine & masks[:, v]], w[mine & ~masks[:, v]]
        want = stats.ttest_ind(cov, rest, equal_var=False)
        assert t[v] == pytest.approx(want.statistic, rel=1e-5, abs=1e-9)
        assert p[v] == pytest.approx(want.pvalue, rel=1e-5, abs=1e-9)
        assert cohort[v] == mine.sum()
    entry = ans.maps[0]
    assert entry["partial_voxels"] == (some & ~released.all(axis=0)).sum()
    assert entry["tested_voxels"] == some.sum()
    assert any("tested over the subjects of the sites that released it" in note
               for note in ans.notes)


async def test_under_dp_the_sums_are_noised_charged_and_gated(federation, three_sites) -> None:
    """dp required: each site charges the query's epsilon (over the t-map's six arrays) and
    releases noised sums, gated on both sides; the entry's t-map is built from them, so
    it is not the exact one."""
    cats, masks, w = three_sites
    privacy = {"dp": "required", "budget_epsilon": 5000.0, "max_epsilon_per_query": 3000.0,
               "delta": 1e-6, "budget_delta": 1e-3}
    # k_min = 1: the gate is then the δ-margin alone (4 at this scale), which sites of 11
    # to 17 subjects can clear on both sides of most voxels.
    async with federation(cats, privacy=privacy, node={"k_min": 1}) as fed, \
            fed.client() as c:
        ans = await c.query("SELECT tmap(vta, outcome) AS t FROM vt", federated=True,
                            epsilon=3000.0, min_sites=3)
        spent = [await d.store.spent("alice", "vt") for d in fed.daemons]
    assert spent == [pytest.approx(3000.0)] * 3
    assert [(p["epsilon"], p["mechanism"]) for p in ans.privacy] == [(3000.0, "laplace")] * 3
    t = ans.map_array("t", "stat").ravel()
    exact = np.array([stats.ttest_1samp(w[masks[:, v]], 0.0).statistic
                      for v in range(masks.shape[1])])
    shown = np.isfinite(t)
    assert shown.any() and not np.allclose(t[shown], exact[shown])
    # Σw² per site carries Laplace noise of scale V·B²/(ε/6) = 120 · 100² · 6 / 3000 = 2400
    # (bounds [-100, 100]): the declared bounds, not the data, set the noise.
    assert ans.maps[0]["n"] == pytest.approx(len(w), abs=3)
