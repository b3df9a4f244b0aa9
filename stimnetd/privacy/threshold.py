"""Noisy-threshold suppression: under DP, which cells leave the site is decided on noised counts.

Exact k_min suppression decides on true counts, so *whether* a cell is withheld is an exact
function of the data outside any DP guarantee: a binary search on "is this withheld?"
recovers a subject's values while charging next to no epsilon. Under DP every gate is a
noised count instead:

* every count array is noised first (noise.add_noise, discrete Laplace of scale b);
* a cell (a histogram bin, contingency cell, voxel, ROI) is released only where its *noised*
  count reaches the threshold T; a partial without per-cell counts (count, moments,
  crossprod) is released only where its noised subject count reaches T;
* the count released is the noised one, and a withheld cell is zero in every array.

The cells are a data-independent function of the signed request (groups come from declared
levels only, edges and voxel grids from the request and the catalog), so the gate is
post-processing of noised counts and costs no epsilon of its own.

T is k_min plus a margin set by δ: the smallest integer with

    P(k_min - 1 + X >= T) <= δ,    X ~ discrete Laplace(b),  P(X >= t) = α^t / (1 + α),
                                   α = exp(-1/b),  t >= 1,

so a cell of fewer than k_min subjects is released with probability at most δ (and a cell
of k_min - 1 + t subjects with probability α^t / (1 + α), see `release_probability`). The
same T is at least 1 + b·ln(1/(2δ)), the threshold of the stability-based histogram, so the
(ε, δ) the query is charged would also cover a cell that exists on one neighbouring dataset
only.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from stimnetd.privacy.noise import COHORT_N, NoiseReport
from stimnetd.privacy.suppress import Action, Decision
from stimnetd.query.aggregate import CELL_COUNTS, TOTALS, GroupKey, Partial, two_sided


def threshold(k_min: int, scale: float, delta: float) -> int:
    """The noisy-count threshold T for counts noised with discrete Laplace of `scale`."""
    if k_min < 1:
        raise ValueError(f"k_min must be at least 1, got {k_min}")
    if not (math.isfinite(scale) and scale > 0):
        raise ValueError(f"scale must be a positive finite number, got {scale}")
    if not 0 < delta < 1:
        raise ValueError(f"delta must be in (0, 1), got {delta}")
    alpha = math.exp(-1.0 / scale)
    # t = ceil(ln(δ(1+α)) / ln α), then corrected for rounding at the boundary.
    t = max(1, math.ceil(math.log(delta * (1 + alpha)) / math.log(alpha)))
    while t > 1 and _tail(alpha, t - 1) <= delta:
        t -= 1
    while _tail(alpha, t) > delta:
        t += 1
    return k_min - 1 + t


def release_probability(count: int, t: int, scale: float) -> float:
    """P(count + X >= t) for X ~ discrete Laplace(scale): the chance a cell is released."""
    alpha = math.exp(-1.0 / scale)
    gap = t - count
    if gap >= 1:
        return _tail(alpha, gap)
    # P(X >= -m) = 1 - P(X <= -m - 1) = 1 - P(X >= m + 1), by symmetry.
    return 1.0 - _tail(alpha, -gap + 1)


def _tail(alpha: float, t: int) -> float:
    """P(X >= t), t >= 1."""
    return alpha**t / (1 + alpha)


def reason(k_min: int, delta: float) -> str:
    return (f"k_min: noised count below k_min = {k_min} plus its margin for delta = {delta:g}")


# Which noised arrays gate a partial of each kind: its subject count (`COHORT_N`, or the
# "n" array of count and moments) and its per-cell count array, where it has one.
GATES: dict[str, tuple[str, ...]] = {
    "count": ("n",),
    "moments": ("n",),
    "crossprod": (COHORT_N,),
    "histogram": ("counts",),
    "quantiles": ("counts",),
    "contingency": ("counts",),
    "voxel_map": (COHORT_N, "count"),
    "voxel_stats": ("total_n", "count"),
    "roi_overlap": (COHORT_N, "n"),
    "glm_round": (COHORT_N,),  # privacy/glm_noise.py
}


def gate_scales(report: NoiseReport) -> dict[tuple[str, GroupKey], dict[str, float]]:
    """The discrete-Laplace scale of each gate array, per (output, group), from the report."""
    out: dict[tuple[str, GroupKey], dict[str, float]] = {}
    for a in report.arrays:
        if a.mechanism == "discrete laplace":
            out.setdefault((a.output, a.group), {})[a.stat] = a.scale
    return out


def gate_noised(partials: list[Partial], report: NoiseReport, k_min: int,
                delta: float) -> tuple[list[Partial], list[Decision]]:
    """Withhold every cell and partial whose noised count is below its threshold.

    `partials` are what noise.add_noise returned with `report`. A partial whose gate was
    not noised is withheld: nothing exact may pass a DP gate.
    """
    scales = gate_scales(report)
    out: list[Partial] = []
    decisions: list[Decision] = []
    why = reason(k_min, delta)
    for p in partials:
        have = scales.get((p.name, p.group), {})
        gates = GATES[p.kind]
        if not all(g in have for g in gates):
            q = _withhold_all(p, why)
        else:
            q = _gate(p, {g: threshold(k_min, have[g], delta) for g in gates}, why)
        out.append(q)
        decisions.append(Decision(p.name, p.group, _action(q), q.suppressed_reason))
    return out, decisions


def _gate(p: Partial, thresholds: dict[str, int], why: str) -> Partial:
    subjects = thresholds.get(COHORT_N, thresholds.get("total_n", thresholds.get("n") if
                                                       CELL_COUNTS[p.kind] is None else None))
    if subjects is not None and p.n < subjects:
        return _withhold_all(p, why)
    ref = CELL_COUNTS[p.kind]
    if ref is None:
        return p
    counts = np.asarray(p.stats[ref], dtype=np.float64)
    mask = counts < thresholds[ref]
    if two_sided(p):
        # Both sides of each voxel, as exact k_min does, on noised counts (post-processing).
        mask |= (float(p.stats["total_n"][0]) - counts) < thresholds[ref]
    if p.cell_mask is not None:
        mask |= np.asarray(p.cell_mask, dtype=bool)
    if mask.all():
        return _withhold_all(p, why)
    if not mask.any():
        return p
    stats = {}
    for name, a in p.stats.items():
        a = np.array(a, dtype=np.float64)
        if name in TOTALS.get(p.kind, ()):
            stats[name] = a
            continue
        if a.shape != mask.shape:
            raise ValueError(f"{p.name}: stats[{name!r}] has shape {a.shape}, expected the "
                             f"cell shape {mask.shape} of a {p.kind} partial")
        a[mask] = 0.0
        stats[name] = a
    n = p.n
    if p.kind in ("histogram", "quantiles", "contingency"):
        # The partial's n is the sum of its released cells (post-processing).
        n = max(0, round(float(stats[ref].sum())))
    return dataclasses.replace(p, n=n, stats=stats, cell_mask=mask, suppressed_reason=why)


def _withhold_all(p: Partial, why: str) -> Partial:
    return dataclasses.replace(
        p, n=0,
        stats={k: np.zeros_like(np.asarray(a, dtype=np.float64)) for k, a in p.stats.items()},
        cell_mask=np.ones(p.cell_counts().shape, dtype=bool), suppressed_reason=why)


def _action(p: Partial) -> Action:
    if p.cell_mask is None or not np.asarray(p.cell_mask).any():
        return "released"
    return "suppressed" if np.asarray(p.cell_mask).all() else "partially_suppressed"
