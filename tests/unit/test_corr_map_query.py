"""corr_map and a continuous image's mean_map as query aggregates: the sites' partials, k_min
on the covering side, DP sensitivities from the declared value bounds, and the entry's
answer against scipy.stats on the pooled data (the path a federated query takes, without
the daemons: tests/federation/test_corr_map.py has them)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from scipy import stats

from stimnet.errors import QueryError
from stimnet.query.fields import FieldMeta
from stimnet.query.spec import validate
from stimnet.query.sql import parse_sql
from stimnetd.privacy.noise import add_noise, sensitivities
from stimnetd.privacy.suppress import suppress_small_cells
from stimnetd.privacy.threshold import gate_noised, threshold
from stimnetd.query.combine import combine
from stimnetd.query.engine import compute
from stimnetd.query.result import finalize
from tests.unit.fakes import FakeCatalog, numeric

SHAPE = (3, 3, 2)
FIELDS = {
    "w": numeric("w", -100, 100),
    "ef": FieldMeta(name="ef", table="t", type="image", max_voxels=18, bounds=(0.0, 2.5),
                    continuous=True),
    "vta": FieldMeta(name="vta", table="t", type="image", max_voxels=18),
}


def sites(seed: int, sizes: tuple[int, ...], density: float = 0.5
          ) -> tuple[list[FakeCatalog], np.ndarray, np.ndarray]:
    """Random E-field images (each voxel non-zero with `density`, values in (0, 2.5) at two
    decimals) and weights at three decimals; one FakeCatalog per site. Returns the pooled
    images [subject, voxel] and weights."""
    rng = np.random.default_rng(seed)
    images: dict[str, np.ndarray] = {}
    frames = []
    for s, size in enumerate(sizes):
        paths = [f"s{s}-{i}.nii" for i in range(size)]
        for path in paths:
            x = np.round(rng.uniform(0.05, 2.5, SHAPE), 2)
            images[path] = np.where(rng.random(SHAPE) < density, x, 0.0).astype(np.float32)
        frames.append(pd.DataFrame({"subject_id": paths, "ef": paths, "vta": paths,
                                    "w": np.round(rng.normal(3, 5, size), 3)}))
    cats = [FakeCatalog(df, FIELDS, images=images, shape=SHAPE) for df in frames]
    pooled = pd.concat(frames, ignore_index=True)
    x = np.stack([images[p].ravel().astype(np.float64) for p in pooled["ef"]])
    return cats, x, pooled["w"].to_numpy()


def answer(sql: str, cats: list[FakeCatalog], k_min: int = 1):
    spec = parse_sql(sql)
    parts = [suppress_small_cells(compute(spec, c, clamp=False).partials, k_min)[0] for c in cats]
    res = finalize(spec, combine(parts))
    return res, {m["name"]: m for m in res.maps}


def pooled_pearson(x: np.ndarray, w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """scipy's r and p per voxel over every subject; NaN where x or w is constant (scipy
    warns and gives NaN there) or fewer than two subjects."""
    r, p = np.full(x.shape[1], np.nan), np.full(x.shape[1], np.nan)
    for v in range(x.shape[1]):
        if len(w) >= 2 and np.ptp(x[:, v]) > 0 and np.ptp(w) > 0:
            res = stats.pearsonr(x[:, v], w)
            r[v], p[v] = res.statistic, res.pvalue
    return r, p


# As tests/unit/test_voxelstats.py: one ulp of r near |r| = 1 moves pearsonr's p of a
# cohort of three by ~1e-8, hence an absolute tolerance on p and q.
P_TOL = {"rtol": 1e-8, "atol": 1e-6}


def _arrays(res, m: dict) -> dict[str, np.ndarray]:
    return {k: res.arrays[key].ravel() for k, key in
            {**m["arrays"], "count": m["count_key"]}.items()}


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(sizes=st.lists(st.integers(1, 9), min_size=1, max_size=5).filter(lambda s: sum(s) >= 2),
       seed=st.integers(0, 2**31 - 1), density=st.sampled_from([0.3, 0.6, 1.0]),
       min_n=st.integers(0, 4))
def test_corr_map_equals_pearsonr_on_the_pooled_subjects(sizes: list[int], seed: int,
                                                         density: float, min_n: int) -> None:
    """1 to 5 sites, dp off, k_min = 1: r and p per voxel are scipy.stats.pearsonr over
    the pooled cohort (x = 0 where an image is zero); q is false_discovery_control, or
    min(1, m p), over the voxels the N-threshold leaves; mean_map is the mean value."""
    cats, x, w = sites(seed, tuple(sizes), density)
    res, maps = answer(f"SELECT corr_map(ef, w, min_n => {min_n}) AS r, "
                       f"corr_map(ef, w, correction => 'bonferroni') AS rb, "
                       "mean_map(ef) AS m FROM t", cats)
    r, p = pooled_pearson(x, w)
    count = (x != 0).sum(axis=0)
    kept = count >= min_n
    got = _arrays(res, maps["r"])
    np.testing.assert_allclose(got["stat"], np.where(kept, r, np.nan), rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(got["p"], np.where(kept, p, np.nan), **P_TOL)
    np.testing.assert_allclose(got["df"], np.where(kept & np.isfinite(r), len(w) - 2, np.nan))
    np.testing.assert_array_equal(got["count"], np.where(count > 0, count, np.nan))
    tested = kept & np.isfinite(p)
    assert maps["r"]["tested_voxels"] == tested.sum()
    if tested.any():
        np.testing.assert_allclose(got["q"][tested], stats.false_discovery_control(p[tested]),
                                   **P_TOL)
    assert not np.isfinite(got["q"][~tested]).any()
    np.testing.assert_array_equal(np.isfinite(got["thresholded"]), got["q"] <= 0.05)
    bonf = _arrays(res, maps["rb"])
    every = np.isfinite(p)
    np.testing.assert_allclose(bonf["q"][every], np.minimum(1.0, p[every] * every.sum()),
                               **P_TOL)
    mean = _arrays(res, maps["m"])
    np.testing.assert_allclose(mean["mean"], np.where(count > 0, x.mean(axis=0), np.nan),
                               rtol=1e-12, atol=1e-12)
    assert maps["m"]["n"] == len(w) == maps["r"]["n"]


@pytest.mark.parametrize("sql, message", [
    ("SELECT corr_map(vta, w) FROM t", "corr_map needs a continuous image field"),
    ("SELECT mean_map(ef, w) FROM t", "takes no weight"),
    ("SELECT corr_map(ef, w, mu => 1) FROM t", "unknown option 'mu'"),
    ("SELECT corr_map(ef) FROM t", "takes exactly 2 fields"),
])
def test_wrong_corr_map_calls_are_refused_naming_the_rule(sql: str, message: str) -> None:
    cats, _, _ = sites(1, (3,))
    with pytest.raises(QueryError, match=message):
        validate(parse_sql(sql), cats[0].fields)


def test_k_min_withholds_thin_voxels_on_the_covering_side_only() -> None:
    """A voxel every subject has a value at is released (the not-covering subjects have
    x = 0 and no per-voxel sum of w is sent); one with fewer than k_min values is not, and
    the entry correlates it over the sites that released it."""
    cats, x, w = sites(7, (10, 12), density=0.7)
    spec = parse_sql("SELECT corr_map(ef, w) AS r FROM t")
    (p,) = compute(spec, cats[0], clamp=False).partials
    assert sorted(p.stats) == ["count", "sx", "sxw", "sxx", "total_n", "total_sum",
                               "total_sum2"]
    counts = p.stats["count"].ravel()
    (out,), _ = suppress_small_cells([p], 6)
    np.testing.assert_array_equal(out.cell_mask.ravel(), counts < 6)
    assert (counts == 10).any() and (counts < 6).any()
    res, maps = answer("SELECT corr_map(ef, w) AS r FROM t", cats, k_min=6)
    got = _arrays(res, maps["r"])
    site = np.repeat([0, 1], (10, 12))
    released = np.stack([(x[site == i] != 0).sum(axis=0) >= 6 for i in (0, 1)])
    for v in range(x.shape[1]):
        mine = released[site, v]
        if mine.any():
            want = stats.pearsonr(x[mine, v], w[mine]).statistic
            assert got["stat"][v] == pytest.approx(want, rel=1e-9)
            assert got["cohort"][v] == mine.sum()
        else:
            assert np.isnan(got["stat"][v])


class _Exact:
    def laplace(self, v: np.ndarray, scale: float) -> np.ndarray:
        return np.asarray(v, dtype=np.float64)

    def discrete_laplace(self, v: np.ndarray, scale: float) -> np.ndarray:
        return np.asarray(v, dtype=np.float64)


def test_dp_noises_the_sums_at_the_declared_value_and_weight_bounds() -> None:
    """corr_map's seven arrays at V, V·X, V·X², V·X·W, 1, W, W² (X = 2.5 from the image's
    bounds, W = 100 from the weight's), mean_map's three at V, V·X, 1; the gate masks the
    covering side only; values beyond the bounds are clamped under DP."""
    cats, _, _ = sites(4, (40,), density=0.8)
    spec = parse_sql("SELECT corr_map(ef, w) AS r, mean_map(ef) AS m FROM t")
    r, m = compute(spec, cats[0], clamp=True).partials
    assert sensitivities(r, FIELDS) == {"count": 18, "sx": 45, "sxx": 112.5, "sxw": 4500,
                                        "total_n": 1, "total_sum": 100, "total_sum2": 10000}
    noised, report = add_noise([r, m], FIELDS, 1000.0, _Exact(), partitioned=True)
    assert sorted(a.stat for a in report.arrays if a.output == "m") == \
        ["count", "sx", "total_n"]
    assert report.epsilon == pytest.approx(1000.0)
    gated, _ = gate_noised(noised, report, 30, 1e-6)
    scale = next(a.scale for a in report.arrays if (a.output, a.stat) == ("r", "count"))
    counts = r.stats["count"].ravel()
    want = counts < threshold(30, scale, 1e-6)
    assert want.any() and not want.all()
    np.testing.assert_array_equal(gated[0].cell_mask.ravel(), want)


def test_values_beyond_the_bounds_are_clamped_under_dp_only() -> None:
    cats, x, _ = sites(5, (6,), density=1.0)
    img = cats[0].load_image("s0-0.nii")
    img[0, 0, 0] = 9.0
    spec = parse_sql("SELECT mean_map(ef) AS m FROM t")
    (exact,) = compute(spec, cats[0], clamp=False).partials
    (clamped,) = compute(spec, cats[0], clamp=True).partials
    assert exact.stats["sx"][0, 0, 0] - clamped.stats["sx"][0, 0, 0] == pytest.approx(6.5)
