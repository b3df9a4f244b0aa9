"""Combined partials → the researcher's answer.

Inputs may carry differential-privacy noise (negative variances, fractional or negative
counts, a singular XᵀX); every estimator here degrades to None or a clipped value with
a note instead of raising or emitting NaN into JSON.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from stimnet.query.spec import AggSpec, QuerySpec
from stimnetd.query.aggregate import UNLISTED, GroupKey, Partial
from stimnetd.query.voxeltests import voxel_test

SCALAR_FUNCS = ("count", "sum", "mean", "var", "sd", "corr", "quantiles")


@dataclass
class QueryResult:
    columns: list[str]
    rows: list[list[Any]]
    histograms: list[dict[str, Any]] = field(default_factory=list)
    contingency: list[dict[str, Any]] = field(default_factory=list)
    regressions: list[dict[str, Any]] = field(default_factory=list)
    maps: list[dict[str, Any]] = field(default_factory=list)
    roi_overlap: list[dict[str, Any]] = field(default_factory=list)
    # One entry per output/group with withheld cells: {name, group, reason, scope}.
    suppressed: list[dict[str, Any]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    # Voxel arrays by the keys named in `maps`; kept out of to_dict() (they travel chunked).
    arrays: dict[str, np.ndarray] = field(default_factory=dict, repr=False)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        del d["arrays"]
        return _json(d)


def finalize(spec: QuerySpec, combined: list[Partial], *, consume: bool = False) -> QueryResult:
    """The answer from the combined partials. `consume`: the caller hands them over (it
    empties `combined`), so a mean map's answer reuses its sums' arrays instead of
    allocating as much again, and each partial goes once its output is made."""
    index = {p.key: p for p in combined}
    groups = sorted(
        {p.group for p in combined}, key=lambda g: [dict(g).get(f, "") for f in spec.group_by]
    ) or ([()] if not spec.group_by else [])
    if consume:
        combined.clear()
    res = QueryResult(columns=list(spec.group_by) + _scalar_columns(spec), rows=[])
    for group in groups:
        values = dict(group)
        row: list[Any] = [values.get(g) for g in spec.group_by]
        for a in spec.aggregates:
            p = index.pop((a.name, group), None) if consume else index.get((a.name, group))
            if p is None:
                if a.func in SCALAR_FUNCS:
                    row += [None] * _width(a)
                res.notes.append(f"{a.name}{_glabel(group)}: no site returned this output")
                continue
            _Finaliser(res, a, p, owned=consume).run(row)
            del p
        res.rows.append(row)
    res.notes = list(dict.fromkeys(res.notes))
    return res


def _scalar_columns(spec: QuerySpec) -> list[str]:
    cols = []
    for a in spec.aggregates:
        if a.func == "quantiles" and len(a.params) > 1:
            cols += [f"{a.name}[{p:g}]" for p in a.params]
        elif a.func in SCALAR_FUNCS:
            cols.append(a.name)
    return cols


def _width(a: AggSpec) -> int:
    return len(a.params) if a.func == "quantiles" else 1


class _Finaliser:
    def __init__(self, res: QueryResult, a: AggSpec, p: Partial, *, owned: bool = False) -> None:
        self.res, self.a, self.p = res, a, p
        self.owned = owned  # p's arrays may become the answer's (finalize's `consume`)
        self.label = f"{a.name}{_glabel(p.group)}"
        self.everywhere = p.meta.get("suppressed_everywhere")
        if p.meta.get(UNLISTED):
            self.note(str(p.meta[UNLISTED]), per_group=False)
        if p.cell_mask is not None and np.any(p.cell_mask):
            scope = "all" if self.everywhere is not None and np.all(self.everywhere) else "partial"
            res.suppressed.append(
                {
                    "name": a.name,
                    "group": dict(p.group),
                    "reason": p.suppressed_reason,
                    "scope": scope,
                }
            )
            if scope == "partial" and p.kind != "voxel_stats":  # those say it themselves
                self.note("some sites withheld cells; values use the sites that released them")

    def note(self, text: str, *, per_group: bool = True) -> None:
        # Facts about the output as a whole are stated once, not once per group.
        self.res.notes.append(f"{self.label if per_group else self.a.name}: {text}")

    def run(self, row: list[Any]) -> None:
        a, p = self.a, self.p
        if a.func in SCALAR_FUNCS:
            if self.everywhere is not None and np.all(self.everywhere):
                row += [None] * _width(a)
                self.note(f"suppressed at every site ({p.suppressed_reason})")
            elif a.func == "quantiles":
                row += self.quantiles()
            else:
                row.append(self.scalar())
        elif a.func == "histogram":
            self.histogram()
        elif a.func == "contingency":
            self.contingency()
        elif a.func == "regression":
            self.regression()
        elif p.kind == "voxel_stats":  # the voxel tests, and a continuous image's mean_map
            self.voxel_test()
        elif a.func in ("count_map", "mean_map"):
            self.voxel_map()
        else:
            self.roi()

    def scalar(self) -> float | int | None:
        s, f = self.p.stats, self.a.func
        if f == "count":
            return _number(s["n"][0])
        if f == "corr":
            return self.corr()
        n, s1, s2 = (float(s[k][0]) for k in ("n", "s1", "s2"))
        if f == "sum":
            return _number(s1)
        if n <= 0:
            self.note("no non-null values")
            return None
        if f == "mean":
            return s1 / n
        if self.p.meta.get("blocks"):
            # Sample-and-aggregate (privacy/blocks.py): s2 / n is the sites' block-weighted
            # mean of their released variances.
            var = max(0.0, s2 / n)
            return var if f == "var" else math.sqrt(var)
        if n <= 1:
            self.note("variance needs at least two values")
            return None
        var = (s2 - s1 * s1 / n) / (n - 1)
        if var < 0:
            self.note("negative variance (noise or rounding) reported as 0")
            var = 0.0
        return var if f == "var" else math.sqrt(var)

    def corr(self) -> float | None:
        m = self.p.stats["m"]
        n = float(m[0, 0])
        if n <= 1:
            self.note("correlation needs at least two complete cases")
            return None
        sxx = m[1, 1] - m[0, 1] ** 2 / n
        syy = m[2, 2] - m[0, 2] ** 2 / n
        sxy = m[1, 2] - m[0, 1] * m[0, 2] / n
        if sxx <= 0 or syy <= 0:
            self.note("correlation undefined: a field has zero variance")
            return None
        r = float(sxy / math.sqrt(sxx * syy))
        if abs(r) > 1:
            self.note("correlation outside [-1, 1] (noise) clipped")
            r = max(-1.0, min(1.0, r))
        return r

    def quantiles(self) -> list[float | None]:
        meta = self.p.meta
        lo, hi, bins = meta["lo"], meta["hi"], meta["bins"]
        self.note(
            f"quantiles estimated from a {bins}-bin histogram over [{lo:g}, {hi:g}] of values "
            f"clamped to those bounds; error at most (hi-lo)/bins = {(hi - lo) / bins:g}",
            per_group=False,
        )
        if self.p.cell_mask is not None and np.any(self.p.cell_mask):
            self.note("sparse histogram bins (fewer than k_min subjects) were withheld by the "
                      "sites; quantiles use the released bins only, so the error bound above "
                      "does not cover the withheld mass")
        out = [quantile_from_histogram(self.p.stats["counts"], lo, hi, q) for q in self.a.params]
        if any(v is None for v in out):
            self.note("no values to estimate quantiles from")
        return out

    def _cells(self, counts: np.ndarray) -> list[Any]:
        """Counts as nested lists, with None where every site withheld the cell."""
        arr = np.asarray(counts, dtype=np.float64)
        hidden = np.zeros(arr.shape, bool)
        if self.everywhere is not None:
            hidden = np.asarray(self.everywhere, bool).reshape(arr.shape)

        def cells(values: np.ndarray, hid: np.ndarray) -> list[Any]:
            return [None if h else _number(v) for v, h in zip(values, hid, strict=True)]

        if arr.ndim == 1:
            return cells(arr, hidden)
        return [cells(r, h) for r, h in zip(arr, hidden, strict=True)]

    def histogram(self) -> None:
        cells = self._cells(self.p.stats["counts"])
        self.res.histograms.append(
            {
                "name": self.a.name,
                "group": dict(self.p.group),
                "field": self.a.fields[0],
                "edges": list(self.p.meta["edges"]),
                "under": cells[0],
                "counts": cells[1:-1],
                "over": cells[-1],
                "n": self.p.n,
            }
        )

    def contingency(self) -> None:
        self.res.contingency.append(
            {
                "name": self.a.name,
                "group": dict(self.p.group),
                "fields": list(self.a.fields),
                "levels": [list(lv) for lv in self.p.meta["levels"]],
                "counts": self._cells(self.p.stats["counts"]),
                "n": self.p.n,
            }
        )

    def regression(self) -> None:
        fields = list(self.p.meta["fields"])
        out: dict[str, Any] = {
            "name": self.a.name,
            "group": dict(self.p.group),
            "y": fields[-1],
            "terms": ["(intercept)"] + fields[:-1],
            "coefficients": None,
            "std_errors": None,
            "n": None,
            "rss": None,
            "df_residual": None,
        }
        self.res.regressions.append(out)
        if self.everywhere is not None and np.all(self.everywhere):
            self.note(f"suppressed at every site ({self.p.suppressed_reason})")
            return
        out.update(fit_regression(self.p.stats["m"], self.note))

    def voxel_map(self) -> None:
        s, meta = self.p.stats, self.p.meta
        count = np.asarray(s["count"], dtype=np.float64)
        count = count if self.owned and count is s["count"] else count.copy()
        if self.everywhere is not None:
            count[np.asarray(self.everywhere, bool).reshape(count.shape)] = np.nan
        key = f"{self.a.name}{_glabel(self.p.group)}"
        entry = {
            "name": self.a.name,
            "group": dict(self.p.group),
            "column": meta["column"],
            "weight": meta.get("weight"),
            "shape": list(meta["shape"]),
            "affine": meta["affine"],
            "xform_code": int(meta.get("xform_code") or 0),
            "n": self.p.n,
            "count_key": f"{key}:count",
        }
        self.res.arrays[entry["count_key"]] = count
        if self.a.func == "mean_map":
            if "sum" in s:
                num, den = np.asarray(s["sum"], dtype=np.float64), count
                what = "mean weight of the subjects covering the voxel"
            else:
                num, den = count, np.full(count.shape, float(self.p.n))
                what = "fraction of the cohort covering the voxel"
            ok = np.isfinite(den) & (den > 0)
            # Owned: the sums become the means in place (the answer no longer needs them).
            mean = num if self.owned and "sum" in s and num is s["sum"] else np.empty(count.shape)
            np.divide(num, den, out=mean, where=ok)
            mean[~ok] = np.nan
            entry["mean_key"] = f"{key}:mean"
            self.res.arrays[entry["mean_key"]] = mean
            self.note(f"mean map is the {what}; NaN where no subject covers it", per_group=False)
        self.res.maps.append(entry)

    def voxel_test(self) -> None:
        """tmap, tmap2, prop_map, corr_map and a continuous image's mean_map: derived
        from the pooled sums (query/voxeltests.py)."""
        entry, arrays, notes = voxel_test(self.a, self.p, f"{self.a.name}{_glabel(self.p.group)}")
        self.res.maps.append({**entry, "group": dict(self.p.group)})
        self.res.arrays.update(arrays)
        for text in notes:
            self.note(text)

    def roi(self) -> None:
        s, meta = self.p.stats, self.p.meta
        hidden = (
            np.asarray(self.everywhere, bool)
            if self.everywhere is not None
            else np.zeros(len(meta["rois"]), bool)
        )
        rows = []
        for i, name in enumerate(meta["rois"]):
            n, s1, s2 = float(s["n"][i]), float(s["s1"][i]), float(s["s2"][i])
            row: dict[str, Any] = {
                "roi": name,
                "n": None,
                "mean_voxels": None,
                "sd_voxels": None,
                "mean_volume_mm3": None,
            }
            rows.append(row)
            if hidden[i]:
                continue
            row["n"] = _number(n)
            if n > 0:
                row["mean_voxels"] = s1 / n
                row["mean_volume_mm3"] = s1 / n * meta["voxel_volume_mm3"]
            if n > 1:
                row["sd_voxels"] = math.sqrt(max((s2 - s1 * s1 / n) / (n - 1), 0.0))
        self.res.roi_overlap.append(
            {
                "name": self.a.name,
                "group": dict(self.p.group),
                "column": meta["column"],
                "subjects": self.p.n,
                "rois": rows,
            }
        )
        self.note(
            "ROI statistics are over the subjects whose image overlaps each ROI", per_group=False
        )


def quantile_from_histogram(counts: np.ndarray, lo: float, hi: float, prob: float) -> float | None:
    """numpy's default ('linear') quantile, with each order statistic placed inside its bin.

    Each order statistic's estimate lies in the same bin as the true value, so the error
    is below the bin width (hi-lo)/bins, and an interpolation of two such estimates is too.
    """
    c = np.clip(np.asarray(counts, dtype=np.float64), 0, None)
    n = float(c.sum())
    if n < 1:
        return None
    width = (hi - lo) / len(c)
    cum = np.cumsum(c)

    def order_stat(rank: float) -> float:
        b = min(int(np.searchsorted(cum, rank, side="right")), len(c) - 1)
        before = cum[b] - c[b]
        frac = min(max((rank - before + 0.5) / c[b], 0.0), 1.0) if c[b] > 0 else 0.5
        return float(lo + (b + frac) * width)

    h = (n - 1) * prob
    k = math.floor(h)
    t = h - k
    if t == 0:
        return order_stat(k)
    return (1 - t) * order_stat(k) + t * order_stat(k + 1)


def fit_regression(m: np.ndarray, note: Any) -> dict[str, Any]:
    """OLS from Σ z zᵀ with z = [1, x1..xp, y]: XᵀX, Xᵀy and yᵀy are its blocks."""
    m = np.asarray(m, dtype=np.float64)
    xtx, xty, yty = m[:-1, :-1], m[:-1, -1], float(m[-1, -1])
    n, k = float(m[0, 0]), xtx.shape[0]
    out: dict[str, Any] = {"n": _number(n)}
    if n < k or np.linalg.matrix_rank(xtx) < k:
        note(
            "XᵀX is singular (collinear predictors, a constant predictor, or too few "
            "complete cases); coefficients not identifiable"
        )
        return out
    beta = np.linalg.solve(xtx, xty)
    rss = yty - float(beta @ xty)
    if rss < 0:
        note("negative residual sum of squares (noise or rounding) reported as 0")
        rss = 0.0
    out.update(coefficients=beta.tolist(), rss=rss, df_residual=_number(n - k))
    if n - k <= 0:
        note("no residual degrees of freedom; standard errors undefined")
        return out
    diag = np.diag(np.linalg.inv(xtx)) * rss / (n - k)
    out["std_errors"] = [math.sqrt(v) if v >= 0 else None for v in diag]
    return out


def _glabel(group: GroupKey) -> str:
    return "" if not group else "[" + ", ".join(f"{f}={v}" for f, v in group) + "]"


def _number(v: Any) -> int | float:
    """Counts stay integers unless noise made them fractional."""
    f = float(v)
    return int(f) if f.is_integer() else f


def _json(v: Any) -> Any:
    if isinstance(v, dict):
        return {str(k): _json(x) for k, x in v.items()}
    if isinstance(v, list | tuple):
        return [_json(x) for x in v]
    if isinstance(v, np.ndarray):
        return _json(v.tolist())
    if isinstance(v, np.generic):
        v = v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v
