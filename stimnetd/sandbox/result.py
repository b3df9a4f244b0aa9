"""Turns a script's result file into `Partial`s, trusting nothing the script claims.

Everything in ``result.json`` was written by researcher code, so every number is checked
against what the daemon knows independently: the catalog's fields and declared bounds,
and the number of rows the catalog holds. A statistic that could not have come from
bounded data over at most ``catalog_rows`` subjects is rejected, never repaired: clamping
a sum after the fact would hide a broken (or hostile) script instead of reporting it.

The privacy layer still applies k_min and DP afterwards using the *catalog's* bounds;
these checks make sure the sensitivity it assumes is the sensitivity the data has.

Rejection messages reach the researcher, and the script controls what it wrote, so a
message never echoes a value from the result (a claimed n, a shape, an unknown key or
field name): only the rule, the aggregate's name and catalog metadata.

Names, histogram edges and which groups are emitted are chosen by the script at run time
and so can carry data bits past the noise: a script job declares them in its signed
request and `declared.check_declared` holds the parsed result to that declaration.
(Group labels are declared levels only, here.)
"""

from __future__ import annotations

import math
import re
from collections.abc import Collection, Mapping
from types import MappingProxyType
from typing import Any

import numpy as np

from stimnet.errors import Refused
from stimnet.query.fields import FieldMeta, ImageGeometry
from stimnetd.query.aggregate import GroupKey, Partial

RESULT_VERSION = 1
# Kinds a script may emit; quantiles and ROI overlaps need geometry/levels the daemon
# computes itself, so they stay query-only.
SCRIPT_KINDS = ("count", "moments", "histogram", "crossprod", "contingency", "voxel_map")
MAX_AGGREGATES = 1000
MAX_HISTOGRAM_EDGES = 1001
MAX_CROSSPROD_FIELDS = 50
MAX_VOXELS = 16_000_000
# Every statistic is held as float64, so all of a result's arrays together are bounded:
# a small file referenced by hundreds of statistics would otherwise cost gigabytes.
MAX_RESULT_ELEMENTS = 2 * MAX_VOXELS
# The script's word for the statistic → the query engine's `func` in Partial.meta.
MOMENT_STATS = MappingProxyType({"sum": "sum", "mean": "mean", "variance": "var", "sd": "sd"})
NAME_RE = re.compile(r"[A-Za-z0-9_.:()\[\] +*/,~<>=-]{1,128}\Z")
NUMERIC_TYPES = ("numeric", "integer")
# Float sums of clamped values can land a few ulps past n·bound; scale-aware slack.
REL_TOL = 1e-9

_TOP_KEYS = frozenset({"version", "aggregates"})
_AGG_REQUIRED = frozenset({"kind", "name", "n", "stats"})
_AGG_OPTIONAL = frozenset({"meta", "group"})
_STATS_KEYS: Mapping[str, tuple[frozenset[str], frozenset[str]]] = MappingProxyType(
    {
        # kind: (required, optional)
        "count": (frozenset({"n"}), frozenset()),
        "moments": (frozenset({"n", "s1", "s2"}), frozenset()),
        "histogram": (frozenset({"counts"}), frozenset()),
        "crossprod": (frozenset({"m"}), frozenset()),
        "contingency": (frozenset({"counts"}), frozenset()),
        "voxel_map": (frozenset({"count"}), frozenset({"sum"})),
    }
)
_META_KEYS: Mapping[str, tuple[frozenset[str], frozenset[str]]] = MappingProxyType(
    {
        "count": (frozenset(), frozenset()),
        "moments": (frozenset({"field", "stat"}), frozenset()),
        "histogram": (frozenset({"field", "edges"}), frozenset()),
        "crossprod": (frozenset({"fields", "purpose"}), frozenset()),
        "contingency": (frozenset({"fields", "levels"}), frozenset()),
        "voxel_map": (frozenset({"column", "shape"}), frozenset({"weight"})),
    }
)


class ResultRejected(Refused):
    """The script's result broke a rule; the message names the aggregate and the rule."""


def parse_result(
    doc: Any,
    arrays: Mapping[str, np.ndarray],
    fields: Mapping[str, FieldMeta],
    catalog_rows: int,
    *,
    geometry: Mapping[str, ImageGeometry] | None = None,
) -> list[Partial]:
    """Validate a result document strictly and return its aggregates as `Partial`s.

    `arrays` holds the ``.npy`` side files by file name (as the runner read them).
    `geometry` maps an image column to the catalog's grid; when given, voxel maps must be
    on it and carry its affine (the script's is never used).
    """
    if not isinstance(doc, dict):
        raise ResultRejected("result: the document must be a JSON object")
    _keys("result", doc, _TOP_KEYS, frozenset())
    if doc["version"] != RESULT_VERSION or isinstance(doc["version"], bool):
        raise ResultRejected(f"result: unsupported version (this daemon reads {RESULT_VERSION})")
    aggregates = doc["aggregates"]
    if not isinstance(aggregates, list):
        raise ResultRejected("result: 'aggregates' must be a list")
    if len(aggregates) > MAX_AGGREGATES:
        raise ResultRejected(f"result: more than {MAX_AGGREGATES} aggregates")
    if not isinstance(catalog_rows, int) or catalog_rows < 0:
        raise ValueError("catalog_rows must be a non-negative int")
    parser = _Parser(arrays, fields, catalog_rows, geometry or {})
    partials = [parser.aggregate(i, agg) for i, agg in enumerate(aggregates)]
    seen: set[tuple[str, GroupKey]] = set()
    shapes: dict[str, tuple[str, dict[str, Any]]] = {}
    for p in partials:
        if p.key in seen:
            raise ResultRejected(f"aggregate {p.name!r}: emitted twice for the same group")
        seen.add(p.key)
        # One output, one statistic: its groups are presented as one column.
        if shapes.setdefault(p.name, (p.kind, p.meta)) != (p.kind, p.meta):
            raise ResultRejected(f"aggregate {p.name!r}: a different kind or setting in "
                                 "another group")
    return partials


def _keys(
    where: str, obj: Mapping[str, Any], required: frozenset[str], optional: frozenset[str]
) -> None:
    missing = required - obj.keys()
    if missing:
        raise ResultRejected(f"{where}: missing {sorted(missing)}")
    if obj.keys() - required - optional:
        raise ResultRejected(f"{where}: unknown keys (allowed: {sorted(required | optional)})")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _slack(limit: float) -> float:
    return abs(limit) * REL_TOL + 1e-9


class _Parser:
    def __init__(
        self,
        arrays: Mapping[str, np.ndarray],
        fields: Mapping[str, FieldMeta],
        catalog_rows: int,
        geometry: Mapping[str, ImageGeometry],
    ) -> None:
        self._arrays = arrays
        self._fields = fields
        self._rows = catalog_rows
        self._geometry = geometry
        self._used: set[str] = set()
        self._elements = 0

    # -- one aggregate -----------------------------------------------------------------

    def aggregate(self, index: int, agg: Any) -> Partial:
        where = f"aggregate #{index}"
        if not isinstance(agg, dict):
            raise ResultRejected(f"{where}: must be an object")
        name = agg.get("name")
        if not (isinstance(name, str) and NAME_RE.match(name)):
            raise ResultRejected(f"{where}: name must match {NAME_RE.pattern}")
        where = f"aggregate {name!r}"
        _keys(where, agg, _AGG_REQUIRED, _AGG_OPTIONAL)
        kind = agg["kind"]
        if kind not in SCRIPT_KINDS:
            raise ResultRejected(f"{where}: unknown kind (allowed: {SCRIPT_KINDS})")
        n = agg["n"]
        if not _is_int(n):
            raise ResultRejected(f"{where}: n must be an integer")
        if n < 0:
            raise ResultRejected(f"{where}: n is negative")
        if n > self._rows:
            raise ResultRejected(f"{where}: n exceeds the catalog's row count")
        meta = agg.get("meta", {})
        if not isinstance(meta, dict):
            raise ResultRejected(f"{where}: meta must be an object")
        _keys(f"{where} meta", meta, *_META_KEYS[kind])
        stats_doc = agg["stats"]
        if not isinstance(stats_doc, dict):
            raise ResultRejected(f"{where}: stats must be an object")
        _keys(f"{where} stats", stats_doc, *_STATS_KEYS[kind])
        stats = {key: self._array(where, key, value) for key, value in stats_doc.items()}
        group = self._group(where, agg.get("group", []))
        check = getattr(self, f"_check_{kind}")
        clean_meta = check(where, n, stats, meta)
        return Partial(name=name, kind=kind, group=group, n=n, stats=stats, meta=clean_meta)

    # -- values ------------------------------------------------------------------------

    def _array(self, where: str, key: str, value: Any) -> np.ndarray:
        if isinstance(value, dict):
            _keys(f"{where} stats {key!r}", value, frozenset({"npy"}), frozenset())
            ref = value["npy"]
            if not isinstance(ref, str) or ref not in self._arrays:
                raise ResultRejected(f"{where}: stats {key!r} refers to a missing array file")
            if ref in self._used:
                raise ResultRejected(f"{where}: stats {key!r} refers to an array file another "
                                     "statistic already uses")
            self._used.add(ref)
            raw = np.asarray(self._arrays[ref])
            if raw.dtype.kind not in "iuf":
                raise ResultRejected(f"{where}: stats {key!r} has a non-numeric dtype")
            self._count(where, raw.size)
            arr = raw.astype(np.float64)
        elif isinstance(value, list):
            _numbers_only(where, key, value)
            try:
                arr = np.asarray(value, dtype=np.float64)
            except ValueError:
                raise ResultRejected(f"{where}: stats {key!r} is a ragged array") from None
            self._count(where, arr.size)
        else:
            raise ResultRejected(f"{where}: stats {key!r} must be a list or an npy reference")
        if not np.all(np.isfinite(arr)):
            raise ResultRejected(f"{where}: stats {key!r} contains NaN or infinity")
        return arr

    def _count(self, where: str, elements: int) -> None:
        self._elements += elements
        if self._elements > MAX_RESULT_ELEMENTS:
            raise ResultRejected(f"{where}: the result's arrays hold more than "
                                 f"{MAX_RESULT_ELEMENTS} numbers in all")

    def _group(self, where: str, group: Any) -> GroupKey:
        if not isinstance(group, list):
            raise ResultRejected(f"{where}: group must be a list of [field, level] pairs")
        pairs: list[tuple[str, str]] = []
        for item in group:
            if not (
                isinstance(item, list) and len(item) == 2 and all(isinstance(v, str) for v in item)
            ):
                raise ResultRejected(f"{where}: group entries must be [field, level] strings")
            field, level = item
            meta = self._field(where, field)
            # A free-text group label would be a covert channel for row values.
            if meta.levels is None or level not in meta.levels:
                raise ResultRejected(f"{where}: group level for {field!r} is not a declared level")
            pairs.append((field, level))
        if len({f for f, _ in pairs}) != len(pairs):
            raise ResultRejected(f"{where}: a group field appears twice")
        return tuple(sorted(pairs))

    def _field(self, where: str, name: Any, types: Collection[str] | None = None) -> FieldMeta:
        if not isinstance(name, str) or name not in self._fields:
            raise ResultRejected(f"{where}: names a field that does not exist in the catalog")
        meta = self._fields[name]
        if types is not None and meta.type not in types:
            raise ResultRejected(
                f"{where}: field {name!r} is {meta.type}, expected {'/'.join(types)}"
            )
        return meta

    def _bounded(self, where: str, name: Any) -> tuple[float, float]:
        meta = self._field(where, name, NUMERIC_TYPES)
        if meta.bounds is None:
            raise ResultRejected(f"{where}: field {name!r} has no declared bounds")
        lo, hi = (float(b) for b in meta.bounds)
        return lo, hi

    @staticmethod
    def _shape(where: str, key: str, arr: np.ndarray, shape: tuple[int, ...]) -> None:
        if arr.shape != shape:
            raise ResultRejected(f"{where}: stats {key!r} has the wrong shape")

    @staticmethod
    def _counts(where: str, key: str, arr: np.ndarray, n: int) -> None:
        if np.any(arr < 0):
            raise ResultRejected(f"{where}: stats {key!r} has negative counts")
        if np.any(arr != np.floor(arr)):
            raise ResultRejected(f"{where}: stats {key!r} has non-integer counts")
        if np.any(arr > n):
            raise ResultRejected(f"{where}: stats {key!r} has a cell count above n")

    # -- per kind ----------------------------------------------------------------------

    def _check_count(self, where: str, n: int, stats: dict[str, np.ndarray],
                  meta: dict[str, Any]) -> dict[str, Any]:
        self._shape(where, "n", stats["n"], (1,))
        if stats["n"][0] != n:
            raise ResultRejected(f"{where}: stats n differs from n")
        return {"func": "count", "field": None}

    def _check_moments(self, where: str, n: int, stats: dict[str, np.ndarray],
                  meta: dict[str, Any]) -> dict[str, Any]:
        lo, hi = self._bounded(where, meta["field"])
        if not isinstance(meta["stat"], str) or meta["stat"] not in MOMENT_STATS:
            raise ResultRejected(f"{where}: stat must be one of {sorted(MOMENT_STATS)}")
        for key in ("n", "s1", "s2"):
            self._shape(where, key, stats[key], (1,))
        if stats["n"][0] != n:
            raise ResultRejected(f"{where}: stats n differs from n")
        s1, s2 = float(stats["s1"][0]), float(stats["s2"][0])
        s1_lo, s1_hi = n * lo, n * hi
        if not (s1_lo - _slack(s1_lo) <= s1 <= s1_hi + _slack(s1_hi)):
            raise ResultRejected(
                f"{where}: s1 outside [n·lo, n·hi] for {meta['field']!r} bounds [{lo:g}, {hi:g}]"
            )
        s2_max = n * max(lo * lo, hi * hi)
        if not (0.0 <= s2 <= s2_max + _slack(s2_max)):
            raise ResultRejected(f"{where}: s2 outside [0, n·max(lo², hi²)]")
        # Cauchy–Schwarz: (Σx)² ≤ n Σx²; fails for numbers no real data could give.
        if s1 * s1 > n * s2 + _slack(n * s2):
            raise ResultRejected(f"{where}: s1² > n·s2, inconsistent moments")
        return {
            "func": MOMENT_STATS[meta["stat"]],
            "field": meta["field"],
            "bounds": [lo, hi],
        }

    def _check_histogram(self, where: str, n: int, stats: dict[str, np.ndarray],
                  meta: dict[str, Any]) -> dict[str, Any]:
        self._field(where, meta["field"], NUMERIC_TYPES)
        edges = meta["edges"]
        if not isinstance(edges, list) or not 2 <= len(edges) <= MAX_HISTOGRAM_EDGES:
            raise ResultRejected(
                f"{where}: edges must be a list of 2..{MAX_HISTOGRAM_EDGES} numbers"
            )
        _numbers_only(where, "edges", edges)
        e = np.asarray(edges, dtype=np.float64)
        if not np.all(np.isfinite(e)) or np.any(np.diff(e) <= 0):
            raise ResultRejected(f"{where}: edges must be finite and strictly increasing")
        counts = stats["counts"]
        self._shape(where, "counts", counts, (len(edges) + 1,))
        self._counts(where, "counts", counts, n)
        if counts.sum() != n:
            raise ResultRejected(f"{where}: counts do not sum to n")
        return {"func": "histogram", "field": meta["field"], "edges": e.tolist()}

    def _check_crossprod(self, where: str, n: int, stats: dict[str, np.ndarray],
                  meta: dict[str, Any]) -> dict[str, Any]:
        names = meta["fields"]
        if not isinstance(names, list) or not 1 <= len(names) <= MAX_CROSSPROD_FIELDS:
            raise ResultRejected(f"{where}: fields must list 1..{MAX_CROSSPROD_FIELDS} fields")
        if len(set(map(str, names))) != len(names):
            raise ResultRejected(f"{where}: fields repeat")
        if meta["purpose"] not in ("corr", "regression"):
            raise ResultRejected(f"{where}: purpose must be 'corr' or 'regression'")
        if meta["purpose"] == "regression" and len(names) < 2:
            raise ResultRejected(f"{where}: a regression needs at least one x and a y")
        bounds = [(1.0, 1.0)] + [self._bounded(where, f) for f in names]
        m = stats["m"]
        p1 = len(names) + 1
        self._shape(where, "m", m, (p1, p1))
        if m[0, 0] != n:
            raise ResultRejected(f"{where}: m[0,0] differs from n")
        if not np.allclose(m, m.T, rtol=REL_TOL, atol=1e-9):
            raise ResultRejected(f"{where}: m is not symmetric")
        diag = np.diag(m)
        for j in range(1, p1):
            lo, hi = bounds[j]
            s1_lo, s1_hi = n * lo, n * hi
            if not (s1_lo - _slack(s1_lo) <= m[0, j] <= s1_hi + _slack(s1_hi)):
                raise ResultRejected(f"{where}: m[0,{j}] outside [n·lo, n·hi] for {names[j - 1]!r}")
            s2_max = n * max(lo * lo, hi * hi)
            if not (0.0 <= diag[j] <= s2_max + _slack(s2_max)):
                raise ResultRejected(f"{where}: m[{j},{j}] outside [0, n·max(lo², hi²)]")
        limit = np.sqrt(np.outer(diag, diag))
        if np.any(np.abs(m) > limit + limit * 1e-7 + 1e-9):
            raise ResultRejected(f"{where}: m violates Cauchy–Schwarz, not a cross-product")
        return {"func": meta["purpose"], "fields": list(names), "purpose": meta["purpose"]}

    def _check_contingency(self, where: str, n: int, stats: dict[str, np.ndarray],
                  meta: dict[str, Any]) -> dict[str, Any]:
        names, levels = meta["fields"], meta["levels"]
        if not (isinstance(names, list) and len(names) == 2 and names[0] != names[1]):
            raise ResultRejected(f"{where}: fields must name two distinct categorical fields")
        declared = [self._field(where, f, ("categorical",)).levels for f in names]
        if levels != [list(d) if d is not None else None for d in declared] or None in declared:
            raise ResultRejected(f"{where}: levels must equal the catalog's declared levels")
        counts = stats["counts"]
        self._shape(where, "counts", counts, (len(levels[0]), len(levels[1])))
        self._counts(where, "counts", counts, n)
        if counts.sum() > n:
            raise ResultRejected(f"{where}: counts sum to more than n")
        return {
            "func": "contingency",
            "fields": list(names),
            "levels": [list(lv) for lv in levels],
        }

    def _check_voxel_map(self, where: str, n: int, stats: dict[str, np.ndarray],
                  meta: dict[str, Any]) -> dict[str, Any]:
        column = self._field(where, meta["column"], ("image",))
        shape_doc = meta["shape"]
        if not (
            isinstance(shape_doc, list)
            and 1 <= len(shape_doc) <= 4
            and all(_is_int(s) and s > 0 for s in shape_doc)
        ):
            raise ResultRejected(f"{where}: shape must be 1..4 positive integers")
        shape = tuple(shape_doc)
        if math.prod(shape) > MAX_VOXELS:
            raise ResultRejected(f"{where}: grid has more than {MAX_VOXELS} voxels")
        grid = self._geometry.get(column.name)
        if grid is not None and shape != tuple(grid.shape):
            raise ResultRejected(f"{where}: not on the catalog's grid {tuple(grid.shape)}")
        count = stats["count"]
        self._shape(where, "count", count, shape)
        self._counts(where, "count", count, n)
        if column.max_voxels is not None and count.sum() > n * column.max_voxels:
            raise ResultRejected(
                f"{where}: total count exceeds n × max_voxels ({column.max_voxels}) "
                f"for {column.name!r}"
            )
        geom = self._geometry.get(column.name)
        clean: dict[str, Any] = {
            "func": "mean_map" if "sum" in stats else "count_map",
            "column": column.name,
            "weight": None,
            "shape": list(shape),
            # From the catalog, never the script: 16 free floats would be a covert channel.
            "affine": [list(map(float, r)) for r in geom.affine] if geom is not None else None,
        }
        if "sum" in stats:
            weight = meta.get("weight")
            if weight is None:
                # The privacy layer's sensitivity for a sum map is max_voxels × the weight
                # field's bound; without a declared weight field there is none.
                raise ResultRejected(f"{where}: a sum map needs a bounded weight field")
            lo, hi = self._bounded(where, weight)
            total = stats["sum"]
            self._shape(where, "sum", total, shape)
            low, high = count * lo, count * hi
            if np.any(total < low - np.abs(low) * REL_TOL - 1e-9) or np.any(
                total > high + np.abs(high) * REL_TOL + 1e-9
            ):
                raise ResultRejected(f"{where}: sum map outside [count·lo, count·hi]")
            clean["weight"] = weight
        elif "weight" in meta:
            raise ResultRejected(f"{where}: weight given without a sum map")
        return clean


def _numbers_only(where: str, key: str, value: list[Any]) -> None:
    # JSON true/false/null/strings would silently become 1.0/0.0/NaN under np.asarray.
    stack: list[Any] = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, list):
            stack.extend(item)
        elif isinstance(item, bool) or not isinstance(item, int | float):
            raise ResultRejected(f"{where}: {key!r} must contain only numbers")
        elif isinstance(item, int) and abs(item) > 2**53:
            # Beyond exact doubles (and 10**400 would overflow the conversion outright).
            raise ResultRejected(f"{where}: {key!r} holds an integer beyond ±2^53")
