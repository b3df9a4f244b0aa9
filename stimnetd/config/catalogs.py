"""The catalogs a site serves ([[catalogs]]): their files, kept inside the catalog root,
and the metadata of every field a query may name."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from stimnet.query.fields import FIELD_TYPES, FieldMeta, Grid
from stimnetd.config.reader import Reader


@dataclass(frozen=True)
class CatalogConfig:
    name: str
    description: str
    root: Path
    subject_key: str
    schema_version: int
    tables: dict[str, Path]
    rois: dict[str, Path]
    fields: dict[str, FieldMeta]
    # The declared reference space of every image field; None: taken from the images.
    grid: Grid | None = None


def read_catalog(r: Reader, raw: dict[str, Any], w: str) -> CatalogConfig:
    raw = r.table(raw, w, {"name", "description", "root", "subject_key", "schema_version",
                           "tables", "rois", "fields", "grid"})
    name = r.get(raw, w, "name", str)
    w = f"catalog {name!r}"
    root = r.path_of(r.get(raw, w, "root", str), f"{w}.root").resolve()
    if not root.is_dir():
        raise r.fail(f"{w}.root", f"{root} is not a directory")
    tables_raw = r.table(r.get(raw, w, "tables", dict), f"{w}.tables",
                         set(r.get(raw, w, "tables", dict)))
    if not tables_raw:
        raise r.fail(f"{w}.tables", "at least one table is required")
    tables = {t: _inside(r, root, rel, f"{w}.tables.{t}") for t, rel in tables_raw.items()}
    rois = {roi: _inside(r, root, rel, f"{w}.rois.{roi}")
            for roi, rel in r.get(raw, w, "rois", dict, {}).items()}
    fields_raw = r.get(raw, w, "fields", dict, {})
    fields = {f: _field_meta(r, f, spec, f"{w}.fields.{f}", set(tables))
              for f, spec in fields_raw.items()}
    subject_key = r.get(raw, w, "subject_key", str)
    version = r.get(raw, w, "schema_version", int, 1)
    return CatalogConfig(name=name, description=r.get(raw, w, "description", str, ""),
                         root=root, subject_key=subject_key, schema_version=version,
                         tables=tables, rois=rois, fields=fields,
                         grid=_grid(r, raw["grid"], f"{w}.grid") if "grid" in raw else None)


def _grid(r: Reader, raw: Any, where: str) -> Grid:
    raw = r.table(raw, where, {"shape", "affine", "space"})
    shape = r.get(raw, where, "shape", list)
    if len(shape) != 3 or not all(type(x) is int and x > 0 for x in shape):
        raise r.fail(f"{where}.shape", "must be three positive integers, e.g. [91, 109, 91]")
    affine = r.get(raw, where, "affine", list)
    if (len(affine) != 4 or not all(isinstance(row, list) and len(row) == 4 for row in affine)
            or not all(isinstance(x, int | float) and not isinstance(x, bool)
                       and math.isfinite(x) for row in affine for x in row)):
        raise r.fail(f"{where}.affine", "must be a 4×4 list of numbers (the images' sform)")
    return Grid(shape=tuple(shape), affine=tuple(tuple(float(x) for x in row) for row in affine),
                space=r.get(raw, where, "space", str, ""), declared=True)


def _inside(r: Reader, root: Path, rel: Any, where: str) -> Path:
    if not isinstance(rel, str):
        raise r.fail(where, "must be a path string relative to the catalog root")
    p = (root / rel).resolve()
    if not p.is_relative_to(root.resolve()):
        raise r.fail(where, f"path {rel!r} escapes the catalog root {root}")
    if not p.is_file():
        raise r.fail(where, f"{p} is not a file" if p.exists()
                     else f"file {p} does not exist")
    return p


def _field_meta(r: Reader, name: str, raw: Any, where: str, tables: set[str]) -> FieldMeta:
    raw = r.table(raw, where, {"table", "type", "unit", "description", "bounds", "levels",
                               "max_voxels", "continuous"})
    ftype = r.get(raw, where, "type", str, choices=FIELD_TYPES)
    table = r.get(raw, where, "table", str)
    if table not in tables:
        raise r.fail(f"{where}.table", f"table {table!r} is not declared in tables")
    continuous = r.get(raw, where, "continuous", bool, False)
    bounds = None
    if "bounds" in raw:
        b = raw["bounds"]
        if (not isinstance(b, list) or len(b) != 2
                or not all(isinstance(x, int | float) and not isinstance(x, bool) for x in b)
                or not all(math.isfinite(x) for x in b) or not b[0] < b[1]):
            raise r.fail(f"{where}.bounds", "must be [lower, upper] with lower < upper")
        if ftype not in ("numeric", "integer") and not (ftype == "image" and continuous):
            raise r.fail(f"{where}.bounds", "bounds only apply to numeric fields and continuous "
                         f"images, not {'mask images' if ftype == 'image' else ftype}")
        bounds = (float(b[0]), float(b[1]))
    levels = None
    if "levels" in raw:
        lv = raw["levels"]
        if not isinstance(lv, list) or not lv or not all(isinstance(x, str) for x in lv):
            raise r.fail(f"{where}.levels", "must be a non-empty list of strings")
        if ftype != "categorical":
            raise r.fail(f"{where}.levels", "levels only apply to categorical fields")
        levels = tuple(lv)
    max_voxels = r.get(raw, where, "max_voxels", int, None) if "max_voxels" in raw else None
    if continuous and ftype != "image":
        raise r.fail(f"{where}.continuous", f"only image fields are continuous, not {ftype}")
    if continuous and bounds is None:
        # The values' bounds are what DP noise on the image's sums is scaled to.
        raise r.fail(f"{where}.bounds", "a continuous image declares the bounds of its values, "
                     "e.g. bounds = [0, 2] for an E-field magnitude in V/mm")
    return FieldMeta(name=name, table=table, type=ftype, unit=r.get(raw, where, "unit", str, ""),
                     description=r.get(raw, where, "description", str, ""),
                     bounds=bounds, levels=levels, max_voxels=max_voxels, continuous=continuous)
