"""The entry node's voxel-wise tests (`tmap`, `tmap2`, `prop_map`) from pooled sums.

Each site sends a `voxel_stats` partial: per voxel n, Σw, Σw² over the subjects covering
it, and the same over its whole cohort (query/aggregate.py). Summed across sites
(query/combine.py) they are the pooled subjects' statistics, and voxelmaps.py derives the
test, so the answer equals `scipy.stats` on the pooled data: the t (or the fraction),
its two-sided p, the N-threshold, the correction across the voxels that remain, and the
thresholded map. The options (`mu`, `min_n`, `min_frac`, `correction`, `alpha`:
stimnet/query/voxeltests.py) are applied here, never at a site.

A voxel that some site withheld (k_min on either side of it, or its noisy threshold under
DP) is not tested at all: the pooled sums there would miss that site's covering subjects
while its totals still count them, which is neither side's statistic. Such voxels are NaN
with the uncovered ones, and a note says how many there are.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from stimnet.query.spec import AggSpec
from stimnet.query.voxeltests import TestSettings
from stimnetd.query.aggregate import Partial
from stimnetd.query.voxelmaps import VoxelMap, n_threshold, prop_map, thresholded, tmap, tmap2
from stimnetd.query.voxelstats import CohortTotals, CoverageStats

WHAT = {
    "tmap": "one-sample t of {w} among the subjects covering each voxel, against mu = {mu:g} "
            "(scipy.stats.ttest_1samp)",
    "tmap2": "Welch t of {w}, subjects covering each voxel against those not covering it "
             "(scipy.stats.ttest_ind, equal_var=False)",
    "prop_map": "fraction of the subjects covering each voxel meeting the condition, exact "
                "binomial test against the cohort's rate (scipy.stats.binomtest)",
}


def pooled_stats(p: Partial) -> tuple[CoverageStats, int]:
    """The pooled coverage statistics, with the voxels some site withheld taken out (and
    how many those are). prop_map's sums are counts: noise may have made them fractional
    or out of range, so they are rounded into [0, n] (post-processing)."""
    s = p.stats
    shape = tuple(int(x) for x in p.meta["shape"])
    n, sw, sw2 = (np.array(s[k], dtype=np.float64).reshape(shape) for k in ("count", "sum", "sum2"))
    tot_n = max(0, round(float(s["total_n"][0])))
    tot_sw, tot_sw2 = float(s["total_sum"][0]), float(s["total_sum2"][0])
    withheld = np.zeros(shape, dtype=bool)
    if p.cell_mask is not None:
        withheld = np.asarray(p.cell_mask, dtype=bool).reshape(shape)
    n[withheld] = sw[withheld] = sw2[withheld] = 0.0
    n = np.rint(n)
    if p.meta.get("func") == "prop_map":
        sw = np.clip(np.rint(sw), 0.0, np.maximum(n, 0.0))
        sw2 = sw
        tot_sw = tot_sw2 = float(min(max(round(tot_sw), 0), tot_n))
    totals = CohortTotals(tot_n, tot_sw, tot_sw2)
    return CoverageStats.from_dense({"n": n, "sw": sw, "sw2": sw2}, totals), \
        int(np.count_nonzero(withheld))


def voxel_test(a: AggSpec, p: Partial, key: str) -> tuple[dict[str, Any], dict[str, np.ndarray],
                                                           list[str]]:
    """The map entry of a voxel test (as `QueryResult.maps` lists them), its arrays by
    key, and notes for the answer."""
    opts = TestSettings.of(a.options)
    stats, withheld = pooled_stats(p)
    raw: VoxelMap
    if a.func == "tmap":
        raw = tmap(stats, opts.mu)
    elif a.func == "tmap2":
        raw = tmap2(stats)
    else:
        raw = prop_map(stats)
    tested = n_threshold(raw, opts.min_n or None, opts.min_frac or None,
                         both_sides=a.func == "tmap2")
    final = thresholded(tested, opts.alpha, opts.correction)  # type: ignore[arg-type]
    m = int(np.count_nonzero(np.isfinite(tested.pvalue)))
    kept = int(np.count_nonzero(np.isfinite(final.statistic)))
    count = stats.dense()["n"].astype(np.float64)
    count[count == 0] = np.nan
    arrays = {"stat": tested.dense("statistic"), "p": tested.dense("pvalue"),
              "q": final.dense("qvalue"), "thresholded": final.dense("statistic")}
    if a.func != "prop_map":
        arrays["df"] = tested.dense("df")
    need = max(opts.min_n, opts.min_frac * stats.totals.n)
    threshold = (f"{opts.correction} p <= {opts.alpha:g} over {m} tested voxels"
                 + (f", n >= {need:g}" if need else ""))
    meta = p.meta
    entry: dict[str, Any] = {
        "name": a.name, "func": a.func, "column": meta["column"], "weight": meta.get("weight"),
        "condition": meta.get("condition"), "shape": list(meta["shape"]),
        "affine": meta["affine"], "xform_code": int(meta.get("xform_code") or 0),
        "n": stats.totals.n, "count_key": f"{key}:count",
        "arrays": {k: f"{key}:{k}" for k in arrays},
        "mu": opts.mu if a.func == "tmap" else None, "min_n": opts.min_n,
        "min_frac": opts.min_frac, "correction": opts.correction, "alpha": opts.alpha,
        "tested_voxels": m, "significant_voxels": kept, "withheld_voxels": withheld,
        "threshold": threshold,
    }
    out = {f"{key}:{k}": v for k, v in arrays.items()}
    out[entry["count_key"]] = count
    what = WHAT[a.func].format(w=meta.get("weight"), mu=opts.mu)
    notes = [f"{what}; p two-sided; q {opts.correction} across the {m} voxels tested after "
             f"the N-threshold; 'thresholded' keeps the statistic where q <= {opts.alpha:g}"]
    if withheld:
        notes.append(f"{withheld} voxels withheld by some site (k_min on the covering or the "
                     "not-covering side) are not tested")
    return entry, out, notes
