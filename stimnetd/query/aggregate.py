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
roi_overlap    n: [R] subjects touching the ROI,            n (per ROI)
               s1: [R] Σ overlap voxels, s2: [R] Σ overlap²;
               meta: column, rois (names), voxel_volume_mm3
=============  ==========================================  ===============================

Values are clamped to the catalog's declared bounds *before* they enter s1/s2/m, so the
privacy layer can compute sensitivities from bounds the site controls.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

KINDS = (
    "count",
    "moments",
    "histogram",
    "quantiles",
    "crossprod",
    "contingency",
    "voxel_map",
    "roi_overlap",
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
    "roi_overlap": "n",
}

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
