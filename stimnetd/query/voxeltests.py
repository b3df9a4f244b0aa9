"""The entry node's voxel-wise tests (`tmap`, `tmap2`, `prop_map`, `corr_map`) and a
continuous image's `mean_map`, from pooled sums.

Each site sends a `voxel_stats` partial: per voxel n, Σw, Σw² over the subjects covering
it (for a continuous image: n, Σx, Σx², Σxw), and n, Σw, Σw² over its whole cohort
(query/aggregate.py). Summed across sites
(query/combine.py) they are the pooled subjects' statistics, and voxelmaps.py derives the
test, so the answer equals `scipy.stats` on the pooled data: the t (or the fraction),
its two-sided p, the N-threshold, the correction across the voxels that remain, and the
thresholded map. The options (`mu`, `min_n`, `min_frac`, `correction`, `alpha`:
stimnet/query/voxeltests.py) are applied here, never at a site.

A voxel that some site withheld (k_min on either side of it, or its noisy threshold under
DP) is tested over the subjects of the sites that released it: the pooled sums there miss
the withholding site's covering subjects, so its totals must be left out too, or they
would count them on the not-covering side. The combiner records which sites released each
voxel and each site's totals (combine._released_by); each pattern of releasing sites is
derived on its own, the N-threshold's `min_frac` against that sub-cohort, and the
correction runs across every tested voxel. The `cohort` array gives each voxel's
sub-cohort size, and a note counts the voxels tested over only some sites.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from stimnet.query.spec import AggSpec
from stimnet.query.voxeltests import TestSettings
from stimnetd.query.aggregate import VOXEL_ARRAYS, Partial
from stimnetd.query.voxelmaps import (
    VoxelMap,
    corr_map,
    corrected,
    mean_map,
    n_threshold,
    prop_map,
    tmap,
    tmap2,
)
from stimnetd.query.voxelstats import CohortTotals, CoverageStats, FieldStats

WHAT = {
    "tmap": "one-sample t of {w} among the subjects covering each voxel, against mu = {mu:g} "
            "(scipy.stats.ttest_1samp)",
    "tmap2": "Welch t of {w}, subjects covering each voxel against those not covering it "
             "(scipy.stats.ttest_ind, equal_var=False)",
    "prop_map": "fraction of the subjects covering each voxel meeting the condition, exact "
                "binomial test against the cohort's rate (scipy.stats.binomtest)",
    "corr_map": "Pearson r of {column}'s value and {w} at each voxel over the cohort, x = 0 "
                "where a subject's image is zero (scipy.stats.pearsonr); df = n - 2",
}
# A voxel's sums in a continuous image's partial, as voxelstats.FieldStats names them.
_FIELD_NAMES = {"count": "n", "sx": "sx", "sxx": "sxx", "sxw": "sxw"}


def _sums(p: Partial) -> tuple[dict[str, np.ndarray], np.ndarray, list[list[float]]]:
    """The flat pooled per-voxel sums by name (VOXEL_ARRAYS), the pattern of sites
    releasing each voxel (bit i: site i), and each site's totals. Without a pattern (one
    site's partial) its own mask says."""
    s = p.stats
    sums = {k: np.array(s[k], dtype=np.float64).ravel() for k in VOXEL_ARRAYS[p.meta["func"]]}
    totals = p.meta.get("site_totals") or [[float(s[k][0]) for k in
                                            ("total_n", "total_sum", "total_sum2")]]
    if "released_by" in s:
        pattern = np.rint(np.asarray(s["released_by"], dtype=np.float64).ravel())
    else:
        shown = np.ones(sums["count"].shape, bool) if p.cell_mask is None else \
            ~np.asarray(p.cell_mask, dtype=bool).ravel()
        pattern = shown.astype(np.float64)
    return sums, pattern, totals


def pattern_stats(p: Partial, sel: np.ndarray, code: int, sums: dict[str, np.ndarray],
                  totals: list[list[float]]) -> CoverageStats | FieldStats:
    """The statistics of the voxels `sel`, which the sites in bit pattern `code` released,
    over those sites' subjects (a 1-D grid of the selected voxels). prop_map's sums are
    counts: noise may have made them fractional or out of range, so they are rounded into
    [0, n] (post-processing)."""
    mine = [t for i, t in enumerate(totals) if code >> i & 1]
    tot_n = max(0, round(sum(t[0] for t in mine)))
    tot_sw, tot_sw2 = sum(t[1] for t in mine), sum(t[2] for t in mine)
    k = np.rint(sums["count"][sel])
    if "sx" in sums:
        if p.meta.get("func") == "mean_map":
            tot_sw = tot_sw2 = float(tot_n)  # w = 1 (its noised sums are not released)
        field = {_FIELD_NAMES[name]: v[sel] for name, v in sums.items() if name != "count"}
        zeros = np.zeros(k.shape)
        return FieldStats.from_dense({"sxx": zeros, "sxw": zeros, **field, "n": k, "sw": zeros,
                                      "sww": zeros}, CohortTotals(tot_n, tot_sw, tot_sw2))
    s1, s2 = sums["sum"][sel], sums["sum2"][sel]
    if p.meta.get("func") == "prop_map":
        s1 = s2 = np.clip(np.rint(s1), 0.0, np.maximum(k, 0.0))
        tot_sw = tot_sw2 = float(min(max(round(tot_sw), 0), tot_n))
    return CoverageStats.from_dense({"n": k, "sw": s1, "sw2": s2},
                                    CohortTotals(tot_n, tot_sw, tot_sw2))


def _derive(a: AggSpec, s: CoverageStats | FieldStats, opts: TestSettings) -> VoxelMap:
    if isinstance(s, FieldStats):
        raw = corr_map(s) if a.func == "corr_map" else mean_map(s)
    else:
        raw = tmap(s, opts.mu) if a.func == "tmap" else tmap2(s) if a.func == "tmap2" \
            else prop_map(s)
    return n_threshold(raw, opts.min_n or None, opts.min_frac or None,
                       both_sides=a.func == "tmap2")


def derived(a: AggSpec, p: Partial, opts: TestSettings) -> tuple[dict[str, np.ndarray], int]:
    """The test's flat per-voxel arrays (stat, p, df, count, cohort) before correction, and
    how many voxels only some sites released (tested over only their subjects). Each pattern of
    releasing sites is derived on its own, over those sites' subjects."""
    sums, pattern, totals = _sums(p)
    every = 2 ** len(totals) - 1
    out = {k: np.full(pattern.shape, np.nan) for k in ("stat", "p", "df", "count", "cohort")}
    for code in np.unique(pattern[pattern > 0]).astype(np.int64):
        sel = pattern == code
        s = pattern_stats(p, sel, int(code), sums, totals)
        m = _derive(a, s, opts)
        for key, field in (("stat", "statistic"), ("p", "pvalue"), ("df", "df")):
            out[key][sel] = m.dense(field)  # type: ignore[arg-type]
        counts = m.dense("n").astype(np.float64)
        out["count"][sel] = np.where(counts > 0, counts, np.nan)
        out["cohort"][sel] = float(s.totals.n)
    partial_sites = int(np.count_nonzero((pattern != every) & (pattern > 0)))
    return out, partial_sites


def voxel_test(a: AggSpec, p: Partial, key: str) -> tuple[dict[str, Any], dict[str, np.ndarray],
                                                           list[str]]:
    """The map entry of a voxel test (as `QueryResult.maps` lists them), its arrays by
    key, and notes for the answer."""
    opts = TestSettings.of(a.options)
    flat, partial_sites = derived(a, p, opts)
    if a.func == "mean_map":
        return _mean_entry(a, p, key, flat, partial_sites)
    q = corrected(flat["p"], opts.correction)  # type: ignore[arg-type]
    tested = np.isfinite(flat["p"])
    m, kept = int(np.count_nonzero(tested)), int(np.count_nonzero(tested & (q <= opts.alpha)))
    shape = tuple(int(x) for x in p.meta["shape"])
    arrays = {"stat": flat["stat"], "p": flat["p"], "q": q,
              "thresholded": np.where(q <= opts.alpha, flat["stat"], np.nan)}
    if a.func != "prop_map":
        arrays["df"] = flat["df"]
    cohort_n = max(0, round(sum(t[0] for t in p.meta.get("site_totals") or
                                [[float(p.stats["total_n"][0])]])))
    need = (f", n >= {opts.min_n}" if opts.min_n else "") + \
        (f", n >= {opts.min_frac:g} of the cohort" if opts.min_frac else "")
    meta = p.meta
    entry: dict[str, Any] = {
        "name": a.name, "func": a.func, "column": meta["column"], "weight": meta.get("weight"),
        "condition": meta.get("condition"), "shape": list(meta["shape"]),
        "affine": meta["affine"], "xform_code": int(meta.get("xform_code") or 0),
        "n": cohort_n, "count_key": f"{key}:count",
        "arrays": {**{k: f"{key}:{k}" for k in arrays}, "cohort": f"{key}:cohort"},
        "mu": opts.mu if a.func == "tmap" else None, "min_n": opts.min_n,
        "min_frac": opts.min_frac, "correction": opts.correction, "alpha": opts.alpha,
        "tested_voxels": m, "significant_voxels": kept, "partial_voxels": partial_sites,
        "threshold": f"{opts.correction} p <= {opts.alpha:g} over {m} tested voxels{need}",
    }
    out = {f"{key}:{k}": v.reshape(shape) for k, v in arrays.items()}
    out[entry["count_key"]] = flat["count"].reshape(shape)
    out[f"{key}:cohort"] = flat["cohort"].reshape(shape)
    what = WHAT[a.func].format(w=meta.get("weight"), mu=opts.mu, column=meta["column"])
    notes = [f"{what}; p two-sided; q {opts.correction} across the {m} voxels tested after "
             f"the N-threshold; 'thresholded' keeps the statistic where q <= {opts.alpha:g}"]
    if partial_sites:
        notes.append(f"{partial_sites} voxels were released by only some sites (the others "
                     "withheld them: k_min on the covering or the not-covering side, or no "
                     "subject there): each is tested over the subjects of the sites that "
                     "released it ('cohort' gives how many)")
    return entry, out, notes


def _mean_entry(a: AggSpec, p: Partial, key: str, flat: dict[str, np.ndarray],
                partial_sites: int) -> tuple[dict[str, Any], dict[str, np.ndarray], list[str]]:
    """A continuous image's mean_map: the mean value per voxel over the cohort (x = 0
    where an image is zero), in the arrays a mask's mean_map has (count, mean) plus
    `cohort`."""
    meta, shape = p.meta, tuple(int(x) for x in p.meta["shape"])
    entry: dict[str, Any] = {
        "name": a.name, "func": a.func, "column": meta["column"], "weight": None,
        "shape": list(meta["shape"]), "affine": meta["affine"],
        "xform_code": int(meta.get("xform_code") or 0),
        "n": max(0, round(sum(t[0] for t in meta.get("site_totals") or
                              [[float(p.stats["total_n"][0])]]))),
        "count_key": f"{key}:count", "mean_key": f"{key}:mean",
        "arrays": {"mean": f"{key}:mean", "count": f"{key}:count", "cohort": f"{key}:cohort"},
        "partial_voxels": partial_sites,
    }
    out = {f"{key}:{k}": flat[src].reshape(shape)
           for k, src in (("mean", "stat"), ("count", "count"), ("cohort", "cohort"))}
    notes = [f"mean map of the continuous image {meta['column']!r}: its mean value at each "
             "voxel over the cohort (0 where an image is zero); NaN where no subject has a "
             "value"]
    if partial_sites:
        notes.append(f"{partial_sites} voxels were released by only some sites (k_min): each "
                     "is averaged over the subjects of the sites that released it ('cohort' "
                     "gives how many)")
    return entry, out, notes
