"""Site-side computation: a `QuerySpec` over one catalog → additive `Partial`s.

This module applies no privacy policy (k_min, noise, budgets): it computes exact
sufficient statistics and the privacy layer decides what leaves the site. With `clamp`
(the site sets it when the release is noised) it clamps numeric values to the declared
bounds, because the privacy layer derives sensitivities from those bounds and must be
able to rely on them; without DP nothing needs the bounds, and federated must equal pooled.
Quantile histograms bin over the bounds either way (their bins are defined by them).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from stimnet.errors import QueryError
from stimnet.query.fields import FieldMeta
from stimnet.query.spec import (
    AggSpec,
    And,
    Between,
    Comparison,
    Expr,
    InList,
    IsNull,
    Not,
    Or,
    QuerySpec,
    expr_to_dict,
    validate,
)
from stimnet.query.voxeltests import VOXEL_TESTS
from stimnetd.catalog.columns import Rows, is_null, label
from stimnetd.catalog.view import CatalogView
from stimnetd.query.aggregate import VOXEL_ARRAYS, GroupKey, Partial
from stimnetd.query.linear import LinearCohort, linear_cohorts
from stimnetd.query.models import model_partial
from stimnetd.query.subjects import InProcess, SubjectImages

QUANTILE_BINS = 1024


@dataclass(frozen=True)
class SiteComputation:
    partials: list[Partial]
    cohort_ids: frozenset[str]
    n_cohort: int
    # Grouped queries: each group's subjects (its cells are released cohorts too).
    group_ids: dict[GroupKey, frozenset[str]] = field(default_factory=dict)
    # With `audit`: every linear statistic the partials hold, with the cohort it sums over
    # (query/linear.py), for exact auditing.
    linear: list[LinearCohort] = field(default_factory=list)


def compute(
    spec: QuerySpec, catalog: CatalogView, *, quantile_bins: int = QUANTILE_BINS,
    beta: np.ndarray | None = None, images: SubjectImages | None = None,
    audit: bool = False, clamp: bool = True,
) -> SiteComputation:
    """One site's exact partials for `spec`: one per aggregate per group (every declared
    level combination when all group fields declare levels, else the groups present).

    The spec is validated again here because a site must not trust the entry node.
    `cohort_ids` are the filtered subjects (before grouping) and `group_ids` each group's,
    for the overlap guard. `beta`: a GLM round's parameter vector (query/models.py).
    `images`: where voxel maps' per-subject work runs (query/subjects.py; in-process if None).
    """
    validate(spec, catalog.fields)
    for a in spec.aggregates:
        if a.range is not None:
            raise QueryError(f"{a.name}: clamp() declares a script output's range (for "
                             "sample-and-aggregate); a query clamps to the catalog's bounds")
    rows = Rows(catalog.columns())
    if spec.where is not None:
        true, _false = _eval(spec.where, rows, catalog.fields)
        rows = rows.subset(true)
    cohort_ids = catalog.subject_ids() if spec.where is None else rows.ids(catalog.subject_key)
    if spec.model is not None:
        return SiteComputation(partials=[model_partial(spec.model, rows, catalog.fields, beta)],
                               cohort_ids=cohort_ids, n_cohort=len(rows))
    ctx = _Context(catalog, quantile_bins, images, clamp=clamp)
    groups = _groups(rows, spec.group_by, catalog.fields)
    partials = [ctx.aggregate(agg, cell, key) for key, cell in groups for agg in spec.aggregates]
    linear: list[LinearCohort] = []
    if audit:
        made = iter(partials)
        for key, cell in groups:
            for agg in spec.aggregates:
                p = next(made)
                bounds = catalog.fields[agg.fields[0]].bounds if agg.fields else None
                met = None if agg.condition is None else \
                    _eval(agg.condition, cell, catalog.fields)
                linear += linear_cohorts(agg, cell, key, fine_bins=quantile_bins,
                                         bounds=bounds, levels=p.meta.get("levels"),
                                         condition=met, continuous=agg.func in
                                         ("corr_map", "mean_map") and p.kind == "voxel_stats")
    group_ids = {key: cell.ids(catalog.subject_key) for key, cell in groups} \
        if spec.group_by else {}
    return SiteComputation(partials=partials, cohort_ids=cohort_ids, n_cohort=len(rows),
                           group_ids=group_ids, linear=linear)


# --- filter: SQL three-valued logic as (is_true, is_false) masks; unknown is neither ---

_OPS: dict[str, Callable[[Any, Any], Any]] = {
    "=": np.equal,
    "!=": np.not_equal,
    "<": np.less,
    "<=": np.less_equal,
    ">": np.greater,
    ">=": np.greater_equal,
}


def _eval(e: Expr, rows: Rows, fields: Mapping[str, FieldMeta]) -> tuple[Any, Any]:
    if isinstance(e, And | Or):
        parts = [_eval(a, rows, fields) for a in e.args]
        ts, fs = [p[0] for p in parts], [p[1] for p in parts]
        if isinstance(e, And):
            return np.logical_and.reduce(ts), np.logical_or.reduce(fs)
        return np.logical_or.reduce(ts), np.logical_and.reduce(fs)
    if isinstance(e, Not):
        t, f = _eval(e.arg, rows, fields)
        return f, t
    if isinstance(e, IsNull):
        null = rows.missing(e.field)
        return (~null, null) if e.negated else (null, ~null)
    numeric = fields[e.field].type in ("numeric", "integer")
    values = rows.numbers(e.field) if numeric else rows.labels(e.field)
    known = ~np.isnan(values) if numeric else np.array([v is not None for v in values], bool)
    hit = np.zeros(len(values), dtype=bool)
    sel = values[known]
    if isinstance(e, Comparison):
        hit[known] = _OPS[e.op](sel, e.value if numeric else label(e.value))
    elif isinstance(e, InList):
        wanted = list(e.values) if numeric else [label(v) for v in e.values]
        hit[known] = np.isin(sel, wanted)
    elif isinstance(e, Between):
        hit[known] = (sel >= e.low) & (sel <= e.high)
    if getattr(e, "negated", False):
        hit = ~hit
    return hit & known, ~hit & known


def _groups(
    rows: Rows, group_by: tuple[str, ...], fields: Mapping[str, FieldMeta]
) -> list[tuple[GroupKey, Rows]]:
    if not group_by:
        return [((), rows)]
    columns = [rows.labels(g) for g in group_by]
    positions: dict[tuple[str, ...], np.ndarray] = {}
    declared = [fields[g].levels for g in group_by]
    if all(declared):
        # Every declared combination is emitted, empty or not: if only present groups
        # were returned, the mere existence of a partial would reveal that the site has
        # a subject with that (possibly rare) level, even after k_min suppression.
        empty = np.zeros(0, dtype=np.intp)
        for combo in itertools.product(*[[label(v) for v in lv or ()] for lv in declared]):
            positions[combo] = empty
    # Rows grouped by their labels' combined code (vectorised: a per-row Python loop cost
    # most of a grouped query's time). A NULL group value cannot be typed as a level name,
    # so such rows belong to no group: they are left out of grouped outputs (and still
    # counted ungrouped).
    combined = np.zeros(len(rows), dtype=np.int64)
    valid = np.ones(len(rows), dtype=bool)
    for col in columns:
        codes, uniques = pd.factorize(col, use_na_sentinel=True)
        valid &= codes >= 0
        # Renumbered after each field, so the code stays below rows x levels (no overflow
        # however many fields are grouped on).
        combined, _ = pd.factorize(combined * max(len(uniques), 1) + np.maximum(codes, 0))
    rows_in_order = np.flatnonzero(valid)
    rows_in_order = rows_in_order[np.argsort(combined[rows_in_order], kind="stable")]
    starts = np.flatnonzero(np.diff(combined[rows_in_order])) + 1
    for cell in np.split(rows_in_order, starts) if len(rows_in_order) else []:
        positions[tuple(str(c[cell[0]]) for c in columns)] = cell
    return [
        (tuple(sorted(zip(group_by, values, strict=True))), rows.subset(cell))
        for values, cell in sorted(positions.items(), key=lambda kv: kv[0])
    ]


class _Context:
    def __init__(self, catalog: CatalogView, quantile_bins: int,
                 images: SubjectImages | None = None, *, clamp: bool = True) -> None:
        self.catalog = catalog
        self.clamp = clamp
        self.images = images if images is not None else InProcess()
        self.fields = catalog.fields
        self.bins = quantile_bins

    def clamped(self, rows: Rows, name: str) -> np.ndarray:
        x = rows.numbers(name)
        bounds = self.fields[name].bounds
        return x if bounds is None or not self.clamp else np.clip(x, bounds[0], bounds[1])

    def aggregate(self, a: AggSpec, rows: Rows, group: GroupKey) -> Partial:
        def make(kind: str, n: int, stats: dict[str, np.ndarray], **meta: Any) -> Partial:
            meta = {"func": a.func, **meta}
            return Partial(a.name, kind, group, int(n), stats, meta)

        f = a.fields
        if a.func == "count":
            n = len(rows) if not f else len(rows) - int(np.count_nonzero(rows.missing(f[0])))
            return make("count", n, {"n": _arr([n])}, field=f[0] if f else None)
        if a.func in ("sum", "mean", "var", "sd"):
            x = self.clamped(rows, f[0])
            x = x[~np.isnan(x)]
            stats = {"n": _arr([x.size]), "s1": _arr([x.sum()]), "s2": _arr([(x * x).sum()])}
            return make("moments", x.size, stats, field=f[0], bounds=self._bounds(f[0]))
        if a.func == "histogram":
            x = rows.numbers(f[0])
            x = x[~np.isnan(x)]
            return make(
                "histogram",
                x.size,
                {"counts": _histogram(x, a.params)},
                field=f[0],
                edges=[float(e) for e in a.params],
            )
        if a.func == "quantiles":
            return self.quantiles(a, rows, make)
        if a.func in ("corr", "regression"):
            # Stats layout puts y last; the spec puts it first for regression.
            order = f if a.func == "corr" else f[1:] + f[:1]
            z = np.column_stack([self.clamped(rows, c) for c in order]).reshape(-1, len(order))
            z = z[~np.isnan(z).any(axis=1)]
            z = np.column_stack([np.ones(len(z)), z])
            purpose = "corr" if a.func == "corr" else "regression"
            return make("crossprod", len(z), {"m": z.T @ z}, fields=list(order), purpose=purpose)
        if a.func == "contingency":
            return self.contingency(a, rows, make)
        if a.func in ("corr_map", "mean_map") and self.fields[f[0]].continuous:
            return self.field_stats(a, rows, make)
        if a.func in ("count_map", "mean_map"):
            return self.voxel_map(a, rows, make)
        if a.func in VOXEL_TESTS:
            return self.voxel_tests(a, rows, make)
        return self.roi_overlap(a, rows, make)

    def _bounds(self, name: str) -> list[float] | None:
        b = self.fields[name].bounds
        return None if b is None else [float(b[0]), float(b[1])]

    def quantiles(self, a: AggSpec, rows: Rows, make: Callable[..., Partial]) -> Partial:
        lo, hi = self.fields[a.fields[0]].bounds  # type: ignore[misc]  # validate() checked
        x = self.clamped(rows, a.fields[0])
        x = x[~np.isnan(x)]
        counts = np.zeros(self.bins)
        if hi > lo:
            idx = np.minimum(((x - lo) / (hi - lo) * self.bins).astype(np.int64), self.bins - 1)
            counts = np.bincount(idx, minlength=self.bins).astype(np.float64)
        else:  # a degenerate declared range: every value is lo
            counts[0] = x.size
        return make(
            "quantiles",
            x.size,
            {"counts": counts},
            field=a.fields[0],
            lo=float(lo),
            hi=float(hi),
            bins=self.bins,
            probs=[float(p) for p in a.params],
        )

    def contingency(self, a: AggSpec, rows: Rows, make: Callable[..., Partial]) -> Partial:
        cols = [rows.labels(c) for c in a.fields]
        keep = np.array([None not in pair for pair in zip(*cols, strict=True)], dtype=bool)
        cols = [c[keep] for c in cols]
        levels = [self._levels(name, c) for name, c in zip(a.fields, cols, strict=True)]
        counts = np.zeros((len(levels[0]), len(levels[1])))
        index = [{lv: i for i, lv in enumerate(lvs)} for lvs in levels]
        for va, vb in zip(*cols, strict=True):
            counts[index[0][va], index[1][vb]] += 1
        return make(
            "contingency", int(keep.sum()), {"counts": counts}, fields=list(a.fields), levels=levels
        )

    def _levels(self, name: str, observed: np.ndarray) -> list[str]:
        declared = [label(v) for v in (self.fields[name].levels or ())]
        # Undeclared values still count (dropping subjects silently would bias the
        # table); they are appended in sorted order so every site orders them alike.
        extra = sorted(set(observed) - set(declared))
        return declared + extra

    def voxel_map(self, a: AggSpec, rows: Rows, make: Callable[..., Partial]) -> Partial:
        """count = subjects covering each voxel; sum = Σ their clamped weight. An unweighted
        mean_map ships count only (its mean is the fraction of the cohort covering a voxel)."""
        column = a.fields[0]
        weight = a.fields[1] if len(a.fields) > 1 else None
        geom = self.catalog.geometry(column)
        w = self.clamped(rows, weight) if weight else np.ones(len(rows))
        items = [(str(path), float(wi)) for path, wi in zip(rows.values(column), w, strict=True)
                 if not (is_null(path) or np.isnan(wi))]
        # Reading and adding each subject's image is the images' runner's (in-process, or
        # a Dask cluster's workers returning these sums only): query/subjects.py.
        n, count, total = self.images.voxel_sums(self.catalog, column, tuple(geom.shape),
                                                 self.fields[column].max_voxels, items)
        stats = {"count": count}
        if weight:
            stats["sum"] = total
        return make(
            "voxel_map",
            n,
            stats,
            column=column,
            weight=weight,
            shape=list(geom.shape),
            affine=[list(map(float, r)) for r in geom.affine],
            xform_code=int(getattr(geom, "xform_code", 0)),
        )

    def voxel_tests(self, a: AggSpec, rows: Rows, make: Callable[..., Partial]) -> Partial:
        """tmap, tmap2, prop_map: per voxel n, Σw, Σw² over the covering subjects, and the
        same over the whole cohort (subjects with an image and a weight), so the entry
        derives both sides (query/voxeltests.py). prop_map's weight is its condition, 1
        met and 0 not; a subject for whom it is unknown (NULL) is left out."""
        column = a.fields[0]
        geom = self.catalog.geometry(column)
        if a.condition is not None:
            met, unmet = _eval(a.condition, rows, self.fields)
            w = np.where(met, 1.0, np.where(unmet, 0.0, np.nan))
        else:
            w = self.clamped(rows, a.fields[1])
        items = [(str(path), float(wi)) for path, wi in zip(rows.values(column), w, strict=True)
                 if not (is_null(path) or np.isnan(wi))]
        n, count, total, squares = self.images.voxel_moments(
            self.catalog, column, tuple(geom.shape), self.fields[column].max_voxels, items)
        ws = np.asarray([wi for _, wi in items], dtype=np.float64)
        stats = {"count": count, "sum": total, "sum2": squares, "total_n": _arr([n]),
                 "total_sum": _arr([ws.sum()]), "total_sum2": _arr([(ws * ws).sum()])}
        return make(
            "voxel_stats", n, stats, column=column,
            weight=a.fields[1] if len(a.fields) > 1 else None,
            condition=None if a.condition is None else expr_to_dict(a.condition),
            shape=list(geom.shape), affine=[list(map(float, r)) for r in geom.affine],
            xform_code=int(getattr(geom, "xform_code", 0)),
        )

    def field_stats(self, a: AggSpec, rows: Rows, make: Callable[..., Partial]) -> Partial:
        """corr_map, and mean_map of a continuous image: per voxel the subjects with a
        non-zero value, Σx, Σx², Σxw (mean_map: the first two), and the cohort's n, Σw,
        Σw² (subjects with an image and a weight; w = 1 for mean_map)."""
        column = a.fields[0]
        weight = a.fields[1] if len(a.fields) > 1 else None
        geom = self.catalog.geometry(column)
        w = self.clamped(rows, weight) if weight else np.ones(len(rows))
        items = [(str(path), float(wi)) for path, wi in zip(rows.values(column), w, strict=True)
                 if not (is_null(path) or np.isnan(wi))]
        bounds = self.fields[column].bounds if self.clamp else None
        n, count, sx, sxx, sxw = self.images.field_sums(
            self.catalog, column, tuple(geom.shape), self.fields[column].max_voxels, bounds,
            items)
        ws = np.asarray([wi for _, wi in items], dtype=np.float64)
        every = {"count": count, "sx": sx, "sxx": sxx, "sxw": sxw}
        stats = {k: every[k] for k in VOXEL_ARRAYS[a.func]} | {
            "total_n": _arr([n]), "total_sum": _arr([ws.sum()]),
            "total_sum2": _arr([(ws * ws).sum()])}
        return make(
            "voxel_stats", n, stats, column=column, weight=weight, condition=None,
            shape=list(geom.shape), affine=[list(map(float, r)) for r in geom.affine],
            xform_code=int(getattr(geom, "xform_code", 0)),
        )

    def roi_overlap(self, a: AggSpec, rows: Rows, make: Callable[..., Partial]) -> Partial:
        column = a.fields[0]
        geom = self.catalog.geometry(column)
        rois = self.catalog.roi_masks()
        names = sorted(rois)
        paths = [str(p) for p in rows.values(column) if not is_null(p)]
        subjects, n, s1, s2 = self.images.roi_sums(
            self.catalog, column, tuple(geom.shape), self.fields[column].max_voxels,
            [rois[r] for r in names], paths)
        return make(
            "roi_overlap",
            subjects,
            {"n": n, "s1": s1, "s2": s2},
            column=column,
            rois=names,
            voxel_volume_mm3=float(np.prod(geom.voxel_size)),
        )


def _arr(values: list[float]) -> np.ndarray:
    return np.asarray(values, dtype=np.float64)


def _histogram(x: np.ndarray, edges: tuple[float, ...]) -> np.ndarray:
    """Counts as [under, bins..., over]; bins are [e_i, e_i+1) except the last, which
    includes its right edge (numpy.histogram's convention)."""
    e = np.asarray(edges, dtype=np.float64)
    idx = np.searchsorted(e, x, side="right")
    idx[x == e[-1]] = len(e) - 1
    return np.bincount(idx, minlength=len(e) + 1).astype(np.float64)
