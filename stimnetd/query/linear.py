"""The cohorts an aggregate's linear statistics are sums over: what exact auditing checks.

An aggregate's cohort is the set of subjects it actually uses, not the WHERE set: a sum
over a field skips subjects where it is NULL, a regression the rows missing any of its
fields, a map the subjects without an image. Padding a cohort with subjects whose field is
NULL changes the WHERE set but not the sum, so auditing the WHERE set would let two sums
one subject apart through.

Each `LinearCohort` is one released linear statistic family: `quantity` names the
per-subject value summed ("1" for a count, "sum:x" for Σx, "sum:x*y" for Σxy,
"img:c" for the voxels of image column c, ...), `cell` the histogram bin, quantile bin or
contingency cell (flat index) it is the count of (None: the whole partial), `positions`
the catalog rows (one row is one subject) it sums over. Statistics of the same quantity
are audited together (privacy/span.py); a count is quantity "1" whatever it counts.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np

from stimnet.query.spec import AggSpec, expr_to_dict
from stimnetd.catalog.columns import Rows
from stimnetd.query.aggregate import GroupKey

COUNT = "1"


@dataclass(frozen=True)
class LinearCohort:
    output: str
    group: GroupKey
    cell: int | None
    quantity: str
    positions: np.ndarray
    # A contingency cell's (row level, column level): the site may leave levels out.
    levels: tuple[str, str] | None = None


def _sum(*fields: str) -> str:
    return "sum:" + "*".join(sorted(fields))


def linear_cohorts(a: AggSpec, rows: Rows, group: GroupKey, *, fine_bins: int = 1024,
                   bounds: tuple[float, float] | None = None,
                   levels: list[list[str]] | None = None,
                   known: np.ndarray | None = None, continuous: bool = False
                   ) -> list[LinearCohort]:
    """The linear statistics aggregate `a` releases over `rows`, each with its cohort.
    `known`: prop_map's rows whose condition is known; `continuous`: the image's values."""
    pos = np.arange(len(rows)) if rows.positions is None else np.asarray(rows.positions)
    f = a.fields

    def whole(used: np.ndarray, *quantities: str) -> list[LinearCohort]:
        return [LinearCohort(a.name, group, None, q, pos[used]) for q in quantities]

    def cells(used: np.ndarray, idx: np.ndarray, n_cells: int) -> list[LinearCohort]:
        # The partial's n (the cells' total) is released too.
        p = pos[used]
        return [LinearCohort(a.name, group, None, COUNT, p),
                *(LinearCohort(a.name, group, c, COUNT, p[idx == c]) for c in range(n_cells))]

    if a.func == "count":
        used = ~rows.missing(f[0]) if f else np.ones(len(rows), dtype=bool)
        return whole(used, COUNT)
    if a.func in ("sum", "mean", "var", "sd"):
        used = ~np.isnan(rows.numbers(f[0]))
        return whole(used, COUNT, _sum(f[0]), _sum(f[0], f[0]))
    if a.func in ("corr", "regression"):
        used = ~np.isnan(np.column_stack([rows.numbers(c) for c in f])).any(axis=1) \
            if len(rows) else np.zeros(0, dtype=bool)
        qs = [COUNT, *(_sum(x) for x in f),
              *(_sum(x, y) for i, x in enumerate(f) for y in f[i:])]
        return whole(used, *qs)
    if a.func == "histogram":
        x = rows.numbers(f[0])
        used = ~np.isnan(x)
        e = np.asarray(a.params, dtype=np.float64)
        xs = x[used]
        idx = np.searchsorted(e, xs, side="right")
        idx[xs == e[-1]] = len(e) - 1
        return cells(used, idx, len(e) + 1)
    if a.func == "quantiles" and bounds is not None:
        x = rows.numbers(f[0])
        used = ~np.isnan(x)
        lo, hi = bounds
        xs = np.clip(x[used], lo, hi)
        idx = np.minimum(((xs - lo) / (hi - lo) * fine_bins).astype(np.int64), fine_bins - 1) \
            if hi > lo else np.zeros(xs.size, dtype=np.int64)
        return cells(used, idx, fine_bins)
    if a.func == "contingency" and levels is not None:
        return _contingency(a, rows, group, pos, levels)
    if a.condition is not None or a.func in ("tmap", "tmap2", "corr_map") or continuous:
        return _field_map(a, rows, group, pos) if continuous else \
            _voxel_test(a, rows, group, pos, known)
    if a.func in ("count_map", "mean_map", "roi_overlap"):
        used = ~rows.missing(f[0])
        qs = [COUNT, f"img:{f[0]}"]
        if a.func == "mean_map" and len(f) > 1:
            used &= ~np.isnan(rows.numbers(f[1]))
            qs.append(f"img:{f[0]}*{f[1]}")
        return whole(used, *qs)
    raise ValueError(f"{a.name}: no linear cohorts for {a.func!r}")


def _field_map(a: AggSpec, rows: Rows, group: GroupKey, pos: np.ndarray) -> list[LinearCohort]:
    """A continuous image's sums: per voxel its non-zero subjects, Σx (and for corr_map
    Σx², Σxw), over the subjects with an image (and a weight); corr_map's Σw, Σw² too."""
    f, img = a.fields, f"img:{a.fields[0]}"
    used = ~rows.missing(f[0])
    qs = [COUNT, img, f"{img}:x"]
    if a.func == "corr_map":
        used &= ~np.isnan(rows.numbers(f[1]))
        qs += [f"{img}:x*x", f"{img}:x*{f[1]}", _sum(f[1]), _sum(f[1], f[1])]
    return [LinearCohort(a.name, group, None, q, pos[used]) for q in qs]


def _voxel_test(a: AggSpec, rows: Rows, group: GroupKey, pos: np.ndarray,
                known: np.ndarray | None) -> list[LinearCohort]:
    """A voxel test's sums: per voxel over the covering subjects (image quantities) and
    over its whole cohort (those with an image and a weight, or a known condition)."""
    img = a.fields[0]
    used = ~rows.missing(img)
    if a.condition is not None:
        if known is None:
            raise ValueError(f"{a.name}: the subjects whose condition is known are needed")
        used &= known
        w = "[" + json.dumps(expr_to_dict(a.condition), sort_keys=True,
                             separators=(",", ":")) + "]"
        qs = [COUNT, f"img:{img}", f"img:{img}*{w}", _sum(w)]
    else:
        w = a.fields[1]
        used &= ~np.isnan(rows.numbers(w))
        qs = [COUNT, f"img:{img}", f"img:{img}*{w}", f"img:{img}*{w}*{w}", _sum(w), _sum(w, w)]
    return [LinearCohort(a.name, group, None, q, pos[used]) for q in qs]


def _contingency(a: AggSpec, rows: Rows, group: GroupKey, pos: np.ndarray,
                 levels: list[list[str]]) -> list[LinearCohort]:
    """The table's total and each cell, keyed by its levels (the site may leave some out)."""
    cols = [rows.labels(c) for c in a.fields]
    used = np.array([None not in pair for pair in zip(*cols, strict=True)], dtype=bool)
    index = [{lv: i for i, lv in enumerate(lvs)} for lvs in levels]
    idx = np.array([index[0][va] * len(levels[1]) + index[1][vb]
                    for va, vb in zip(cols[0][used], cols[1][used], strict=True)],
                   dtype=np.int64)
    p = pos[used]
    width = len(levels[1])
    return [LinearCohort(a.name, group, None, COUNT, p),
            *(LinearCohort(a.name, group, c, COUNT, p[idx == c],
                           (levels[0][c // width], levels[1][c % width]))
              for c in range(len(levels[0]) * width))]
