"""The typed aggregate every job produces: additive sufficient statistics.

A site never returns a data value, only `Partial`s. Every array in `Partial.stats` is
*additive*: the pooled statistic over sites is the element-wise sum of the sites'
arrays. That single property is what makes federated answers exact (the combiner is one
`np.add`), and what the privacy layer relies on to bound each subject's influence.

Stats layout per kind (`meta` carries what the finaliser needs, never data):

=============  ==========================================  ===============================
kind           stats (float64 arrays)                      cell counts used for k_min
=============  ==========================================  ===============================
count          n: [1]                                      n
moments        n: [1], s1: [1] (Σx), s2: [1] (Σx²)         n
histogram      counts: [len(edges)+1]  (under, bins…, over) counts (per bin)
               meta: edges
quantiles      counts: [bins]  fine histogram over          counts (per bin: a sparse
               [lo, hi]; meta: lo, hi, bins, probs         fine bin would pin one value)
crossprod      m: [(p+1), (p+1)] = Σ z zᵀ, z = [1, v1..vp]  m[0, 0]
               meta: fields (v1..vp), purpose
               ("corr" or "regression", y = last field)
contingency    counts: [len(levels_a), len(levels_b)]      counts (per cell)
               meta: fields, levels
voxel_map      count: [shape], sum: [shape] (Σ weight,     count (per voxel)
               absent when unweighted);
               meta: column, weight, shape, affine
voxel_stats    count, sum (Σw), sum2 (Σw²): [shape] over   count (per voxel; and the
               the subjects covering each voxel;           not-covering total_n - count,
               total_n, total_sum, total_sum2: [1] the     for the TWO_SIDED tests)
               same over the whole cohort (TOTALS);
               meta: func, column, weight, condition,
               shape, affine. A continuous image's
               corr_map has count, sx (Σx), sxx (Σx²),
               sxw (Σxw) instead of sum, sum2 (x the
               voxel's value, count its non-zero
               subjects), its mean_map count and sx
               (VOXEL_ARRAYS)
roi_overlap    n: [R] subjects touching the ROI,            n (per ROI)
               s1: [R] Σ overlap voxels, s2: [R] Σ overlap²;
               meta: column, rois (names), voxel_volume_mm3
glm_round      xtwx: [p, p], xtwz: [p], sums: [6]           n
               (deviance, loglik, Σy, Σy², Σy log y,
               boundary rows) at the round's β;
               meta: terms, family, round
threshold_     le: [k] counts of x <= t_j, side: [k]          n
counts         (0 released, -1 "< k_min" withheld, +1
               "> n - k_min" withheld); meta: lo, hi
estimate       est: [p], se: [p]: this site's own fit       n
               (not additive: meta-analysis pools them);
               meta: terms
=============  ==========================================  ===============================

Values are clamped to the catalog's declared bounds *before* they enter s1/s2/m, so the
privacy layer can compute sensitivities from bounds the site controls.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from stimnet.numbers import finite_number

KINDS = (
    "count",
    "moments",
    "histogram",
    "quantiles",
    "crossprod",
    "contingency",
    "voxel_map",
    "voxel_stats",
    "roi_overlap",
    "glm_round",
    "estimate",
    "threshold_counts",
)

# Which stats array holds the per-cell subject counts that k_min is checked against.
# None means "the partial's scalar n" (the whole partial is one cell).
CELL_COUNTS: dict[str, str | None] = {
    "count": None,
    "moments": None,
    "histogram": "counts",
    # Per bin: with n >= k_min overall, a fine bin holding one subject would still pin
    # that subject's value to within (hi - lo) / bins.
    "quantiles": "counts",
    "crossprod": None,
    "contingency": "counts",
    "voxel_map": "count",
    "voxel_stats": "count",
    "roi_overlap": "n",
    "glm_round": None,
    "estimate": None,
    "threshold_counts": None,
}

# Arrays of a per-cell kind that are over the whole partial, not per cell: a withheld cell
# leaves them as they are (they are released, or withheld, with the partial's n).
TOTALS: dict[str, tuple[str, ...]] = {"voxel_stats": ("total_n", "total_sum", "total_sum2")}

# The per-voxel arrays of a voxel_stats partial, by its meta["func"].
VOXEL_ARRAYS: dict[str, tuple[str, ...]] = {
    "tmap": ("count", "sum", "sum2"),
    "tmap2": ("count", "sum", "sum2"),
    "prop_map": ("count", "sum", "sum2"),
    "corr_map": ("count", "sx", "sxx", "sxw"),
    "mean_map": ("count", "sx"),
}
# Voxel tests whose per-voxel sums of w over the covering subjects, with the released
# cohort totals, give the not-covering side too: k_min holds on both sides. corr_map and
# mean_map of a continuous image carry no per-voxel sum of w; their not-covering subjects
# have x = 0 there, so their sums say nothing about them.
TWO_SIDED = frozenset({"tmap", "tmap2", "prop_map"})

GroupKey = tuple[tuple[str, str], ...]


# Meta key on an output grouped by, or tabulated over, a categorical field without declared
# levels: the site left out its groups/levels of fewer than k_min subjects (labels are data
# there). Set whatever the data, so its presence says nothing about them.
UNLISTED = "unlisted"


@dataclass(frozen=True)
class Partial:
    """One site's additive sufficient statistics for one output (one aggregate, one group).

    `name` is the output label (e.g. ``avg(updrs_change)``), `group` the group-by key as
    sorted (field, value) pairs (``()`` when ungrouped), `n` the number of subjects the
    statistic was computed from. `suppressed` lists the stats entries (or cells, see
    `cell_mask`) the site withheld, with the reason, so combined results can say why.
    """

    name: str
    kind: str
    group: GroupKey
    n: int
    stats: dict[str, np.ndarray]
    meta: dict[str, Any] = field(default_factory=dict)
    # True where a cell was withheld (same shape as the CELL_COUNTS array), or None.
    cell_mask: np.ndarray | None = None
    suppressed_reason: str | None = None

    @property
    def key(self) -> tuple[str, GroupKey]:
        return (self.name, self.group)

    def cell_counts(self) -> np.ndarray:
        ref = CELL_COUNTS[self.kind]
        if ref is None:
            return np.asarray([self.n], dtype=np.float64)
        return np.asarray(self.stats[ref], dtype=np.float64)


def two_sided(p: Partial) -> bool:
    """A voxel test whose k_min (and noisy gate) holds on the not-covering side too."""
    return p.kind == "voxel_stats" and p.meta.get("func") in TWO_SIDED


def layout_problem(p: Partial) -> str | None:
    """What is wrong with a partial this node's engine did not make (a peer's answer), or
    None: its n, its stats keys and shapes as the table
    above gives them for its kind and meta, every number finite, its cell mask the shape
    of its cells. Combination and finalising index by that layout; a partial without it
    is refused whole, naming the rule, never used in part."""
    if type(p.n) is not int or p.n < 0:
        return "n is not a non-negative integer"
    try:
        want = _layout(p.kind, p.meta)
    except (KeyError, TypeError, ValueError, OverflowError) as exc:
        return f"its meta does not describe a {p.kind} output ({type(exc).__name__}: {exc})"
    got = {k: np.shape(v) for k, v in p.stats.items()}
    if got != want:
        return f"its stats {got} are not the {p.kind} layout {want}"
    for k, v in p.stats.items():
        arr = np.asarray(v)
        if arr.dtype.kind not in "biuf" or not np.all(np.isfinite(arr)):
            return f"stats[{k!r}] holds a non-finite or non-numeric value"
    ref = CELL_COUNTS[p.kind]
    cells = (1,) if ref is None else want[ref]
    if p.cell_mask is not None and np.shape(p.cell_mask) != cells:
        return f"its cell mask has shape {np.shape(p.cell_mask)}, its cells {cells}"
    if p.suppressed_reason is not None and not isinstance(p.suppressed_reason, str):
        return "its suppression reason is not text"
    return None


def _numbers(v: Any, n: int | None = None) -> list[float]:
    if not isinstance(v, list) or (n is not None and len(v) != n) \
            or not all(type(x) in (int, float) and finite_number(x) for x in v):
        raise ValueError(f"expected {n or 'a list of'} finite numbers, got {v!r:.80}")
    return v


def _names(v: Any, n: int | None = None) -> list[str]:
    if not isinstance(v, list) or (n is not None and len(v) != n) \
            or not all(isinstance(x, str) for x in v) or len(set(v)) != len(v):
        raise ValueError(f"expected {n or 'a list of'} distinct names, got {v!r:.80}")
    return v


def _layout(kind: str, meta: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    """The stats shapes a partial of `kind` with this `meta` has (raises when meta lacks
    what the finaliser reads)."""
    one = (1,)
    if kind == "count":
        return {"n": one}
    if kind == "moments":
        return {"n": one, "s1": one, "s2": one}
    if kind == "histogram":
        edges = _numbers(meta["edges"])
        if len(edges) < 2 or any(b <= a for a, b in zip(edges, edges[1:], strict=False)):
            raise ValueError("edges are not two or more increasing numbers")
        return {"counts": (len(edges) + 1,)}
    if kind == "quantiles":
        lo, hi = _numbers([meta["lo"], meta["hi"]])
        bins = meta["bins"]
        if type(bins) is not int or bins < 1 or hi < lo:
            raise ValueError(f"bins {bins!r:.20} over [{lo}, {hi}] is not a histogram")
        return {"counts": (bins,)}
    if kind == "crossprod":
        p = len(_names(meta["fields"])) + 1
        if meta["purpose"] not in ("corr", "regression") or p < 2:
            raise ValueError("fields and purpose do not describe a cross-product")
        return {"m": (p, p)}
    if kind == "contingency":
        _names(meta["fields"], 2)
        levels = meta["levels"]
        if not isinstance(levels, list) or len(levels) != 2:
            raise ValueError("levels are not two lists")
        return {"counts": (len(_names(levels[0])), len(_names(levels[1])))}
    if kind == "voxel_map":
        return _voxel_map_layout(meta)
    if kind == "voxel_stats":
        grid = tuple(_voxel_map_layout({**meta, "weight": None})["count"])
        if meta["func"] not in VOXEL_ARRAYS:
            raise ValueError(f"func {meta['func']!r:.40} is not a voxel test")
        one = (1,)
        return {**{k: grid for k in VOXEL_ARRAYS[meta["func"]]},
                **{k: one for k in TOTALS["voxel_stats"]}}
    if kind == "roi_overlap":
        _names([meta["column"]])
        _numbers([meta["voxel_volume_mm3"]])
        r = (len(_names(meta["rois"])),)
        return {"n": r, "s1": r, "s2": r}
    if kind == "threshold_counts":
        k = (len(_names(meta["terms"])),)
        _numbers([meta["lo"], meta["hi"]])
        return {"le": k, "side": k}
    if kind in ("glm_round", "estimate"):
        p = len(_names(meta["terms"]))
        if kind == "estimate":
            return {"est": (p,), "se": (p,)}
        return {"xtwx": (p, p), "xtwz": (p,), "sums": (6,)}
    raise ValueError(f"unknown kind {kind!r:.40}")


def _voxel_map_layout(meta: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    shape = meta["shape"]
    if not isinstance(shape, list) or not 1 <= len(shape) <= 4 \
            or not all(type(x) is int and x > 0 for x in shape):
        raise ValueError(f"shape {shape!r:.40} is not 1 to 4 positive integers")
    affine = meta["affine"]
    if not isinstance(affine, list) or len(affine) != 4:
        raise ValueError("affine is not 4 rows")
    for row in affine:
        _numbers(row, 4)
    weight = meta["weight"]
    if weight is not None and not isinstance(weight, str):
        raise ValueError("weight is not a field name")
    _names([meta["column"]])
    grid = tuple(shape)
    return {"count": grid, **({"sum": grid} if weight else {})}
