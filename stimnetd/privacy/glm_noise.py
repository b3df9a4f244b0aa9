"""Differential privacy for a federated logistic regression: every round's XᵀWX, XᵀWz and
the row count noised at the site, the whole fit's ε charged once, before round 1.

Per subject (one row, numeric fields clamped to their declared bounds, |x_j| ≤ M_j, the
intercept and treatment-coded columns 1), a binomial round's contributions are bounded
whatever β the entry sends: the weight w = μ(1 - μ) ≤ 1/4, so |x_i x_j w| ≤ M_i M_j / 4;
and w z = w η + (y - μ), where |μ(1 - μ) logit μ| ≤ 0.2239 and |y - μ| ≤ 1, so
|x_j w z| ≤ 1.2239 M_j. The L1 sensitivity of one round's released vector (the upper
triangle of XᵀWX, XᵀWz, n) is the sum of those bounds and 1. Each round gets one Laplace
release (OpenDP's float Laplace) of the sums, of scale (Δ - 1) R / ((1 - N_SHARE) ε) over
the R = maxit + 1 rounds the signed model allows; n is released once, in round 1 (OpenDP's
discrete Laplace at sensitivity 1 with N_SHARE of ε; it gates the release by the noisy
threshold as any count does, and later rounds report it again). The accountant is
OpenDP's privacy maps of those releases, composed by basic composition (pure ε adds up,
adaptively too): that ε is charged at once, before anything of round 1 leaves the site.

Deviance, log-likelihood and response sums are not released under noise (they have no
bound over β); the entry stops on the change in β instead (jobs/models.py), and reports
no deviance. Poisson (unbounded weights) and gaussian (unbounded residuals) are refused.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Final

import numpy as np
import opendp.prelude as dp

from stimnet.errors import QueryError
from stimnet.query.fields import FieldMeta
from stimnet.query.spec import AggSpec
from stimnetd.privacy.noise import COHORT_N, ArrayNoise, NoiseReport, NoiseSource
from stimnetd.query.aggregate import Partial

# max over μ of |μ(1 - μ) log(μ / (1 - μ))| (0.223872 at μ ≈ 0.176), rounded up, plus 1.
WZ_BOUND: Final = 1.2239
# The share of a fit's ε spent on its one noised n (the rest on the R rounds' sums).
N_SHARE: Final = 0.1
# Scale a hair above Δ R / ε, so the accountant's float sum never exceeds the ε asked for.
# (OpenDP's maps round up: measured, the excess is below 1e-12 relative.)
_SLACK: Final = 1.0 + 1e-9


@dataclass(frozen=True)
class GlmNoisePlan:
    sensitivity: float
    rounds: int
    scale: float  # the sums' Laplace scale, every round
    n_scale: float  # n's discrete Laplace scale, round 1
    epsilon: float  # the whole fit's, as the accountant composes it
    round_epsilons: tuple[float, float]  # the sums' per round, n's once


def plan(a: AggSpec, fields: Mapping[str, FieldMeta], epsilon: float, *,
         rounds: int) -> GlmNoisePlan:
    """How the fit `a` (of at most `rounds` rounds) is noised for a total of `epsilon`;
    QueryError for a model that cannot be noised with bounded sensitivity, naming why."""
    if a.func != "glm_binomial":
        raise QueryError(f"{a.name}: under differential privacy only glm(..., 'binomial') is "
                         "available: poisson weights and gaussian residuals have no bound, and "
                         "meta() releases per-site estimates (ask with dp off where the "
                         "site's policy allows it)")
    widths = [1.0]
    for f in a.fields[1:]:
        m = fields[f]
        if m.type == "categorical":
            widths += [1.0] * (len(m.levels or ()) - 1)
        elif m.bounds is None:
            raise QueryError(f"{a.name}: a noised GLM needs declared bounds on {f!r}")
        else:
            widths.append(max(abs(float(m.bounds[0])), abs(float(m.bounds[1]))))
    w = np.array(widths)
    upper = np.triu(np.outer(w, w)).sum()
    sensitivity = 0.25 * float(upper) + WZ_BOUND * float(w.sum()) + 1.0
    scale = (sensitivity - 1.0) * rounds / ((1.0 - N_SHARE) * epsilon) * _SLACK
    n_scale = 1.0 / (N_SHARE * epsilon) * _SLACK
    sums, count = round_epsilons(sensitivity - 1.0, scale, n_scale)
    return GlmNoisePlan(sensitivity, rounds, scale, n_scale, rounds * sums + count,
                        (sums, count))


@functools.lru_cache(maxsize=64)
def round_epsilons(sensitivity: float, scale: float, n_scale: float) -> tuple[float, float]:
    """OpenDP's ε for the float Laplace release of one round's sums at `sensitivity`, and
    for the discrete Laplace release of n at 1."""
    dp.enable_features("contrib")
    floats = dp.m.make_laplace(dp.vector_domain(dp.atom_domain(T=float, nan=False)),
                               dp.l1_distance(T=float), scale=scale)
    ints = dp.m.make_laplace(dp.vector_domain(dp.atom_domain(T="i64")),
                             dp.l1_distance(T="i64"), scale=n_scale)
    return float(floats.map(sensitivity)), float(ints.map(1))


def noised(p: Partial, plan_: GlmNoisePlan, noise: NoiseSource,
           n_released: int | None = None) -> tuple[Partial, NoiseReport]:
    """The round `p` with Laplace noise on the upper triangle of XᵀWX (mirrored) and XᵀWz,
    discrete Laplace on n; sums withheld. `n_released`: the noised n of round 1, reported
    again unchanged. The report charges the whole fit (privacy/threshold.py gates on its
    noised n)."""
    xtwx = np.asarray(p.stats["xtwx"], dtype=np.float64)
    k = xtwx.shape[0]
    iu = np.triu_indices(k)
    out = noise.laplace(np.concatenate([xtwx[iu], p.stats["xtwz"]]), plan_.scale)
    sym = np.zeros((k, k))
    sym[iu] = out[: iu[0].size]
    sym = sym + np.triu(sym, 1).T
    n = int(noise.discrete_laplace(np.array([p.n]), plan_.n_scale)[0]) \
        if n_released is None else n_released
    sums_eps, n_eps = plan_.round_epsilons
    report = NoiseReport(plan_.epsilon, (
        ArrayNoise(p.name, p.group, "xtwx+xtwz", "laplace", plan_.sensitivity - 1.0, sums_eps,
                   plan_.scale),
        ArrayNoise(p.name, p.group, COHORT_N, "discrete laplace", 1.0, n_eps, plan_.n_scale)))
    return replace(p, n=max(0, n), stats={"xtwx": sym, "xtwz": out[iu[0].size:],
                                          "sums": np.zeros(6)},
                   meta={**p.meta, "dp": True}), report

