"""The library a StimNet job script imports inside the sandbox.

A script reads the site's data through ``load_table`` / ``load_image`` / ``load_images``
and releases results only through the ``emit_*`` functions, which write *additive
sufficient statistics* (counts, sums, sums of squares, cross-products, histogram bins,
voxel count/sum maps) to ``/out/result.json``. The daemon validates every number in that
file against the catalog before anything leaves the site, so nothing here is trusted;
this module exists to make the honest path easy and the statistics exactly additive.

Layout inside the container (all fixed by the daemon, none chosen by the script):

* ``/data``               the catalog, read-only
* ``/job/manifest.json``  ``{"tables": {name: relpath}, "image_fields": [...],
  "subject_key": ..., "fields": {name: {"type", "bounds", "levels"}}}``
* ``/out``                where the result goes

This package imports nothing from ``stimnetd``: the image must not depend on the daemon.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

__all__ = [
    "manifest",
    "load_table",
    "load_image",
    "load_images",
    "emit_count",
    "emit_sum",
    "emit_mean",
    "emit_variance",
    "emit_histogram",
    "emit_correlation",
    "emit_regression",
    "emit_contingency",
    "emit_voxel_map",
]

RESULT_VERSION = 1
RESULT_NAME = "result.json"
# Small arrays stay inline so a typical result is one file; voxel maps go to .npy files
# because a JSON list of a million floats is ~20 MB and slow to parse on the daemon side.
INLINE_MAX = 4096


def _dir(env: str, default: str) -> Path:
    # Overridable so the runtime can be unit-tested outside a container; inside the
    # sandbox the daemon fixes the environment, the script cannot reach past its mounts.
    return Path(os.environ.get(env, default))


def _data_dir() -> Path:
    return _dir("STIMNET_DATA", "/data")


def _out_dir() -> Path:
    return _dir("STIMNET_OUT", "/out")


def manifest() -> dict[str, Any]:
    """The job manifest the daemon wrote: table files, image fields, subject key."""
    path = _dir("STIMNET_JOB", "/job") / "manifest.json"
    with open(path, encoding="utf-8") as fh:
        doc = json.load(fh)
    if not isinstance(doc, dict):
        raise ValueError("manifest.json is not an object")
    return doc


# -- reading ---------------------------------------------------------------------------


def _inside_data(relpath: str) -> Path:
    if not isinstance(relpath, str) or not relpath or "\x00" in relpath:
        raise ValueError("image path must be a non-empty string")
    if os.path.isabs(relpath):
        raise PermissionError("image paths are relative to the catalog root")
    root = os.path.realpath(_data_dir())
    full = os.path.realpath(os.path.join(root, relpath))
    # realpath resolves symlinks, so a link inside the catalog pointing outside is
    # refused too, not only literal '..' segments.
    if os.path.commonpath([root, full]) != root:
        raise PermissionError("image path escapes the catalog root")
    return Path(full)


def load_table(name: str):  # -> pandas.DataFrame (pandas imported lazily: slow import)
    """One catalog table as a DataFrame, by its manifest name."""
    import pandas as pd

    tables = manifest().get("tables", {})
    if name not in tables:
        raise KeyError(f"no table {name!r} in this catalog (have: {sorted(tables)})")
    path = _inside_data(tables[name])
    suffix = "".join(path.suffixes[-2:]).lower()
    if suffix.endswith(".parquet"):
        return pd.read_parquet(path)
    sep = "\t" if suffix.endswith((".tsv", ".tab")) else ","
    return pd.read_csv(path, sep=sep)


def load_image(relpath: str):  # -> numpy.ndarray
    """The voxel array of one image file under the catalog root (NIfTI or .npy)."""
    import numpy as np

    path = _inside_data(relpath)
    if path.suffix == ".npy":
        return np.load(path, allow_pickle=False)
    import nibabel as nib

    return np.asanyarray(nib.load(str(path)).dataobj)


def load_images(column: str) -> Iterator[tuple[Any, Any]]:
    """(subject id, voxel array) for every subject with an image in `column`."""
    doc = manifest()
    key = doc.get("subject_key")
    for table in doc.get("tables", {}):
        frame = load_table(table)
        if column not in frame.columns:
            continue
        for subject, relpath in zip(frame[key], frame[column], strict=True):
            if isinstance(relpath, str) and relpath:
                yield subject, load_image(relpath)
        return
    raise KeyError(f"no image column {column!r} in this catalog")


def _column_rows(column: str) -> int:
    for table in manifest().get("tables", {}):
        frame = load_table(table)
        if column in frame.columns:
            return int(frame[column].map(lambda v: isinstance(v, str) and bool(v)).sum())
    raise KeyError(f"no image column {column!r} in this catalog")


# -- emitting --------------------------------------------------------------------------


def _bounds(field: str) -> tuple[float, float] | None:
    try:
        meta = manifest().get("fields", {}).get(field) or {}
    except FileNotFoundError:
        return None
    bounds = meta.get("bounds")
    return (float(bounds[0]), float(bounds[1])) if bounds else None


def _values(field: str, values: Iterable[Any]):
    """Finite values as float64, missing ones dropped, clamped to the declared bounds.

    Clamping here mirrors the query engine, so an honest script's sums stay inside what
    the daemon will accept; the daemon checks the bounds again and never relies on this.
    """
    import numpy as np

    arr = np.asarray(list(values) if not hasattr(values, "__array__") else values, dtype=float)
    arr = arr.reshape(-1)
    arr = arr[~np.isnan(arr)]
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{field}: values must be finite")
    bounds = _bounds(field)
    if bounds is not None:
        arr = np.clip(arr, bounds[0], bounds[1])
    return arr


def _group(group: Mapping[str, Any] | None) -> list[list[str]]:
    if not group:
        return []
    return [[str(k), str(v)] for k, v in sorted(group.items())]


def _write_atomic(path: Path, write) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as fh:
        write(fh)
    os.replace(tmp, path)


def _append(
    kind: str,
    name: str,
    n: int,
    stats: Mapping[str, Any],
    meta: Mapping[str, Any],
    group: Mapping[str, Any] | None,
) -> None:
    import numpy as np

    if not isinstance(name, str) or not name:
        raise ValueError("aggregate name must be a non-empty string")
    out = _out_dir()
    path = out / RESULT_NAME
    try:
        doc = json.loads(path.read_bytes())
    except FileNotFoundError:
        doc = {"version": RESULT_VERSION, "aggregates": []}
    index = len(doc["aggregates"])
    encoded: dict[str, Any] = {}
    for key, value in stats.items():
        arr = np.asarray(value, dtype=np.float64)
        if not np.all(np.isfinite(arr)):
            raise ValueError(f"{name}: {key} has non-finite entries")
        if arr.size > INLINE_MAX:
            fname = f"a{index:04d}_{key}.npy"
            _write_atomic(out / fname, lambda fh, a=arr: np.save(fh, a, allow_pickle=False))
            encoded[key] = {"npy": fname}
        else:
            encoded[key] = arr.tolist()
    entry: dict[str, Any] = {
        "kind": kind,
        "name": name,
        "n": int(n),
        "stats": encoded,
        "meta": dict(meta),
    }
    if group:
        entry["group"] = _group(group)
    doc["aggregates"].append(entry)
    body = json.dumps(doc, allow_nan=False, separators=(",", ":")).encode()
    _write_atomic(path, lambda fh: fh.write(body))


def emit_count(name: str, n: int, *, group: Mapping[str, Any] | None = None) -> None:
    """Release a subject count."""
    if isinstance(n, bool) or int(n) != n or n < 0:
        raise ValueError("count must be a non-negative integer")
    _append("count", name, int(n), {"n": [int(n)]}, {}, group)


def _emit_moments(name, field, values, stat, group) -> None:
    arr = _values(field, values)
    stats = {"n": [arr.size], "s1": [float(arr.sum())], "s2": [float((arr * arr).sum())]}
    _append("moments", name, arr.size, stats, {"field": field, "stat": stat}, group)


def emit_sum(name: str, field: str, values: Iterable[float], *, group=None) -> None:
    """Release Σx (with n and Σx², so the release stays additive) of one field's values."""
    _emit_moments(name, field, values, "sum", group)


def emit_mean(name: str, field: str, values: Iterable[float], *, group=None) -> None:
    """Release the mean of one field's values, as n, Σx, Σx²."""
    _emit_moments(name, field, values, "mean", group)


def emit_variance(name: str, field: str, values: Iterable[float], *, group=None) -> None:
    """Release the variance of one field's values, as n, Σx, Σx²."""
    _emit_moments(name, field, values, "variance", group)


def emit_histogram(
    name: str, field: str, values: Iterable[float], edges: Sequence[float], *, group=None
) -> None:
    """Release bin counts: [under, bins..., over], bins half-open except the last."""
    import numpy as np

    arr = _values(field, values)
    e = np.asarray(edges, dtype=float)
    if e.ndim != 1 or e.size < 2 or not np.all(np.isfinite(e)) or np.any(np.diff(e) <= 0):
        raise ValueError("edges must be at least two finite, strictly increasing numbers")
    inner, _ = np.histogram(arr, bins=e)
    counts = [int((arr < e[0]).sum()), *map(int, inner), int((arr > e[-1]).sum())]
    meta = {"field": field, "edges": e.tolist()}
    _append("histogram", name, arr.size, {"counts": counts}, meta, group)


def _crossprod(name: str, fields: Sequence[str], frame, purpose: str, group) -> None:
    import numpy as np

    fields = list(fields)
    if len(set(fields)) != len(fields):
        raise ValueError("fields must be distinct")
    sub = frame[fields].apply(lambda col: col.astype(float)).dropna()
    cols = []
    for f in fields:
        col = np.array(sub[f], dtype=float)
        bounds = _bounds(f)
        cols.append(np.clip(col, bounds[0], bounds[1]) if bounds is not None else col)
    z = np.column_stack([np.ones(len(sub)), *cols]) if len(sub) else np.zeros((0, len(fields) + 1))
    m = z.T @ z
    meta = {"fields": fields, "purpose": purpose}
    _append("crossprod", name, len(sub), {"m": m}, meta, group)


def emit_correlation(name: str, fields: Sequence[str], frame, *, group=None) -> None:
    """Release Σ z zᵀ with z = [1, fields...]: enough for every pairwise correlation."""
    _crossprod(name, fields, frame, "corr", group)


def emit_regression(name: str, y: str, xs: Sequence[str], frame, *, group=None) -> None:
    """Release XᵀX / Xᵀy for y ~ 1 + xs as one cross-product matrix (y is the last field)."""
    _crossprod(name, [*xs, y], frame, "regression", group)


def emit_contingency(name: str, field_a: str, field_b: str, frame, *, group=None) -> None:
    """Release a table of subject counts over two categorical fields' declared levels.

    Rows whose value is not a declared level are left out (and out of n): an undeclared
    label is a data value and cannot be released.
    """
    import numpy as np

    fields = manifest().get("fields", {})
    levels = [list((fields.get(f) or {}).get("levels") or []) for f in (field_a, field_b)]
    if not all(levels):
        raise ValueError("both fields need declared levels")
    index = [{lv: i for i, lv in enumerate(lvs)} for lvs in levels]
    counts = np.zeros((len(levels[0]), len(levels[1])))
    n = 0
    for va, vb in zip(frame[field_a], frame[field_b], strict=True):
        i, j = index[0].get(str(va)), index[1].get(str(vb))
        if i is not None and j is not None:
            counts[i, j] += 1
            n += 1
    meta = {"fields": [field_a, field_b], "levels": levels}
    _append("contingency", name, n, {"counts": counts}, meta, group)


def emit_voxel_map(
    name: str,
    column: str,
    count,
    sum=None,  # noqa: A002 - the public name in the job API
    *,
    weight: str | None = None,
    n: int | None = None,
    group=None,
) -> None:
    """Release a per-voxel subject count map, and optionally Σ weight per voxel.

    `sum` needs `weight`, the numeric field whose (clamped) values were summed: its
    declared bounds are what make the sum releasable. `n` defaults to the number of
    subjects with an image in `column`. The grid's affine comes from the catalog.
    """
    import numpy as np

    count = np.asarray(count, dtype=np.float64)
    stats: dict[str, Any] = {"count": count}
    meta: dict[str, Any] = {"column": column, "shape": list(count.shape)}
    if sum is not None:
        if weight is None:
            raise ValueError("a sum map needs weight=<the numeric field that was summed>")
        s = np.asarray(sum, dtype=np.float64)
        if s.shape != count.shape:
            raise ValueError("sum map must have the count map's shape")
        stats["sum"] = s
        meta["weight"] = weight
    subjects = _column_rows(column) if n is None else int(n)
    _append("voxel_map", name, subjects, stats, meta, group)
