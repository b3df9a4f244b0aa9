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

A field that takes exactly two values a < b (a 0/1-coded outcome or predictor) ties
quantities together: x = a + (b - a)·[x = b], so Σ_C x·q, given Σ_C q (released with it),
is Σ_{C ∩ x=b} q. Such a sum is therefore also audited as that sum of q over the subjects
with x = b (a count where q is 1), which a count or mean WHERE x = b releases directly;
likewise a condition's 0/1 weight (prop_map). Without this, Σ responder over everyone less
count(responders but the target) is the target's response.
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
                   condition: tuple[np.ndarray, np.ndarray] | None = None,
                   continuous: bool = False) -> list[LinearCohort]:
    """The linear statistics aggregate `a` releases over `rows`, each with its cohort, and
    what they are equivalent to over two-valued fields (see the module's docstring).
    `condition`: prop_map's rows whose condition is true, and those where it is false;
    `continuous`: the image's values."""
    out: list[LinearCohort] = []
    for lc in _cohorts(a, rows, group, fine_bins=fine_bins, bounds=bounds, levels=levels,
                       condition=condition, continuous=continuous):
        out += _with_two_valued_parts(lc, rows)
    return out


def _with_two_valued_parts(lc: LinearCohort, rows: Rows) -> list[LinearCohort]:
    """`lc`, and for each two-valued field factor of its quantity, the same sum without
    that factor over the subjects at the field's higher value (recursively)."""
    kind, _, what = lc.quantity.partition(":")
    if lc.cell is not None or kind not in ("sum", "img") or "[" in what:
        return [lc]
    factors = what.split("*")
    out = [lc]
    for i in range(1 if kind == "img" else 0, len(factors)):
        if i and factors[i] == factors[i - 1]:
            continue  # x*x: the same split as its first x
        if kind == "img" and factors[0].endswith(":x") and factors[i] == "x":
            continue  # a continuous image's own value, not a field
        pair = rows.columns.two_values(factors[i])
        if pair is None:
            continue
        rest = factors[:i] + factors[i + 1:]
        at_b = lc.positions[rows.columns.numbers(factors[i])[lc.positions] == pair[1]]
        quantity = (f"{kind}:" + "*".join(rest)) if rest else COUNT
        out += _with_two_valued_parts(
            LinearCohort(lc.output, lc.group, None, quantity, at_b), rows)
    return out


def _cohorts(a: AggSpec, rows: Rows, group: GroupKey, *, fine_bins: int,
             bounds: tuple[float, float] | None, levels: list[list[str]] | None,
             condition: tuple[np.ndarray, np.ndarray] | None,
             continuous: bool) -> list[LinearCohort]:
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
            _voxel_test(a, rows, group, pos, condition)
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
                condition: tuple[np.ndarray, np.ndarray] | None) -> list[LinearCohort]:
    """A voxel test's sums: per voxel over the covering subjects (image quantities) and
    over its whole cohort (those with an image and a weight, or a known condition)."""
    img = a.fields[0]
    used = ~rows.missing(img)
    if a.condition is not None:
        if condition is None:
            raise ValueError(f"{a.name}: the subjects whose condition is known are needed")
        met, unmet = condition
        used &= met | unmet
        w = "[" + json.dumps(expr_to_dict(a.condition), sort_keys=True,
                             separators=(",", ":")) + "]"
        qs = [COUNT, f"img:{img}", f"img:{img}*{w}", _sum(w)]
        # The weight is 0/1: its sums are the image and the count over the subjects
        # meeting the condition, as mean_map and count(*) WHERE <condition> release them.
        return [*(LinearCohort(a.name, group, None, q, pos[used]) for q in qs),
                LinearCohort(a.name, group, None, f"img:{img}", pos[used & met]),
                LinearCohort(a.name, group, None, COUNT, pos[used & met])]
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
