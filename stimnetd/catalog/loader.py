"""Catalogs: the datasets a site publishes, loaded and validated at start-up.

Validation is eager and total: a daemon that starts serves catalogs whose every table,
declared field, image path and NIfTI header has been read once. A problem is a
`CatalogError` naming the catalog, the file and the rule — operators fix data, not code.
Images are loaded lazily (a voxel map reads them once per query), headers eagerly.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, replace
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd

from stimnet.errors import StimnetError
from stimnet.query.fields import FieldMeta, ImageGeometry
from stimnetd.catalog.columns import Columns
from stimnetd.config import CatalogConfig


class CatalogError(StimnetError):
    code = "FAILED_PRECONDITION"


class UnknownCatalog(StimnetError):
    code = "NOT_FOUND"


@dataclass(frozen=True)
class TableInfo:
    name: str
    rows: int
    columns: tuple[str, ...]


class Catalog:
    """A loaded catalog; satisfies `CatalogView` for the query engine."""

    def __init__(self, config: CatalogConfig, frame: pd.DataFrame, tables: list[TableInfo],
                 geometry: dict[str, ImageGeometry], rois: dict[str, Path]) -> None:
        self.config = config
        self.name = config.name
        self.subject_key = config.subject_key
        self.fields: dict[str, FieldMeta] = dict(config.fields)
        self.tables = tables
        self._frame = frame
        self._geometry = geometry
        self._roi_paths = rois

    @property
    def n_subjects(self) -> int:
        return len(self._frame)

    @property
    def root(self) -> Path:
        return self.config.root

    def frame(self) -> pd.DataFrame:
        # Callers filter and group; with pandas' copy-on-write (always on from pandas 3) a
        # shallow copy keeps one query from mutating the next one's data, without the deep
        # copy that cost a small query a tenth of its time.
        return self._frame.copy(deep=False)

    @functools.cache  # noqa: B019 - a catalog lives as long as the daemon; its data do not change
    def columns(self) -> Columns:
        return Columns(self._frame)

    @functools.cache  # noqa: B019 - a catalog lives as long as the daemon; its data do not change
    def subject_ids(self) -> frozenset[str]:
        # load_catalog made the key column strings, none missing.
        return frozenset(self._frame[self.subject_key].tolist())

    def geometry(self, image_field: str) -> ImageGeometry:
        return self._geometry[image_field]

    def image_fields(self) -> list[str]:
        return [f.name for f in self.fields.values() if f.type == "image"]

    def load_image(self, relpath: str) -> np.ndarray:
        return read_image(self.root, self.name, relpath)

    @functools.cache  # noqa: B019 - a catalog lives as long as the daemon; masks are small
    def roi_masks(self) -> dict[str, np.ndarray]:
        return {name: np.asarray(_nifti(p).dataobj) > 0 for name, p in self._roi_paths.items()}


def read_image(root: Path, catalog: str, relpath: str) -> np.ndarray:
    """One image of the catalog at `root`, by its path there (which may not leave it).

    A function of paths only, so a Dask worker reading the catalog from shared storage
    reads it exactly as the daemon does (query/subjects.py)."""
    path = _inside(root, relpath, catalog)
    try:
        return np.asarray(_nifti(path).dataobj)
    except Exception as exc:  # nibabel raises many types for corrupt files
        raise CatalogError(f"catalog {catalog!r}: image {relpath} is unreadable: {exc}") from None


def load_catalog(cfg: CatalogConfig) -> Catalog:
    frames: list[pd.DataFrame] = []
    infos: list[TableInfo] = []
    declared_by_table: dict[str, list[str]] = {}
    for f in cfg.fields.values():
        declared_by_table.setdefault(f.table, []).append(f.name)
    for tname, path in cfg.tables.items():
        df = _read_table(cfg, tname, path)
        if cfg.subject_key not in df.columns:
            raise CatalogError(f"catalog {cfg.name!r}.subject_key: table {tname} ({path}) has no "
                               f"column {cfg.subject_key!r}")
        blank = df[cfg.subject_key].isna() | (df[cfg.subject_key].str.strip() == "")
        if blank.any():
            raise CatalogError(f"catalog {cfg.name!r}.tables.{tname}: {path} has {int(blank.sum())} rows "
                               f"without a subject id ({cfg.subject_key!r} is empty)")
        dup = df[cfg.subject_key].duplicated()
        if dup.any():
            raise CatalogError(f"catalog {cfg.name!r}.tables.{tname}: {path} has {int(dup.sum())} duplicate "
                               f"subject ids; each table must hold at most one row per subject")
        for fname in declared_by_table.get(tname, []):
            if fname not in df.columns:
                raise CatalogError(f"catalog {cfg.name!r}.fields.{fname}.table: declared in table "
                                   f"{tname}, but {path} has no column {fname!r}")
        infos.append(TableInfo(tname, len(df), tuple(df.columns)))
        keep = [cfg.subject_key, *[c for c in declared_by_table.get(tname, []) if c != cfg.subject_key]]
        frames.append(df[keep])
    joined = frames[0]
    for other in frames[1:]:
        joined = joined.merge(other, on=cfg.subject_key, how="outer")
    joined[cfg.subject_key] = joined[cfg.subject_key].astype(str)
    for f in cfg.fields.values():
        joined[f.name] = _coerce(cfg, f, joined[f.name]) if f.name != cfg.subject_key else joined[f.name]
    geometry = {f.name: _check_images(cfg, f, joined[f.name])
                for f in cfg.fields.values() if f.type == "image"}
    for rname, rpath in cfg.rois.items():
        roi = _header(cfg, rpath, f"ROI {rname}")
        for fname, g in geometry.items():
            # roi_overlap intersects each subject's image with each ROI voxel by voxel.
            if tuple(int(x) for x in roi.shape) != g.shape \
                    or not np.allclose(roi.affine, g.affine):
                raise CatalogError(
                    f"catalog {cfg.name!r}: ROI {rname} ({rpath.name}) is not on the grid of "
                    f"image field {fname!r} (shape {tuple(roi.shape)} vs {g.shape}, or another "
                    "affine)")
    return Catalog(cfg, joined.reset_index(drop=True), infos, geometry, dict(cfg.rois))


def _read_table(cfg: CatalogConfig, tname: str, path: Path) -> pd.DataFrame:
    try:
        df = pd.read_csv(path, dtype=str, keep_default_na=True)
    except pd.errors.EmptyDataError:
        raise CatalogError(f"catalog {cfg.name!r}.tables.{tname}: {path} is empty") from None
    except (pd.errors.ParserError, UnicodeDecodeError) as exc:
        raise CatalogError(f"catalog {cfg.name!r}.tables.{tname}: {path} is not valid CSV: "
                           f"{str(exc).splitlines()[0]}") from None
    except OSError as exc:
        raise CatalogError(f"catalog {cfg.name!r}.tables.{tname}: {path} is unreadable: "
                           f"{exc.strerror}") from None
    # Published CSVs often carry stray spaces in headers (the DataSHIELD CNSIM files do).
    df.columns = [str(c).strip() for c in df.columns]
    return df


def _coerce(cfg: CatalogConfig, f: FieldMeta, col: pd.Series) -> pd.Series:
    if f.type in ("numeric", "integer"):
        values = pd.to_numeric(col.str.strip() if col.dtype == object else col, errors="coerce")
        bad = values.isna() & col.notna() & (col.astype(str).str.strip() != "")
        if bad.any():
            raise CatalogError(f"catalog {cfg.name!r}.fields.{f.name}.type: declared {f.type}, but "
                               f"{int(bad.sum())} values in table {f.table} are not numbers")
        values = values.astype(float)
        # Clamping to the declared bounds would quietly turn these into a bound.
        infinite = np.isinf(values)
        if infinite.any():
            raise CatalogError(f"catalog {cfg.name!r}.fields.{f.name}: {int(infinite.sum())} values in "
                               f"table {f.table} are infinite (or past float range)")
        if f.type == "integer":
            fractional = values.notna() & (values != np.floor(values))
            if fractional.any():
                raise CatalogError(f"catalog {cfg.name!r}.fields.{f.name}.type: declared integer, "
                                   f"but {int(fractional.sum())} values in table {f.table} are not "
                                   "whole numbers")
        return values
    if f.type == "categorical":
        col = col.where(col.isna(), col.astype(str).str.strip())
        if f.levels is not None:
            unknown = set(col.dropna()) - set(f.levels)
            if unknown:
                # Values are not echoed: an undeclared level is itself data.
                raise CatalogError(f"catalog {cfg.name!r}.fields.{f.name}.levels: table "
                                   f"{f.table} has {len(unknown)} values outside the declared "
                                   "levels (rows must use declared levels only)")
        return col
    return col


def _inside(root: Path, rel: str, catalog: str) -> Path:
    p = (root / rel).resolve()
    if not p.is_relative_to(root.resolve()):
        raise CatalogError(f"catalog {catalog!r}: image path {rel!r} escapes the catalog root")
    return p


def _nifti(path: Path) -> nib.Nifti1Pair:
    """`nib.load`, for NIfTI-1/-2 only (single files or .hdr/.img pairs: all subclasses of
    Nifti1Pair): nibabel also opens MGH, plain Analyze and other formats, whose headers
    and affines the catalog's checks do not cover."""
    img = nib.load(path)
    if not isinstance(img, nib.Nifti1Pair):
        raise ValueError(f"it is a {type(img).__name__}, not NIfTI-1 or NIfTI-2")
    return img


def _header(cfg: CatalogConfig, path: Path, what: str) -> nib.Nifti1Pair:
    if not path.is_file():
        raise CatalogError(f"catalog {cfg.name!r}: {what} {path} "
                           f"{'is not a file' if path.exists() else 'does not exist'}")
    try:
        img = _nifti(path)
        # A truncated .nii.gz has a readable header but no data; checking the data size
        # against the header catches it now rather than in the middle of a query.
        _ = img.dataobj[(0,) * len(img.shape)]
        expected = math.prod(img.shape) * img.get_data_dtype().itemsize  # no 64-bit wrap
        if path.suffix == ".nii" and path.stat().st_size < expected:
            raise ValueError("file is shorter than its header says")
        if path.suffix == ".gz":
            np.asarray(img.dataobj)
    except Exception as exc:
        raise CatalogError(f"catalog {cfg.name!r}: {what} {path} is not a readable NIfTI "
                           f"image: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from None
    return img


def _check_images(cfg: CatalogConfig, f: FieldMeta, col: pd.Series) -> ImageGeometry:
    geometry: ImageGeometry | None = None
    for rel in col.dropna():
        path = _inside(cfg.root, str(rel), cfg.name)
        img = _header(cfg, path, f"image {rel} (field {f.name!r})")
        g = ImageGeometry(
            shape=tuple(int(s) for s in img.shape[:3]),
            voxel_size=tuple(float(z) for z in img.header.get_zooms()[:3]),
            affine=tuple(tuple(float(v) for v in row) for row in img.affine),
            space="".join(str(c) for c in nib.aff2axcodes(img.affine)),
            xform_code=int(img.header["sform_code"]),
        )
        if geometry is None:
            geometry = g
        elif g.xform_code != geometry.xform_code:
            geometry = replace(geometry, xform_code=0)
        elif g.shape != geometry.shape or not np.allclose(g.affine, geometry.affine):
            raise CatalogError(f"catalog {cfg.name!r}: image {rel} (field {f.name!r}) is not on "
                               "the common grid of the other images")
    if geometry is None:
        raise CatalogError(f"catalog {cfg.name!r}: image field {f.name!r} has no images")
    return geometry


class CatalogSet:
    """The catalogs a node serves, by name."""

    def __init__(self, catalogs: list[Catalog]) -> None:
        self._by_name = {c.name: c for c in catalogs}

    def __iter__(self):  # type: ignore[no-untyped-def]
        return iter(self._by_name.values())

    def names(self) -> list[str]:
        return sorted(self._by_name)

    def get(self, name: str) -> Catalog:
        try:
            return self._by_name[name]
        except KeyError:
            raise UnknownCatalog(f"this node has no catalog named {name!r}") from None


def load_catalogs(configs: tuple[CatalogConfig, ...] | list[CatalogConfig]) -> CatalogSet:
    return CatalogSet([load_catalog(c) for c in configs])


def count_label(n: int, k_min: int) -> str:
    """Counts below k_min are themselves sensitive (a rare diagnosis at one site)."""
    return f"< {k_min}" if n < k_min else str(n)
