"""Maps the entry node derives from pooled per-voxel statistics (`voxelstats`), each equal
to its `scipy.stats` counterpart computed voxel by voxel on the pooled subjects:

==============  ===========================================  ==============================
map             per voxel                                    scipy.stats on pooled data
==============  ===========================================  ==============================
`tmap`          one-sample t of w among covering subjects    ttest_1samp(w_cov, mu0)
                against mu0
`tmap2`         Welch t, covering against not covering       ttest_ind(w_cov, w_not,
                (Welch–Satterthwaite df)                     equal_var=False)
`corr_map`      Pearson r of image value x and w             pearsonr(x, w)
`prop_map`      fraction of covering subjects meeting a      binomtest(k, n, cohort rate)
                condition, exact binomial test
`mean_map`      mean image value                             mean(x)
==============  ===========================================  ==============================

All p-values are two-sided. A voxel the statistic is not defined at (too few subjects,
zero variance) is NaN in `statistic`, `pvalue` and `df`, and `why` says which (`Why`);
nothing raises and nothing is inf. The order of the steps that follow is the published
one (Dembek 2019, Elias 2021): mask voxels covered by too few subjects (`n_threshold`),
then correct across the voxels that remain (`corrected`, `thresholded`), so the number of
tests m is the number of voxels with a p-value after the N-threshold.

Sums of squares are centred from Σw, Σw² (the form that is additive and that DP noise is
added to). Its relative error is about N·eps·(mean² + var)/var, negligible for clinical
outcomes; a centred sum within that error of zero is treated as zero variance.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from enum import IntEnum
from typing import Literal

import numpy as np
import numpy.typing as npt
from scipy import special, stats

from stimnetd.query.voxelstats import CoverageStats, FieldStats, FloatArray, IntArray

Correction = Literal["fdr_bh", "bonferroni", "none"]
Population = Literal["cohort", "covering"]
MapField = Literal["statistic", "pvalue", "df", "qvalue", "n", "why"]

# Centred sums below this many ulps (times the number of summed terms) of the sum of
# squares they came from are rounding, not variance.
_NOISE_ULPS = 4.0
# scipy.stats.binomtest's relative tolerance when it compares probabilities of outcomes.
_BINOM_RERR = 1 + 1e-7


class Why(IntEnum):
    """Why a voxel has no statistic (uint8 codes in `VoxelMap.why`)."""

    DEFINED = 0
    UNCOVERED = 1  # no subject covers the voxel: outside the statistics' support
    TOO_FEW = 2  # fewer subjects than the statistic needs (on either side for tmap2)
    ZERO_VARIANCE = 3  # the outcome (or the image value) does not vary there
    BELOW_MIN_N = 4  # masked by the N-threshold
    NOT_SIGNIFICANT = 5  # masked by `thresholded`


@dataclass(frozen=True, eq=False)
class VoxelMap:
    """A derived map on the statistics' support (`voxels`, flat C-order indices into
    `shape`); `dense` spreads a field over the grid. `n` is the number of covering subjects
    at each voxel, `cohort_n` the cohort size. `qvalue` holds the p-values corrected by
    `correction` once `thresholded` has run (NaN before)."""

    shape: tuple[int, ...]
    voxels: IntArray
    statistic: FloatArray
    pvalue: FloatArray
    df: FloatArray
    n: IntArray
    cohort_n: int
    why: npt.NDArray[np.uint8]
    qvalue: FloatArray
    correction: Correction = "none"

    def dense(self, field: MapField = "statistic") -> np.ndarray:
        """`field` on the whole grid: NaN (n: 0, why: UNCOVERED) outside the support."""
        values = getattr(self, field)
        fill: float | int = {"n": 0, "why": int(Why.UNCOVERED)}.get(field, np.nan)
        grid = np.full(int(np.prod(self.shape)), fill, dtype=values.dtype)
        grid[self.voxels] = values
        return grid.reshape(self.shape)

    def masked(self, drop: npt.NDArray[np.bool_], why: Why) -> VoxelMap:
        """The map with the voxels where `drop` holds left untested (statistic, p, df, q
        NaN); a voxel already undefined keeps its first reason."""
        hit = drop & (self.why == Why.DEFINED)
        codes = np.where(hit, np.uint8(why), self.why).astype(np.uint8)
        return replace(self, statistic=_blank(self.statistic, hit), pvalue=_blank(self.pvalue, hit),
                       df=_blank(self.df, hit), qvalue=_blank(self.qvalue, hit), why=codes)


def tmap(s: CoverageStats, mu0: float = 0.0) -> VoxelMap:
    """One-sample t of the weight among the subjects covering each voxel against `mu0`
    (`ttest_1samp`); df = n − 1."""
    n = s.n.astype(np.float64)
    why = np.zeros(n.shape, dtype=np.uint8)
    ss = _centred(s.sw, s.sw2, n, s.sw2, s.totals.n)
    why[n < 2] = Why.TOO_FEW
    why[(why == Why.DEFINED) & (ss == 0)] = Why.ZERO_VARIANCE
    ok = why == Why.DEFINED
    with np.errstate(divide="ignore", invalid="ignore"):
        t = (s.sw / n - mu0) / np.sqrt(ss / (n - 1) / n)
        df = n - 1
    return _finish(s, np.where(ok, t, np.nan), np.where(ok, df, np.nan), why, s.totals.n)


def tmap2(s: CoverageStats) -> VoxelMap:
    """Welch's two-sample t of the weight, covering against not covering (`ttest_ind(
    covering, not_covering, equal_var=False)`): positive where covering subjects score
    higher; df by Welch–Satterthwaite."""
    tot = s.totals
    n1 = s.n.astype(np.float64)
    n0 = tot.n - n1
    s0, q0 = tot.sw - s.sw, tot.sw2 - s.sw2
    with np.errstate(divide="ignore", invalid="ignore"):
        vn1 = _centred(s.sw, s.sw2, n1, s.sw2, tot.n) / (n1 - 1) / n1
        vn0 = _centred(s0, q0, n0, np.full(n1.shape, tot.sw2), tot.n) / (n0 - 1) / n0
        df = (vn1 + vn0) ** 2 / (vn1**2 / (n1 - 1) + vn0**2 / (n0 - 1))
        t = (s.sw / n1 - s0 / n0) / np.sqrt(vn1 + vn0)
    why = np.zeros(n1.shape, dtype=np.uint8)
    why[(n1 < 2) | (n0 < 2)] = Why.TOO_FEW
    why[(why == Why.DEFINED) & (vn1 + vn0 == 0)] = Why.ZERO_VARIANCE
    ok = why == Why.DEFINED
    return _finish(s, np.where(ok, t, np.nan), np.where(ok, df, np.nan), why, tot.n)


def corr_map(s: FieldStats, over: Population = "cohort") -> VoxelMap:
    """Pearson r of the image value and the weight per voxel (`pearsonr`), df = n − 2.

    `over="cohort"` (the default) correlates across every subject of the cohort, x = 0
    where a subject's image is zero: this is what E-field sweet-spot studies do (at each
    voxel, the field magnitudes of all patients against their outcomes, after an
    N-threshold drops the voxels few fields reach). `over="covering"` correlates among the
    subjects with a non-zero value there only.
    """
    n, sw, sww = _population(s, over)
    with np.errstate(divide="ignore", invalid="ignore"):
        ssx = _centred(s.sx, s.sxx, n, s.sxx, s.totals.n)
        ssw = _centred(sw, sww, n, sww, s.totals.n)
        r = np.clip((s.sxw - s.sx * sw / n) / np.sqrt(ssx * ssw), -1.0, 1.0)
    why = np.zeros(n.shape, dtype=np.uint8)
    why[n < 2] = Why.TOO_FEW
    why[(why == Why.DEFINED) & ((ssx == 0) | (ssw == 0))] = Why.ZERO_VARIANCE
    ok = why == Why.DEFINED
    pair = ok & (n == 2)
    # pearsonr: with two subjects r is exactly ±1 and p is 1.
    r = np.where(pair, np.round(r), np.where(ok, r, np.nan))
    ab = np.where(ok & ~pair, n / 2 - 1, 1.0)
    p = np.where(pair, 1.0, 2 * special.betaincc(ab, ab, (np.abs(r) + 1) / 2))
    return _map(s, r, np.where(ok, p, np.nan), np.where(ok, n - 2, np.nan), why, s.totals.n)


def mean_map(s: FieldStats, over: Population = "cohort") -> VoxelMap:
    """The mean image value per voxel: over the whole cohort (x = 0 where an image is
    zero) or over the subjects with a non-zero value there. No test: p and df are NaN."""
    n = _population(s, over)[0]
    why = np.where(n < 1, np.uint8(Why.TOO_FEW), np.uint8(Why.DEFINED)).astype(np.uint8)
    with np.errstate(divide="ignore", invalid="ignore"):
        mean = np.where(why == Why.DEFINED, s.sx / n, np.nan)
    nan = np.full(n.shape, np.nan)
    return _map(s, mean, nan, nan, why, s.totals.n)


def prop_map(s: CoverageStats) -> VoxelMap:
    """The fraction of covering subjects meeting a condition, with an exact two-sided
    binomial test against the cohort's rate (`binomtest(k, n, K / N)`, scipy's two-sided
    definition). `s` must be built with the condition as the weight (1.0 met, 0.0 not),
    so Σw is the count k meeting it."""
    k, n, tot = s.sw, s.n.astype(np.float64), s.totals
    counts = np.append(k, tot.sw)
    if not (np.all(counts == np.rint(counts)) and np.all(k >= 0) and np.all(k <= n)
            and 0 <= tot.sw <= tot.n):
        raise ValueError("prop_map needs statistics weighted by a 0/1 condition")
    why = np.where(n < 1, np.uint8(Why.TOO_FEW), np.uint8(Why.DEFINED)).astype(np.uint8)
    ok = why == Why.DEFINED
    rate = tot.sw / tot.n if tot.n else 0.0
    p = np.full(n.shape, np.nan)
    p[ok] = binomtest_pvalue(k[ok], n[ok], rate)
    with np.errstate(divide="ignore", invalid="ignore"):
        frac = np.where(ok, k / n, np.nan)
    return _map(s, frac, p, np.full(n.shape, np.nan), why, tot.n)


def binomtest_pvalue(k: FloatArray, n: FloatArray, p: float) -> FloatArray:
    """`scipy.stats.binomtest(k, n, p).pvalue` (two-sided) elementwise: the probability of
    every outcome no likelier than k (within scipy's relative tolerance 1e-7), found by the
    same bisection over the other side of the mode."""
    k, n = np.asarray(k, dtype=np.float64), np.asarray(n, dtype=np.float64)
    d = stats.binom.pmf(k, n, p)
    low = k < p * n
    sign = np.where(low, -1.0, 1.0)
    target = sign * d * _BINOM_RERR
    lo = np.where(low, np.ceil(p * n), 0.0)
    hi = np.where(low, n, np.floor(p * n))
    ix = _bisect(lambda x: sign * stats.binom.pmf(x, n, p), target, lo, hi)
    y_low = n - ix + (d * _BINOM_RERR == stats.binom.pmf(ix, n, p))
    p_low = stats.binom.cdf(k, n, p) + stats.binom.sf(n - y_low, n, p)
    p_high = stats.binom.cdf(ix, n, p) + stats.binom.sf(k - 1, n, p)
    pval = np.minimum(1.0, np.where(low, p_low, p_high))
    return np.asarray(np.where(k == p * n, 1.0, pval), dtype=np.float64)


def _bisect(
    a: Callable[[FloatArray], FloatArray], target: FloatArray, lo: FloatArray, hi: FloatArray
) -> FloatArray:
    """scipy's `_binary_search_for_binom_tst` elementwise: the index i in [lo − 1, hi]
    with a(i) <= target < a(i + 1), for a ascending on [lo, hi]; its steps (including the
    early return on equality) are kept, so the result is scipy's to the last index."""
    lo, hi = lo.copy(), hi.copy()
    out = np.full(lo.shape, np.nan)
    done = np.zeros(lo.shape, dtype=bool)
    active = lo < hi
    while active.any():
        mid = lo + (hi - lo) // 2
        val = a(mid)
        less, more = active & (val < target), active & (val > target)
        hit = active & ~less & ~more
        lo, hi = np.where(less, mid + 1, lo), np.where(more, mid - 1, hi)
        out[hit], done[hit] = mid[hit], True
        active = (lo < hi) & ~done
    last = np.where(a(lo) <= target, lo, lo - 1)
    return np.where(done, out, last)


def n_threshold(
    m: VoxelMap, min_n: int | None = None, min_frac: float | None = None, *, both_sides: bool = False
) -> VoxelMap:
    """Mask voxels covered by fewer than `min_n` subjects or by less than `min_frac` of
    the cohort (Elias 2021: 10 %). With `both_sides`, the not-covering group must meet the
    same bound (a two-sample test, or k_min on both sides)."""
    need = max(float(min_n or 0), float(min_frac or 0.0) * m.cohort_n)
    drop = m.n < need
    if both_sides:
        drop |= (m.cohort_n - m.n) < need
    return m.masked(drop, Why.BELOW_MIN_N)


def fdr_bh(p: npt.ArrayLike) -> FloatArray:
    """Benjamini–Hochberg adjusted p-values over the finite entries (NaN stays NaN), as
    `scipy.stats.false_discovery_control(p[finite], method="bh")`."""
    p = np.asarray(p, dtype=np.float64)
    out = np.full(p.shape, np.nan)
    tested = np.isfinite(p)
    ps = p[tested]
    m = ps.size
    if m <= 1:
        out[tested] = ps
        return out
    order = np.argsort(ps)
    adj = ps[order] * (m / np.arange(1, m + 1, dtype=np.float64))
    adj = np.minimum.accumulate(adj[::-1])[::-1]
    back = np.empty(m)
    back[order] = adj
    out[tested] = np.clip(back, 0.0, 1.0)
    return out


def bonferroni(p: npt.ArrayLike) -> FloatArray:
    """Bonferroni-adjusted p-values, min(1, m·p), m the number of finite entries."""
    p = np.asarray(p, dtype=np.float64)
    return np.asarray(np.minimum(1.0, p * np.count_nonzero(np.isfinite(p))), dtype=np.float64)


def corrected(p: npt.ArrayLike, correction: Correction) -> FloatArray:
    """p adjusted across voxels by `correction` ("none" returns p unchanged)."""
    if correction == "fdr_bh":
        return fdr_bh(p)
    if correction == "bonferroni":
        return bonferroni(p)
    if correction == "none":
        return np.asarray(p, dtype=np.float64).copy()
    raise ValueError(f"unknown correction {correction!r}")


def thresholded(m: VoxelMap, alpha: float = 0.05, correction: Correction = "fdr_bh") -> VoxelMap:
    """The statistic kept only where the corrected p-value is at most `alpha` (p, df and
    the corrected values in `qvalue` stay for every tested voxel). Apply `n_threshold`
    first: the correction counts the voxels that have a p-value."""
    q = corrected(m.pvalue, correction)
    hit = ~(q <= alpha) & (m.why == Why.DEFINED)
    codes = np.where(hit, np.uint8(Why.NOT_SIGNIFICANT), m.why).astype(np.uint8)
    return replace(m, statistic=_blank(m.statistic, hit), qvalue=q, correction=correction, why=codes)


def _population(s: FieldStats, over: Population) -> tuple[FloatArray, FloatArray, FloatArray]:
    """n, Σw and Σw² per voxel over the population a field map is computed over."""
    if over == "cohort":
        n = np.full(s.n.shape, float(s.totals.n))
        return n, np.full(n.shape, s.totals.sw), np.full(n.shape, s.totals.sw2)
    if over == "covering":
        return s.n.astype(np.float64), s.sw, s.sww
    raise ValueError(f"unknown population {over!r}: 'cohort' or 'covering'")


def _centred(
    s: FloatArray, s2: FloatArray, n: FloatArray, scale: FloatArray, terms: int
) -> FloatArray:
    """Σ(w − mean)² from Σw, Σw²: zero where n < 1, and where it is within rounding of the
    sums it came from (`scale`, over at most `terms` summed terms)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        ss = np.where(n >= 1, s2 - s * s / n, 0.0)
    noise = _NOISE_ULPS * np.finfo(np.float64).eps * max(terms, 1) * np.abs(scale)
    return np.asarray(np.where(ss > noise, ss, 0.0), dtype=np.float64)


def _finish(s: CoverageStats, t: FloatArray, df: FloatArray, why: npt.NDArray[np.uint8],
            cohort_n: int) -> VoxelMap:
    """A t map with its two-sided p-values from Student's t with `df`."""
    with np.errstate(invalid="ignore"):
        p = np.where(np.isfinite(t), 2 * special.stdtr(np.where(np.isfinite(df), df, 1.0),
                                                       -np.abs(t)), np.nan)
    return _map(s, t, p, df, why, cohort_n)


def _map(s: CoverageStats | FieldStats, stat: FloatArray, p: FloatArray, df: FloatArray,
         why: npt.NDArray[np.uint8], cohort_n: int) -> VoxelMap:
    return VoxelMap(shape=s.shape, voxels=s.voxels, statistic=np.asarray(stat, dtype=np.float64),
                    pvalue=np.asarray(p, dtype=np.float64), df=np.asarray(df, dtype=np.float64),
                    n=s.n, cohort_n=cohort_n, why=why, qvalue=np.full(s.n.shape, np.nan))


def _blank(values: FloatArray, hit: npt.NDArray[np.bool_]) -> FloatArray:
    return np.asarray(np.where(hit, np.nan, values), dtype=np.float64)
