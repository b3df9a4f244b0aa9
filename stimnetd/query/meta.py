"""Study-level meta-analysis: each site's estimate and standard error, pooled by inverse
variance with a fixed effect, and with random effects whose between-site variance τ²
comes from DerSimonian–Laird (one step) or REML (iterative: safeguarded Newton steps).

Conventions, as metafor and the Cochrane handbook use them: τ² is truncated at 0 (a
negative method-of-moments τ² means no detectable heterogeneity; statsmodels'
`combine_effects` keeps the negative value, equal to ours whenever Q >= k - 1); Q is
Cochran's, with its chi-squared p value on k - 1 degrees of freedom; the heterogeneity
I² is Higgins & Thompson's max(0, (Q - df) / Q), and a random-effects fit's own I² is
τ² / (τ² + s²) with s² the typical within-site variance (the two agree for DL). Intervals
and p values use the normal distribution.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final, Literal

import numpy as np

from stimnetd.query.distributions import chi2_sf, normal_quantile, normal_sf

MetaMethod = Literal["fixed", "dl", "reml"]
METHODS: Final[tuple[MetaMethod, ...]] = ("fixed", "dl", "reml")

# REML stops when τ² moves by less than this (absolute, or relative for a large τ²).
REML_TOL: Final = 1e-12
REML_MAXIT: Final = 200


@dataclass(frozen=True)
class Pooled:
    """One pooled estimate. `tau2` and `i2` are 0 for the fixed effect, which assumes
    no heterogeneity; `converged` is False only for a REML that ran out of iterations."""

    method: MetaMethod
    estimate: float
    std_error: float
    ci_low: float
    ci_high: float
    z: float
    p_value: float
    tau2: float
    i2: float
    converged: bool = True


@dataclass(frozen=True)
class Heterogeneity:
    """Cochran's Q on `df` = k - 1 degrees of freedom, its p value (None for one site)
    and Higgins & Thompson's I² = max(0, (Q - df) / Q)."""

    q: float
    df: int
    p_value: float | None
    i2: float


@dataclass(frozen=True)
class SiteRow:
    """A forest plot's row: one site's estimate, its interval, and its share of each
    method's total weight."""

    site: str
    estimate: float
    std_error: float
    ci_low: float
    ci_high: float
    weight_fixed: float
    weight_dl: float
    weight_reml: float


@dataclass(frozen=True)
class LeaveOneOut:
    """The pooled estimates and heterogeneity without the site `omitted`."""

    omitted: str
    fixed: Pooled
    dl: Pooled
    reml: Pooled
    heterogeneity: Heterogeneity


@dataclass(frozen=True)
class MetaAnalysis:
    """Everything a meta-analysis table and forest plot show: the pooled estimate by
    each method, the heterogeneity, one row per site, and each leave-one-site-out fit."""

    k: int
    fixed: Pooled
    dl: Pooled
    reml: Pooled
    heterogeneity: Heterogeneity
    sites: tuple[SiteRow, ...]
    leave_one_out: tuple[LeaveOneOut, ...]

    def pooled(self, method: MetaMethod) -> Pooled:
        return {"fixed": self.fixed, "dl": self.dl, "reml": self.reml}[method]


def meta_analysis(sites: Sequence[str], estimates: Sequence[float], std_errors: Sequence[float],
                  *, alpha: float = 0.05) -> MetaAnalysis:
    """Pool the sites' estimates by every method, with heterogeneity, a forest plot's rows
    and each leave-one-site-out fit (none for a single site). ValueError unless the sites
    are distinct and each has a finite estimate and a positive, finite standard error."""
    y, v = _checked(sites, estimates, std_errors)
    crit = normal_quantile(1.0 - alpha / 2.0)
    se = np.sqrt(v)
    fixed, dl, reml = (pool(y, se, m, alpha=alpha) for m in METHODS)
    wf, wd, wr = _shares(v, 0.0), _shares(v, dl.tau2), _shares(v, reml.tau2)
    rows = tuple(
        SiteRow(site=name, estimate=float(y[i]), std_error=float(se[i]),
                ci_low=float(y[i] - crit * se[i]), ci_high=float(y[i] + crit * se[i]),
                weight_fixed=float(wf[i]), weight_dl=float(wd[i]), weight_reml=float(wr[i]))
        for i, name in enumerate(sites)
    )
    loo = tuple(_without(list(sites), y, v, i, alpha) for i in range(len(sites))) if len(sites) > 1 else ()
    return MetaAnalysis(k=len(sites), fixed=fixed, dl=dl, reml=reml,
                        heterogeneity=heterogeneity(y, se), sites=rows, leave_one_out=loo)


def _without(sites: list[str], y: np.ndarray, v: np.ndarray, i: int, alpha: float) -> LeaveOneOut:
    keep = np.arange(y.size) != i
    se = np.sqrt(v[keep])
    fixed, dl, reml = (pool(y[keep], se, m, alpha=alpha) for m in METHODS)
    return LeaveOneOut(omitted=sites[i], fixed=fixed, dl=dl, reml=reml,
                       heterogeneity=heterogeneity(y[keep], se))


def _checked(sites: Sequence[str], estimates: Sequence[float],
             std_errors: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    y = np.asarray(estimates, dtype=np.float64)
    se = np.asarray(std_errors, dtype=np.float64)
    if not (len(sites) == y.size == se.size) or y.size == 0 or y.ndim != 1:
        raise ValueError("meta-analysis needs one estimate and one standard error per site")
    if len(set(sites)) != len(sites):
        raise ValueError("meta-analysis sites must be distinct")
    if not (np.all(np.isfinite(y)) and np.all(np.isfinite(se)) and np.all(se > 0)):
        raise ValueError("meta-analysis needs finite estimates and positive, finite standard errors")
    return y, se * se


def _shares(v: np.ndarray, tau2: float) -> np.ndarray:
    w = 1.0 / (v + tau2)
    return w / w.sum()


def heterogeneity(estimates: Sequence[float] | np.ndarray,
                  std_errors: Sequence[float] | np.ndarray) -> Heterogeneity:
    """Cochran's Q of the sites' estimates around their fixed-effect mean."""
    y = np.asarray(estimates, dtype=np.float64)
    w = 1.0 / np.asarray(std_errors, dtype=np.float64) ** 2
    mean = float(w @ y / w.sum())
    q = float(w @ (y - mean) ** 2)
    df = y.size - 1
    i2 = max(0.0, (q - df) / q) if q > 0 and df > 0 else 0.0
    return Heterogeneity(q=q, df=df, p_value=chi2_sf(q, df) if df > 0 else None, i2=i2)


def tau2_dl(estimates: np.ndarray, variances: np.ndarray) -> float:
    """DerSimonian–Laird: (Q - (k - 1)) / (Σw - Σw² / Σw), truncated at 0."""
    w = 1.0 / variances
    if estimates.size < 2:
        return 0.0
    mean = float(w @ estimates / w.sum())
    q = float(w @ (estimates - mean) ** 2)
    c = float(w.sum() - (w @ w) / w.sum())
    return max(0.0, (q - (estimates.size - 1)) / c)


def tau2_reml(estimates: np.ndarray, variances: np.ndarray) -> tuple[float, bool]:
    """REML τ², and whether its iteration converged: the τ² >= 0 of highest restricted
    likelihood. That likelihood need not have one peak (its score can be negative at 0
    and rise above 0 further out), so the score's sign changes from + to - are located on
    a log grid up to a thousand times the spread of the estimates, each is refined by
    `_score_root`, and the best of those peaks and τ² = 0 is kept."""
    if estimates.size < 2:
        return 0.0, True
    scale = float(np.var(estimates)) + float(variances.max())
    grid = [0.0, *(scale * 10.0 ** np.linspace(-8.0, 3.0, 45))]
    scores = [_reml_score(estimates, variances, t)[0] for t in grid]
    best, converged = 0.0, True
    best_loglik = _restricted_loglik(estimates, variances, 0.0)
    for i in range(len(grid) - 1):
        if scores[i] > 0 >= scores[i + 1]:
            root, ok = _score_root(estimates, variances, grid[i], grid[i + 1])
            loglik = _restricted_loglik(estimates, variances, root)
            if loglik > best_loglik:
                best, best_loglik, converged = root, loglik, ok
    return best, converged


def _score_root(estimates: np.ndarray, variances: np.ndarray, lo: float,
                hi: float) -> tuple[float, bool]:
    """The root of the restricted score between `lo` (score > 0) and `hi` (score <= 0):
    Newton steps kept inside the shrinking bracket, bisection when a step would leave it
    (Fisher scoring's expected information can understate the curvature enough to
    oscillate for hundreds of iterations)."""
    tau2 = (lo + hi) / 2.0
    for _ in range(REML_MAXIT):
        score, slope = _reml_score(estimates, variances, tau2)
        if score > 0:
            lo = tau2
        else:
            hi = tau2
        step = tau2 - score / slope if slope < 0 else math.nan
        new = step if lo < step < hi else (lo + hi) / 2.0
        if abs(new - tau2) <= REML_TOL * max(1.0, tau2) or hi - lo <= REML_TOL * max(1.0, hi):
            return new, True
        tau2 = new
    return tau2, False


def _restricted_loglik(estimates: np.ndarray, variances: np.ndarray, tau2: float) -> float:
    """-½ [Σ log(v + τ²) + log Σw + Σw(y - μ̂)²], the REML log-likelihood up to a constant."""
    w = 1.0 / (variances + tau2)
    mean = float(w @ estimates / w.sum())
    return -0.5 * (float(np.sum(np.log(variances + tau2))) + math.log(float(w.sum()))
                   + float(w @ (estimates - mean) ** 2))


def _reml_score(estimates: np.ndarray, variances: np.ndarray, tau2: float) -> tuple[float, float]:
    """The restricted score in τ² (doubled), S = Σw²r² - tr P, and its derivative
    dS/dτ² = -2Σw³r² + 2(Σw²r)² / Σw + tr P², with w = 1 / (v + τ²), r = y - μ̂ and
    P = W - wwᵀ / Σw."""
    w = 1.0 / (variances + tau2)
    sw, ww, www = float(w.sum()), float(w @ w), float(w @ (w * w))
    r = estimates - float(w @ estimates / sw)
    score = float((w * w) @ (r * r)) - (sw - ww / sw)
    trace_p2 = ww - 2.0 * www / sw + (ww / sw) ** 2
    slope = -2.0 * float((w * w * w) @ (r * r)) + 2.0 * float((w * w) @ r) ** 2 / sw + trace_p2
    return score, slope


def typical_variance(variances: np.ndarray) -> float:
    """Higgins & Thompson's typical within-site variance, (k - 1)Σw / ((Σw)² - Σw²)."""
    w = 1.0 / variances
    denominator = float(w.sum() ** 2 - w @ w)
    return (variances.size - 1) * float(w.sum()) / denominator if denominator > 0 else math.inf


def pool(estimates: Sequence[float] | np.ndarray, std_errors: Sequence[float] | np.ndarray,
         method: MetaMethod, *, alpha: float = 0.05) -> Pooled:
    """The inverse-variance pooled estimate under `method`."""
    y = np.asarray(estimates, dtype=np.float64)
    v = np.asarray(std_errors, dtype=np.float64) ** 2
    converged = True
    if method == "fixed":
        tau2 = 0.0
    elif method == "dl":
        tau2 = tau2_dl(y, v)
    else:
        tau2, converged = tau2_reml(y, v)
    w = 1.0 / (v + tau2)
    estimate = float(w @ y / w.sum())
    se = 1.0 / math.sqrt(float(w.sum()))
    crit = normal_quantile(1.0 - alpha / 2.0)
    z = estimate / se
    s2 = typical_variance(v)
    return Pooled(method=method, estimate=estimate, std_error=se, ci_low=estimate - crit * se,
                  ci_high=estimate + crit * se, z=z, p_value=2.0 * normal_sf(abs(z)),
                  tau2=tau2, i2=tau2 / (tau2 + s2) if tau2 > 0 else 0.0, converged=converged)
