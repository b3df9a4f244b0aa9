"""Differential-privacy release of partials with OpenDP's Laplace samplers.

Neighbouring datasets differ by adding or removing one subject. Every released stats array
gets Laplace noise with scale = (its L1 sensitivity) / (its share of epsilon), where the
sensitivity comes from the catalog's *declared* bounds (`FieldMeta.bounds`,
`FieldMeta.max_voxels`), never from the data: the engine clamps values to those bounds
before they enter the sums, so one subject's influence is bounded by declaration alone.
A field without declared bounds is refused, not estimated.

Sensitivity per stats array (B = max(|lo|, |hi|) of the named field):

============  ========  ===============================================================
kind          array     L1 sensitivity
============  ========  ===============================================================
count         n         1
moments       n         1
              s1        B                      (meta["field"])
              s2        B²                     (= max(lo², hi²))
histogram     counts    1                      (one subject sits in one bin)
quantiles     counts    1
contingency   counts    1
crossprod     m         Σ_{i≤j} B_i·B_j, B_0 = 1 (upper triangle incl. diagonal is noised
                        and mirrored, so the release stays symmetric)
              <n>       1                      (m[0, 0] is noised at the scale of m; the
                                                noisy-threshold gate needs a count of its own)
voxel_map     count     V                      (V = max_voxels of meta["column"])
              sum       V·W                    (W = B of meta["weight"])
              <n>       1                      (the partial's subject count, see below)
voxel_stats   count     V                      (tmap, tmap2, prop_map: per-voxel sums over
              sum       V·W                     the covering subjects; W = B of the weight,
              sum2      V·W²                    1 for prop_map's 0/1 condition)
              total_n   1                      (the cohort totals the not-covering side is
              total_sum W                       derived from; total_n is the partial's
              total_sum2 W²                     noised n and its gate)
              sx        V·X                    (corr_map, mean_map of a continuous image:
              sxx       V·X²                    X = B of the image's declared value
              sxw       V·X·W                   bounds; mean_map: W = 1, and its
                                                total_sum, total_sum2 are not released)
roi_overlap   n         R                      (R ROIs; one subject may touch all)
              s1        R·V                    (a subject overlaps an ROI in at most V
              s2        R·V²                    voxels; ROIs may overlap each other, so
              <n>       1                       no tighter joint bound is assumed)
============  ========  ===============================================================

Epsilon is split evenly over every released array of every output of the query
(sequential composition: the total loss is the sum of the shares). For a query's GROUP BY
(`partitioned`) the partials of one output are over disjoint subjects, so each group's
arrays get the output's whole share (parallel composition); a script's partials are split
over every partial. An array the result does not read is not released and takes no share
(the sum of squares of `sum` and `mean`: `avg` costs a sum and a count; prop_map's sums
of squares, equal to its sums for a 0/1 condition). Withheld partials
(see suppress.py) release nothing and get no share.

The table above is the uncentred release. `avg`, `variance`, `stddev`, `corr` and
regressions are released centred on their fields' midpoints (privacy/centre.py): s1 at
sensitivity h = (hi − lo)/2 instead of B, s2 at h²/2 instead of B², the cross-products at
Σ h_i h_j; the entry gets the uncentred arrays rebuilt from the noised ones, and the
shares, hence the ε charged, are the same.

Count arrays are integers and get OpenDP's discrete Laplace (no rounding of a float
release needed); sums get OpenDP's float Laplace, which samples on a discrete grid and so
avoids the floating-point side channels of textbook float noise.

The partial's `n` is replaced by a noised count, never the true one: the noised `n` stats
entry (count, moments), the sum of the noised released cells (histogram, quantiles,
contingency), or a separately noised subject count that takes its own share of epsilon
(crossprod, voxel_map, roi_overlap). It
is rounded and floored at 0, which is post-processing; stats arrays are left unclamped so
that pooled sums stay unbiased.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal, Protocol

import numpy as np
import opendp.prelude as dp

from stimnet.query.fields import FieldMeta
from stimnetd.privacy.centre import Centring, centring
from stimnetd.privacy.policy import PrivacyRefusal
from stimnetd.privacy.suppress import Decision, is_withheld
from stimnetd.query.aggregate import VOXEL_ARRAYS, GroupKey, Partial

MechanismName = Literal["laplace", "discrete laplace"]

# The largest Laplace scale released (see add_noise).
MAX_SCALE = float(2**52)
# Arrays this large are voxel maps, released at float32 precision (see _noise_array).
MAP_ELEMENTS = 4096

# The partial's own subject count, for kinds whose stats arrays do not contain it.
COHORT_N = "<n>"

# Arrays holding subject counts: integer-valued, noised with the discrete Laplace.
_COUNT_ARRAYS = {
    ("count", "n"),
    ("moments", "n"),
    ("histogram", "counts"),
    ("quantiles", "counts"),
    ("contingency", "counts"),
    ("voxel_map", "count"),
    ("voxel_stats", "count"),
    ("voxel_stats", "total_n"),
    ("roi_overlap", "n"),
}


class NoiseSource(Protocol):
    """Adds Laplace noise of a given scale to every element; injected so tests can fake it."""

    def laplace(self, values: np.ndarray, scale: float) -> np.ndarray: ...

    def discrete_laplace(self, values: np.ndarray, scale: float) -> np.ndarray: ...


class NoiseMechanism:
    """OpenDP's vetted samplers: float Laplace for sums, discrete Laplace for counts."""

    def __init__(self) -> None:
        # OpenDP keeps enabled features in process-wide state; enabling here, not at
        # import, keeps importing this module side-effect free.
        dp.enable_features("contrib")
        # Building OpenDP domains and measurements costs more than sampling a small
        # array, and a query reuses a handful of scales, so both are built once.
        self._spaces = {
            "float": (dp.vector_domain(dp.atom_domain(T=float, nan=False)),
                      dp.l1_distance(T=float)),
            # On an integer domain OpenDP's make_laplace is the discrete Laplace (geometric).
            "int": (dp.vector_domain(dp.atom_domain(T="i64")), dp.l1_distance(T="i64")),
        }
        self._release = functools.lru_cache(maxsize=128)(self._build_release)

    def _build_release(self, space: Literal["float", "int"], scale: float) -> dp.Measurement:
        return dp.m.make_laplace(*self._spaces[space], scale=scale)

    def laplace(self, values: np.ndarray, scale: float) -> np.ndarray:
        values = np.asarray(values, dtype=np.float64)
        _check_scale(scale)
        if values.size == 0:
            return values.copy()
        if not np.all(np.isfinite(values)):
            raise ValueError("cannot noise non-finite values")
        release = self._release("float", float(scale))
        return np.asarray(release(values.ravel().tolist()), dtype=np.float64).reshape(values.shape)

    def discrete_laplace(self, values: np.ndarray, scale: float) -> np.ndarray:
        ints = _as_counts(values)
        _check_scale(scale)
        if ints.size == 0:
            return ints.copy()
        release = self._release("int", float(scale))
        return np.asarray(release(ints.ravel().tolist()), dtype=np.int64).reshape(ints.shape)


@dataclass(frozen=True)
class ArrayNoise:
    """How one released array was noised: enough for the audit log to re-derive the loss."""

    output: str
    group: GroupKey
    stat: str
    mechanism: MechanismName
    sensitivity: float
    epsilon: float
    scale: float


@dataclass(frozen=True)
class NoiseReport:
    """The epsilon a query spent in total, and per array."""

    epsilon: float
    arrays: tuple[ArrayNoise, ...]

    def epsilon_for(self, output: str, group: GroupKey) -> float | None:
        """Epsilon spent on one output in one group, or None if it got no noise."""
        shares = [a.epsilon for a in self.arrays if (a.output, a.group) == (output, group)]
        return math.fsum(shares) if shares else None

    def annotate(self, decisions: list[Decision]) -> list[Decision]:
        """`decisions` with the epsilon each output spent filled in, for the audit log."""
        return [dataclasses.replace(d, epsilon=self.epsilon_for(d.output, d.group))
                for d in decisions]


def sensitivities(p: Partial, fields: Mapping[str, FieldMeta]) -> dict[str, float]:
    """L1 sensitivity of each array `add_noise` releases for `p`, from declared bounds only.

    Keys are stats names plus `COHORT_N` where the partial's `n` is released separately.
    Raises PrivacyRefusal("dp", ...) when a needed bound is not declared.
    """
    meta = p.meta
    if p.kind == "count":
        return {"n": 1.0}
    if p.kind in ("histogram", "quantiles", "contingency"):
        return {"counts": 1.0}
    if p.kind == "moments":
        b = _max_abs(fields, _meta_field(p, "field"), p.name)
        return {"n": 1.0, "s1": b, "s2": b * b}
    if p.kind == "crossprod":
        bs = [1.0] + [_max_abs(fields, f, p.name) for f in _meta_fields(p)]
        return {"m": math.fsum(bs[i] * bs[j] for i in range(len(bs)) for j in range(i, len(bs))),
                COHORT_N: 1.0}
    if p.kind == "voxel_map":
        v = float(_max_voxels(fields, _meta_field(p, "column"), p.name))
        out = {"count": v, COHORT_N: 1.0}
        if "sum" in p.stats:
            weight = meta.get("weight")
            if not weight:
                raise PrivacyRefusal("dp", f"output {p.name!r} has a weighted sum but names no "
                                     "weight field, so its sensitivity cannot be bounded")
            out["sum"] = v * _max_abs(fields, str(weight), p.name)
        return out
    if p.kind == "voxel_stats":
        return _voxel_stats_sensitivities(p, fields)
    if p.kind == "roi_overlap":
        v = float(_max_voxels(fields, _meta_field(p, "column"), p.name))
        r = float(np.asarray(p.stats["n"]).size)
        return {"n": r, "s1": r * v, "s2": r * v * v, COHORT_N: 1.0}
    raise ValueError(f"{p.name}: unknown partial kind {p.kind!r}")


def _voxel_stats_sensitivities(p: Partial, fields: Mapping[str, FieldMeta]) -> dict[str, float]:
    v = float(_max_voxels(fields, _meta_field(p, "column"), p.name))
    func = p.meta.get("func")
    # prop_map's weight is its condition, 0 or 1 whatever the field's bounds; a continuous
    # mean_map has none (1 per subject).
    b = 1.0 if func in ("prop_map", "mean_map") else \
        _max_abs(fields, _meta_field(p, "weight"), p.name)
    totals = {"total_n": 1.0, "total_sum": b, "total_sum2": b * b}
    if func in ("corr_map", "mean_map"):
        # X bounds the image's values, as B the weight's: one subject adds at most X to
        # each of its at most V non-zero voxels.
        x = _max_abs(fields, _meta_field(p, "column"), p.name)
        per_voxel = {"count": v, "sx": v * x, "sxx": v * x * x, "sxw": v * x * b}
        return {k: per_voxel[k] for k in VOXEL_ARRAYS[func]} | totals
    return {"count": v, "sum": v * b, "sum2": v * b * b} | totals


def add_noise(
    partials: list[Partial],
    fields: Mapping[str, FieldMeta],
    epsilon: float,
    mechanism: NoiseSource,
    *,
    partitioned: bool = False,
) -> tuple[list[Partial], NoiseReport]:
    """Release `partials` with epsilon-DP Laplace noise, spending `epsilon` in total.

    `partitioned`: the partials of one output over different groups are over disjoint
    subjects (a query's GROUP BY on declared levels: one row per subject, one value per
    field), so by parallel composition each group's arrays get the output's whole share.
    An array the result does not need is not released and costs nothing: the sum of
    squares of a `sum` or `mean` (`plan_arrays`).

    Every sensitivity is computed (and any refusal raised) before the first sample is
    drawn, so a refused query consumes no randomness and no budget.
    """
    if not (math.isfinite(epsilon) and epsilon > 0):
        raise ValueError(f"epsilon must be a positive finite number, got {epsilon}")
    plans = [(p, plan_arrays(p, _checked_sensitivities(p, fields)))
             for p in partials if not is_withheld(p)]
    plans, centrings = _centred(plans, fields)
    n_arrays = _shares_needed(plans, partitioned)
    if n_arrays == 0:
        return list(partials), NoiseReport(0.0, ())
    share = epsilon / n_arrays
    widest = max(s for _, sens in plans for s in sens.values()) / share
    if widest > MAX_SCALE:
        # OpenDP's integer sampler saturates at the int64 range, and float sums lose their
        # integer precision long before: a release this noisy would be garbage, not privacy.
        raise PrivacyRefusal(
            "dp", f"epsilon {epsilon:g} is too small for this query: its noisiest array "
            f"would get Laplace scale {widest:.3g}, beyond the {MAX_SCALE:.3g} (2^52) the "
            "samplers represent exactly; ask for a larger epsilon")
    noised: dict[int, Partial] = {}
    report: list[ArrayNoise] = []
    for p, sens in plans:
        cen = centrings.get(id(p))
        stats = cen.centre(p.stats) if cen else \
            {name: np.array(a, dtype=np.float64) for name, a in p.stats.items()}
        for name in set(stats) - set(sens):
            stats[name] = np.zeros_like(stats[name])  # not released: data-independent zeros
        noisy_n = 0.0
        for stat, s in sens.items():
            mech: MechanismName = "discrete laplace" if _is_count(p.kind, stat) else "laplace"
            scale = s / share
            report.append(ArrayNoise(p.name, p.group, stat, mech, s, share, scale))
            if stat == COHORT_N:
                noisy_n = float(mechanism.discrete_laplace(np.asarray([p.n]), scale)[0])
                continue
            stats[stat] = _noise_array(p, stat, stats[stat], mech, scale, mechanism)
        if cen:
            stats = cen.restore(stats, float(stats.get("n", [0.0])[0]), released=set(sens))
        noisy_n = _noisy_n(p, stats, noisy_n)
        noised[id(p)] = dataclasses.replace(p, n=max(0, round(noisy_n)), stats=stats)
    out = [noised.get(id(p), p) for p in partials]
    return out, NoiseReport(_spent(report, partitioned), tuple(report))


def _centred(plans: list[tuple[Partial, dict[str, float]]], fields: Mapping[str, FieldMeta]
             ) -> tuple[list[tuple[Partial, dict[str, float]]], dict[int, Centring]]:
    """Means, variances and cross-products are released centred on their bounds' midpoints,
    at the smaller centred sensitivities and the same shares (privacy/centre.py)."""
    centrings = {id(p): c for p, _ in plans if (c := centring(p, fields)) is not None}
    return [(p, centrings[id(p)].sensitivities(sens) if id(p) in centrings else sens)
            for p, sens in plans], centrings


def _shares_needed(plans: list[tuple[Partial, dict[str, float]]], partitioned: bool) -> int:
    if not partitioned:
        return sum(len(s) for _, s in plans)
    per_output: dict[str, int] = {}
    for p, s in plans:
        per_output[p.name] = max(per_output.get(p.name, 0), len(s))
    return sum(per_output.values())


def _spent(report: list[ArrayNoise], partitioned: bool) -> float:
    if not partitioned:
        return math.fsum(a.epsilon for a in report)
    # Parallel composition: the loss is the largest over groups, summed over outputs.
    return math.fsum(max(math.fsum(a.epsilon for a in report
                                   if a.output == name and a.group == g)
                         for g in {a.group for a in report if a.output == name})
                     for name in {a.output for a in report})


# Results that read only the sum and count of a moments partial.
_NO_SQUARES = frozenset({"sum", "mean"})


def plan_arrays(p: Partial, sens: dict[str, float]) -> dict[str, float]:
    """The arrays of `p` that are released (and so noised and charged)."""
    if p.kind == "moments" and p.meta.get("func") in _NO_SQUARES:
        return {k: v for k, v in sens.items() if k != "s2"}
    if p.kind == "voxel_stats" and p.meta.get("func") == "prop_map":
        return {k: v for k, v in sens.items() if k not in ("sum2", "total_sum2")}
    if p.kind == "voxel_stats" and p.meta.get("func") == "mean_map":
        # The mean over the cohort reads Σx and n; Σw of w = 1 is n again.
        return {k: v for k, v in sens.items() if k not in ("total_sum", "total_sum2")}
    return sens


def _checked_sensitivities(p: Partial, fields: Mapping[str, FieldMeta]) -> dict[str, float]:
    sens = sensitivities(p, fields)
    expected = set(sens) - {COHORT_N}
    if set(p.stats) != expected:
        # An array without a sensitivity would leave the site exact; refusing is the only
        # safe answer to a layout this module does not know.
        raise ValueError(f"{p.name}: a {p.kind} partial carries stats {sorted(p.stats)}, "
                         f"expected {sorted(expected)}")
    return sens


def _noise_array(
    p: Partial,
    stat: str,
    a: np.ndarray,
    mech: MechanismName,
    scale: float,
    mechanism: NoiseSource,
) -> np.ndarray:
    sample = mechanism.discrete_laplace if mech == "discrete laplace" else mechanism.laplace
    if p.kind == "crossprod":
        upper = np.triu_indices(a.shape[0])
        noisy = sample(a[upper], scale).astype(np.float64)
        out = np.zeros_like(a)
        out[upper] = noisy
        # Mirror rather than noise both halves: the lower triangle is the same statistic.
        return out + np.triu(out, 1).T
    released = np.ones(a.shape, dtype=bool)
    if p.cell_mask is not None and p.cell_mask.shape == a.shape:
        # Withheld cells stay exactly 0; noising them would only make them look released.
        released = ~p.cell_mask
    out = a.copy()
    noisy = sample(a[released], scale).astype(np.float64)
    if mech == "laplace" and noisy.size >= MAP_ELEMENTS:
        # A voxel map's noise is many orders above float32's rounding (images are float32
        # at most), so its digits below are noise too: rounded, the stored and sent map
        # compresses to half (store/blobs.py). Post-processing, so no privacy cost.
        noisy = noisy.astype(np.float32).astype(np.float64)
    out[released] = noisy
    return out


def _noisy_n(p: Partial, stats: dict[str, np.ndarray], separate: float) -> float:
    if p.kind in ("count", "moments"):
        return float(stats["n"].ravel()[0])
    if p.kind == "voxel_stats":
        return float(stats["total_n"].ravel()[0])
    if p.kind in ("histogram", "quantiles", "contingency"):
        return float(stats["counts"].sum())
    return separate


def _is_count(kind: str, stat: str) -> bool:
    return stat == COHORT_N or (kind, stat) in _COUNT_ARRAYS


def _meta_field(p: Partial, key: str) -> str:
    name = p.meta.get(key)
    if not isinstance(name, str) or not name:
        raise PrivacyRefusal(
            "dp", f"output {p.name!r} does not name its {key}, so its sensitivity cannot be "
            "bounded"
        )
    return name


def _meta_fields(p: Partial) -> list[str]:
    names = p.meta.get("fields")
    if not names or not all(isinstance(f, str) for f in names):
        raise PrivacyRefusal(
            "dp", f"output {p.name!r} does not name its fields, so its sensitivity cannot be "
            "bounded"
        )
    return list(names)


def _max_abs(fields: Mapping[str, FieldMeta], name: str, output: str) -> float:
    meta = fields.get(name)
    bounds = None if meta is None else meta.bounds
    if bounds is None:
        raise PrivacyRefusal("dp", f"field {name!r} has no declared clamping bounds, so output "
                             f"{output!r} cannot be noised")
    lo, hi = (float(b) for b in bounds)
    if not (math.isfinite(lo) and math.isfinite(hi) and lo <= hi):
        raise PrivacyRefusal("dp", f"field {name!r} has invalid declared clamping bounds, so "
                             f"output {output!r} cannot be noised")
    return max(abs(lo), abs(hi))


def _max_voxels(fields: Mapping[str, FieldMeta], name: str, output: str) -> int:
    meta = fields.get(name)
    v = None if meta is None else meta.max_voxels
    if v is None or v < 1:
        raise PrivacyRefusal("dp", f"image field {name!r} has no declared max_voxels, so output "
                             f"{output!r} cannot be noised")
    return int(v)


def _check_scale(scale: float) -> None:
    if not (math.isfinite(scale) and scale > 0):
        raise ValueError(f"noise scale must be a positive finite number, got {scale}")


def _as_counts(values: np.ndarray) -> np.ndarray:
    a = np.asarray(values)
    if not np.all(np.isfinite(a)):
        raise ValueError("cannot noise non-finite counts")
    ints = np.rint(a).astype(np.int64)
    if not np.array_equal(ints, a):
        raise ValueError("discrete Laplace needs integer-valued counts")
    return ints
