"""Per-voxel sufficient statistics: federated == pooled, and every derived map equals
scipy.stats computed voxel by voxel on the pooled subjects (1–5 sites, 4×4×3 grids)."""

from __future__ import annotations

import warnings
from collections.abc import Callable

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from scipy import stats

from stimnetd.query.voxelmaps import (
    VoxelMap,
    Why,
    binomtest_pvalue,
    bonferroni,
    corr_map,
    fdr_bh,
    mean_map,
    n_threshold,
    prop_map,
    thresholded,
    tmap,
    tmap2,
)
from stimnetd.query.voxelstats import (
    CohortTotals,
    CoverageStats,
    FieldStats,
    coverage_stats,
    coverage_stats_dense,
    field_stats,
    field_stats_dense,
    stats_size,
    support_bound,
)

GRID = (4, 4, 3)
VOXELS = int(np.prod(GRID))
# Quarter steps (and x in 1/64 steps, float32-exact): every Σ is exact, so zero variance is
# exactly zero and federated sums equal pooled ones bit for bit.
QUARTERS = st.integers(-400, 400).map(lambda i: i / 4)
FAST = settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
# A true zero (r or t) comes out of scipy's differently ordered sums as ~1e-17, never
# exactly 0: an absolute floor far below any statistic's meaningful digits.
STAT_TOL = {"rtol": 1e-9, "atol": 1e-12}
# At |r| = 1 (collinear data, common with three subjects) p is ill-conditioned: one ulp of
# r moves pearsonr's p for n = 3 from 0 to 2·(2/π)·sqrt(eps/2) = 1.3e-8, hence an absolute
# floor besides the relative bound. From sums (Σx², (Σx)²) rather than centred data, r
# near 1 is a few hundred ulps off, which moves p by up to ~3e-7 (hypothesis seed 8).
P_TOL = {"rtol": 1e-8, "atol": 1e-6}

Site = tuple[np.ndarray, np.ndarray]  # masks or images [subject, *GRID], weights [subject]


def _masks(bits: list[int]) -> np.ndarray:
    """One subject per integer: bit v set = voxel v covered (cheap to draw, shrinks to sparse)."""
    flat = [[(b >> v) & 1 for v in range(VOXELS)] for b in bits]
    return np.array(flat, dtype=bool).reshape(len(bits), *GRID)


@st.composite
def coverage_sites(draw: st.DrawFn) -> list[Site]:
    out = []
    for _ in range(draw(st.integers(1, 5))):
        k = draw(st.integers(0, 6))
        masks = _masks(draw(st.lists(st.integers(0, 2**VOXELS - 1), min_size=k, max_size=k)))
        weights = np.array(draw(st.lists(QUARTERS, min_size=k, max_size=k)), dtype=np.float64)
        out.append((masks, weights))
    return out


@st.composite
def field_sites(draw: st.DrawFn) -> list[Site]:
    """Coverage sites whose covered voxels get values in 1/64 steps from 1, 3 or 256 levels
    (few levels make constant x among covering subjects likely)."""
    out = []
    for masks, weights in draw(coverage_sites()):
        rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
        steps = rng.integers(1, draw(st.sampled_from([1, 3, 256])) + 1, size=masks.shape)
        out.append((np.where(masks, steps / 64, 0).astype(np.float32), weights))
    return out


def pooled(sites: list[Site]) -> Site:
    return (np.concatenate([s[0] for s in sites]).reshape(-1, *GRID),
            np.concatenate([s[1] for s in sites]))


def federated_coverage(sites: list[Site]) -> CoverageStats:
    return CoverageStats.combine([coverage_stats_dense(m, w) for m, w in sites])


def federated_field(sites: list[Site]) -> FieldStats:
    return FieldStats.combine([field_stats_dense(x, w) for x, w in sites])


def per_voxel(images: np.ndarray, fn: Callable[[np.ndarray], tuple[float, float, Why]]) -> tuple:
    """fn(column of subject values at one voxel) -> (statistic, p, why), over the grid."""
    cols = images.reshape(images.shape[0], VOXELS)
    stat, p, why = zip(*(fn(cols[:, v]) for v in range(VOXELS)), strict=True)
    return (np.array(stat).reshape(GRID), np.array(p).reshape(GRID),
            np.array(why, dtype=np.uint8).reshape(GRID))


def assert_map(m: VoxelMap, want: tuple) -> None:
    stat, p, why = want
    np.testing.assert_array_equal(m.dense("why"), why)
    np.testing.assert_allclose(m.dense("statistic"), stat, equal_nan=True, **STAT_TOL)
    np.testing.assert_allclose(m.dense("pvalue"), p, equal_nan=True, **P_TOL)
    assert np.isinf(m.statistic).sum() + np.isinf(m.pvalue).sum() == 0


NAN = float("nan")


def undefined(why: Why) -> tuple[float, float, Why]:
    return NAN, NAN, why


def one_sample(w: np.ndarray, mu0: float) -> Callable[[np.ndarray], tuple[float, float, Why]]:
    def at(covered: np.ndarray) -> tuple[float, float, Why]:
        a = w[covered]
        if a.size == 0:
            return undefined(Why.UNCOVERED)
        if a.size < 2:
            return undefined(Why.TOO_FEW)
        if np.all(a == a[0]):
            return undefined(Why.ZERO_VARIANCE)
        r = stats.ttest_1samp(a, mu0)
        return float(r.statistic), float(r.pvalue), Why.DEFINED
    return at


def welch(w: np.ndarray) -> Callable[[np.ndarray], tuple[float, float, Why]]:
    def at(covered: np.ndarray) -> tuple[float, float, Why]:
        a, b = w[covered], w[~covered]
        if a.size == 0:
            return undefined(Why.UNCOVERED)
        if a.size < 2 or b.size < 2:
            return undefined(Why.TOO_FEW)
        if np.all(a == a[0]) and np.all(b == b[0]):
            return undefined(Why.ZERO_VARIANCE)
        with warnings.catch_warnings():
            # scipy flags a constant group as precision loss; its variance 0 is exact here
            warnings.simplefilter("ignore", RuntimeWarning)
            r = stats.ttest_ind(a, b, equal_var=False)
        return float(r.statistic), float(r.pvalue), Why.DEFINED
    return at


def pearson(w: np.ndarray, over: str) -> Callable[[np.ndarray], tuple[float, float, Why]]:
    def at(x: np.ndarray) -> tuple[float, float, Why]:
        if not np.any(x != 0):
            return undefined(Why.UNCOVERED)
        keep = x != 0 if over == "covering" else np.ones(x.size, dtype=bool)
        a, b = x[keep].astype(np.float64), w[keep]
        if a.size < 2:
            return undefined(Why.TOO_FEW)
        if np.all(a == a[0]) or np.all(b == b[0]):
            return undefined(Why.ZERO_VARIANCE)
        r = stats.pearsonr(a, b)
        return float(r.statistic), float(r.pvalue), Why.DEFINED
    return at


@FAST
@given(coverage_sites())
def test_coverage_federated_sum_equals_pooled(sites: list[Site]) -> None:
    """The sites' coverage statistics summed (combine or +) equal those of the pooled subjects, exactly."""
    masks, w = pooled(sites)
    fed, pool = federated_coverage(sites), coverage_stats_dense(masks, w)
    added = coverage_stats_dense(*sites[0])
    for m, wi in sites[1:]:
        added = added + coverage_stats_dense(m, wi)
    for s in (fed, added):
        assert {k: v.tolist() for k, v in s.dense().items()} == {k: v.tolist() for k, v in pool.dense().items()}
        assert s.voxels.tolist() == pool.voxels.tolist()
        assert s.totals == CohortTotals(len(w), float(w.sum()), float((w * w).sum()))
    assert pool.n.tolist() == masks.reshape(len(w), VOXELS).sum(axis=0)[pool.voxels].tolist()


@FAST
@given(field_sites())
def test_field_federated_sum_equals_pooled(sites: list[Site]) -> None:
    """The sites' field statistics summed equal those of the pooled subjects, exactly, and Σx, Σx², Σxw are numpy's."""
    x, w = pooled(sites)
    fed, pool = federated_field(sites), field_stats_dense(x, w)
    assert {k: v.tolist() for k, v in fed.dense().items()} == {k: v.tolist() for k, v in pool.dense().items()}
    assert fed.totals == pool.totals
    flat = x.reshape(len(w), VOXELS).astype(np.float64)
    assert pool.dense()["sxw"].ravel().tolist() == (flat * w[:, None]).sum(axis=0).tolist()
    assert pool.dense()["n"].ravel().tolist() == (flat != 0).sum(axis=0).tolist()


@FAST
@given(coverage_sites(), st.integers(1, 40))
def test_streamed_chunks_equal_one_batch(sites: list[Site], chunk: int) -> None:
    """Building from index lists in chunks of any size gives the statistics of building in one batch."""
    masks, w = pooled(sites)
    subjects = [(np.flatnonzero(masks[i]), float(w[i])) for i in range(len(w))]
    small = coverage_stats(GRID, subjects, chunk_entries=chunk)
    whole = coverage_stats_dense(masks, w)
    assert {k: v.tolist() for k, v in small.dense().items()} == {k: v.tolist() for k, v in whole.dense().items()}
    x = np.where(masks, 1.5, 0.0)
    fsmall = field_stats(GRID, [(np.flatnonzero(x[i]), x[i][x[i] != 0], w[i]) for i in range(len(w))],
                         chunk_entries=chunk)
    assert {k: v.tolist() for k, v in fsmall.dense().items()} == \
        {k: v.tolist() for k, v in field_stats_dense(x, w).dense().items()}


@FAST
@given(coverage_sites(), st.sampled_from([0.0, 12.5, -3.25]))
def test_tmap_equals_ttest_1samp(sites: list[Site], mu0: float) -> None:
    """tmap's t, p and undefined voxels equal scipy.stats.ttest_1samp of the covering subjects' weights against mu0."""
    masks, w = pooled(sites)
    m = tmap(federated_coverage(sites), mu0)
    assert_map(m, per_voxel(masks, one_sample(w, mu0)))
    np.testing.assert_array_equal(m.dense("df"), np.where(m.dense("why") == Why.DEFINED, m.dense("n") - 1.0, np.nan))


@FAST
@given(coverage_sites())
def test_tmap2_equals_welch_ttest_ind(sites: list[Site]) -> None:
    """tmap2's t and p equal scipy.stats.ttest_ind(covering, not covering, equal_var=False) at every voxel."""
    masks, w = pooled(sites)
    assert_map(tmap2(federated_coverage(sites)), per_voxel(masks, welch(w)))


@FAST
@given(field_sites(), st.sampled_from(["cohort", "covering"]))
def test_corr_map_equals_pearsonr(sites: list[Site], over: str) -> None:
    """corr_map's r and p equal scipy.stats.pearsonr of image value and weight, over the cohort or the covering subjects."""
    x, w = pooled(sites)
    m = corr_map(federated_field(sites), over)
    assert_map(m, per_voxel(x, pearson(w, over)))


@FAST
@given(coverage_sites(), st.sampled_from([-50.0, 0.0, 25.0]))
def test_prop_map_equals_binomtest(sites: list[Site], cut: float) -> None:
    """prop_map's fraction and p equal scipy.stats.binomtest(k, n, cohort rate) of covering subjects with weight > cut."""
    masks, w = pooled(sites)
    meets = (w > cut).astype(np.float64)
    fed = CoverageStats.combine([coverage_stats_dense(m, (wi > cut).astype(float)) for m, wi in sites])
    rate = meets.sum() / meets.size if meets.size else 0.0

    def at(covered: np.ndarray) -> tuple[float, float, Why]:
        k, n = int(meets[covered].sum()), int(covered.sum())
        if n == 0:
            return undefined(Why.UNCOVERED)
        return k / n, float(stats.binomtest(k, n, rate).pvalue), Why.DEFINED

    stat, p, why = per_voxel(masks, at)
    m = prop_map(fed)
    np.testing.assert_array_equal(m.dense("why"), why)
    np.testing.assert_array_equal(m.dense("statistic"), stat)
    np.testing.assert_allclose(m.dense("pvalue"), p, rtol=1e-12, atol=0, equal_nan=True)


def test_binomtest_pvalue_matches_scipy_on_every_small_table() -> None:
    """binomtest_pvalue equals scipy.stats.binomtest's two-sided p bit for bit for every k <= n <= 20 at several rates."""
    k, n = np.array([(k, n) for n in range(1, 21) for k in range(n + 1)], dtype=np.float64).T
    for rate in (0.0, 0.1, 1 / 3, 0.5, 0.55, 0.9, 1.0):
        want = [stats.binomtest(int(ki), int(ni), rate).pvalue for ki, ni in zip(k, n, strict=True)]
        assert binomtest_pvalue(k, n, rate).tolist() == want


@FAST
@given(coverage_sites(), st.integers(0, 8), st.sampled_from([0.05, 0.2]))
def test_fdr_and_bonferroni_equal_scipy(sites: list[Site], min_n: int, alpha: float) -> None:
    """After an N-threshold, FDR (BH) and Bonferroni over the remaining voxels equal false_discovery_control and min(1, m·p) of scipy's pooled p-values."""
    masks, w = pooled(sites)
    m = n_threshold(tmap(federated_coverage(sites)), min_n=min_n)
    _, p_want, _ = per_voxel(masks, one_sample(w, 0.0))
    p_want = np.where(masks.reshape(len(w), *GRID).sum(axis=0) >= min_n, p_want, np.nan).ravel()
    tested = np.isfinite(p_want)
    q_want = np.full(VOXELS, np.nan)
    if tested.any():
        q_want[tested] = stats.false_discovery_control(p_want[tested])
    np.testing.assert_allclose(m.dense("pvalue").ravel(), p_want, equal_nan=True, **P_TOL)
    np.testing.assert_allclose(fdr_bh(m.dense("pvalue")).ravel(), q_want, equal_nan=True, **P_TOL)
    bonf = np.minimum(1.0, p_want * tested.sum())
    np.testing.assert_allclose(bonferroni(m.dense("pvalue")).ravel(), bonf, equal_nan=True, **P_TOL)
    for correction, q in (("fdr_bh", fdr_bh(m.pvalue)), ("bonferroni", bonferroni(m.pvalue))):
        t = thresholded(m, alpha, correction)
        assert t.correction == correction
        np.testing.assert_array_equal(t.qvalue, q)
        keep = q <= alpha
        np.testing.assert_array_equal(t.statistic[keep], m.statistic[keep])
        assert np.count_nonzero(np.isfinite(t.statistic[~keep])) == 0
        np.testing.assert_array_equal(t.pvalue, m.pvalue)
        assert t.why[~keep & (m.why == Why.DEFINED)].tolist() == [Why.NOT_SIGNIFICANT] * int(
            (~keep & (m.why == Why.DEFINED)).sum())


def test_fdr_bh_matches_scipy_with_ties_and_nan() -> None:
    """fdr_bh equals false_discovery_control on the finite p-values, ties included, and leaves NaN where no test ran."""
    p = np.array([0.01, np.nan, 0.04, 0.04, 0.2, 0.001, np.nan, 0.5, 1.0])
    finite = np.isfinite(p)
    want = np.full(p.size, np.nan)
    want[finite] = stats.false_discovery_control(p[finite])
    np.testing.assert_array_equal(fdr_bh(p), want)
    np.testing.assert_array_equal(fdr_bh(np.array([0.3, np.nan])), [0.3, np.nan])
    np.testing.assert_array_equal(bonferroni(p), np.minimum(1.0, p * 7))


def test_n_threshold_masks_by_count_and_fraction() -> None:
    """min_n and min_frac mask voxels covered by fewer subjects (both_sides also by too few not covering), keeping earlier reasons."""
    masks = np.zeros((10, *GRID), dtype=bool)
    flat = masks.reshape(10, -1)
    for v, k in enumerate([1, 2, 3, 5, 9, 10]):
        flat[:k, v] = True
    w = np.arange(10, dtype=np.float64)
    m = tmap(coverage_stats_dense(masks, w))
    assert m.n.tolist() == [1, 2, 3, 5, 9, 10]
    assert n_threshold(m, min_n=3).why.tolist() == [Why.TOO_FEW, 4, 0, 0, 0, 0]
    assert n_threshold(m, min_frac=0.5).why.tolist() == [Why.TOO_FEW, 4, 4, 0, 0, 0]
    assert n_threshold(m, min_n=2, both_sides=True).why.tolist() == [Why.TOO_FEW, 0, 0, 0, 4, 4]
    assert np.isnan(n_threshold(m, min_n=5).statistic[:3]).tolist() == [True, True, True]
    assert n_threshold(m, min_n=5).statistic[3:].tolist() == m.statistic[3:].tolist()


def test_undefined_voxels_are_nan_with_reasons() -> None:
    """Voxels with one covering subject, constant outcomes or an empty other group are NaN (never inf) with the reason."""
    masks = np.zeros((4, *GRID), dtype=bool)
    masks[0, 0, 0, 0] = True  # one subject
    masks[:2, 0, 0, 1] = True  # two subjects with the same weight
    masks[:3, 0, 0, 2] = True  # three, varying: defined
    masks[:, 0, 1, 0] = True  # everyone: no one left to compare with
    s = coverage_stats_dense(masks, np.array([2.0, 2.0, 5.0, 7.0]))
    one, two = tmap(s), tmap2(s)
    assert one.why.tolist() == [Why.TOO_FEW, Why.ZERO_VARIANCE, Why.DEFINED, Why.DEFINED]
    # covering [2, 2] against [5, 7]: one group constant, Welch still defined
    assert two.why.tolist() == [Why.TOO_FEW, Why.DEFINED, Why.TOO_FEW, Why.TOO_FEW]
    assert np.isfinite(one.statistic).tolist() == [False, False, True, True]
    assert np.isfinite(one.pvalue).tolist() == [False, False, True, True]
    assert np.isfinite(two.statistic).tolist() == [False, True, False, False]
    assert two.df[1] == 1.0
    assert one.dense("why")[3, 3, 2] == Why.UNCOVERED
    flat = field_stats_dense(np.where(masks, 1.0, 0.0).astype(np.float32), np.full(4, 3.0))
    assert corr_map(flat).why.tolist() == [Why.ZERO_VARIANCE] * 4


def test_tmaps_with_real_valued_outcomes_match_scipy() -> None:
    """With real-valued outcomes (no exact sums), tmap and tmap2 still equal scipy to float tolerance."""
    rng = np.random.default_rng(22)
    masks = rng.random((3, 40, *GRID)) < 0.4
    w = rng.normal(40.0, 25.0, size=(3, 40))
    s = CoverageStats.combine([coverage_stats_dense(masks[i], w[i]) for i in range(3)])
    allm, allw = masks.reshape(120, *GRID), w.ravel()
    assert_map(tmap(s, 30.0), per_voxel(allm, one_sample(allw, 30.0)))
    assert_map(tmap2(s), per_voxel(allm, welch(allw)))


@FAST
@given(field_sites())
def test_mean_map_equals_numpy(sites: list[Site]) -> None:
    """mean_map is numpy's mean of the image over the cohort, or over the subjects with a non-zero value."""
    x, w = pooled(sites)
    s = federated_field(sites)
    if len(w) == 0:
        assert s.voxels.size == 0
        return
    flat = x.reshape(len(w), VOXELS).astype(np.float64)
    cover = s.dense()["n"].ravel() > 0
    cohort = mean_map(s, "cohort").dense().ravel()
    np.testing.assert_allclose(cohort[cover], flat.mean(axis=0)[cover], rtol=1e-12)
    covering = mean_map(s, "covering").dense().ravel()
    sums, counts = flat.sum(axis=0), (flat != 0).sum(axis=0)
    np.testing.assert_allclose(covering[cover], sums[cover] / counts[cover], rtol=1e-12)
    assert np.count_nonzero(np.isfinite(cohort[~cover])) == 0


def test_dense_round_trip() -> None:
    """from_dense(dense()) gives back the same sparse statistics for both kinds."""
    rng = np.random.default_rng(3)
    x = np.where(rng.random((5, *GRID)) < 0.3, rng.random((5, *GRID)), 0).astype(np.float32)
    w = rng.normal(size=5)
    for s in (coverage_stats_dense(x > 0, w), field_stats_dense(x, w)):
        back = type(s).from_dense(s.dense(), s.totals)
        assert back.voxels.tolist() == s.voxels.tolist()
        assert {k: v.tolist() for k, v in back.dense().items()} == {k: v.tolist() for k, v in s.dense().items()}


def test_inputs_that_would_give_wrong_sums_are_refused() -> None:
    """Indices off the grid or not integers, repeated field indices, non-finite weights, non-0/1 weights for prop_map and unknown options raise ValueError."""
    with pytest.raises(ValueError, match="outside the grid"):
        coverage_stats(GRID, [(np.array([VOXELS]), 1.0)])
    with pytest.raises(ValueError, match="listed twice"):
        field_stats(GRID, [(np.array([3, 3]), np.array([1.0, 2.0]), 1.0)])
    with pytest.raises(ValueError, match="finite"):
        coverage_stats(GRID, [(np.array([1]), float("nan"))])
    with pytest.raises(ValueError, match="0/1 condition"):
        prop_map(coverage_stats(GRID, [(np.array([1]), 2.5)]))
    with pytest.raises(ValueError, match="different grids"):
        CoverageStats.combine([coverage_stats(GRID, []), coverage_stats((2, 2, 2), [])])
    with pytest.raises(ValueError, match="unknown population"):
        corr_map(field_stats(GRID, []), "all")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="unknown correction"):
        thresholded(tmap(coverage_stats(GRID, [])), 0.05, "holm")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="integers"):
        coverage_stats(GRID, [(np.ones(3, dtype=bool), 1.0)])
    assert coverage_stats(GRID, [(np.array([1, 1, 2]), 1.0)]).n.tolist() == [1, 1]


def test_stats_size_is_the_actual_size_and_bounds_the_mni_grid() -> None:
    """stats_size equals the nbytes of built statistics, and gives the 1 mm MNI grid's dense and sparse sizes."""
    rng = np.random.default_rng(5)
    x = np.where(rng.random((6, *GRID)) < 0.2, 1.0, 0).astype(np.float32)
    cov, fld = coverage_stats_dense(x > 0, np.ones(6)), field_stats_dense(x, np.ones(6))
    assert stats_size("coverage", GRID, cov.voxels.size).sparse == cov.nbytes
    assert stats_size("field", GRID, fld.voxels.size).sparse == fld.nbytes
    mni = (182, 218, 182)
    assert stats_size("coverage", mni, 0).dense == 7_221_032 * 3 * 8 + 24
    assert stats_size("field", mni, 100_000) == type(stats_size("field", mni, 0))(
        sparse=100_000 * 7 * 8 + 24, dense=7_221_032 * 6 * 8 + 24)
    assert support_bound(mni, [10**6] * 300) == 7_221_032
    assert support_bound(GRID, [3, 4]) == 7
    with pytest.raises(ValueError, match="non-zero voxels"):
        stats_size("field", GRID, VOXELS + 1)
