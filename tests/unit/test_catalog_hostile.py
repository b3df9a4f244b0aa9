"""A site's own files, broken in the ways files break: each load either works or raises
CatalogError naming the file or field (the daemon turns that into one line and exit 2),
never another exception and never a data value in the message."""

from __future__ import annotations

import gzip
import shutil
from collections.abc import Callable
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from stimnetd.catalog import CatalogError, load_catalogs
from stimnetd.config import ConfigError, load_config
from stimnetd.testing import CertFactory, write_node_config

SECRET = "S3CR3T-VALUE"


@pytest.fixture
def site(tmp_path: Path, pki: CertFactory, small_catalog_root: Path,
         small_catalog: dict) -> tuple[Path, Path]:
    root = tmp_path / "catalog"
    shutil.copytree(small_catalog_root, root)
    path = write_node_config(tmp_path / "site", pki.issue("node-a", "node"), "node-a",
                             port=7001, catalogs=[{**small_catalog, "root": str(root)}])
    return path, root


def _table(root: Path, name: str, edit: Callable[[pd.DataFrame], pd.DataFrame | None]) -> None:
    p = root / f"{name}.csv"
    df = pd.read_csv(p, dtype=str, keep_default_na=False)
    out = edit(df)
    (df if out is None else out).to_csv(p, index=False)


def _first_vta(root: Path) -> Path:
    return sorted((root / "images" / "vta").iterdir())[0]


def _image(root: Path, data: np.ndarray, affine: np.ndarray | None = None) -> None:
    victim = _first_vta(root)
    nib.save(nib.Nifti1Image(data, np.eye(4) if affine is None else affine), victim)


def _set(df: pd.DataFrame, col: str, value: str, row: int = 2) -> None:
    df.loc[row, col] = value


BREAKAGES: dict[str, Callable[[Path], None]] = {
    "duplicate subject": lambda r: _table(r, "subjects", lambda d: pd.concat([d, d.iloc[[0]]])),
    "subject key missing": lambda r: _table(r, "subjects", lambda d: d.drop(columns=["subject_id"])),
    "header only": lambda r: _table(r, "subjects", lambda d: d.iloc[0:0]),
    "blank subject id": lambda r: _table(r, "subjects", lambda d: _set(d, "subject_id", "")),
    "undeclared level": lambda r: _table(r, "subjects", lambda d: _set(d, "sex", SECRET)),
    "inf in a numeric field": lambda r: _table(r, "subjects", lambda d: _set(d, "age", "inf")),
    "huge integer": lambda r: _table(r, "outcomes", lambda d: _set(d, "updrs_off", "9" * 400)),
    "fraction in an integer field": lambda r: _table(
        r, "stimulation", lambda d: _set(d, "frequency_hz", "130.5")),
    "orphan row in another table": lambda r: _table(
        r, "outcomes", lambda d: _set(d, "subject_id", SECRET)),
    "empty image path": lambda r: _table(r, "stimulation", lambda d: _set(d, "vta_path", "", 0)),
    "image path is a directory": lambda r: _table(
        r, "stimulation", lambda d: _set(d, "vta_path", "images", 0)),
    "binary garbage table": lambda r: (r / "subjects.csv").write_bytes(bytes(range(256)) * 40),
    "unbalanced quote": lambda r: (r / "subjects.csv").write_text(
        (r / "subjects.csv").read_text().replace(",", ',"', 1)),
    "BOM before the header": lambda r: (r / "subjects.csv").write_bytes(
        b"\xef\xbb\xbf" + (r / "subjects.csv").read_bytes()),
    "table is a directory": lambda r: ((r / "subjects.csv").unlink(),
                                       (r / "subjects.csv").mkdir()),
    "image off the grid": lambda r: _image(r, np.zeros((10, 10, 10), np.uint8)),
    "4-D image": lambda r: _image(r, np.zeros((91, 109, 91, 2), np.uint8)),
    "NaN voxels": lambda r: _image(r, np.full((91, 109, 91), np.nan, np.float32)),
    "another affine": lambda r: _image(r, np.zeros((91, 109, 91), np.uint8), np.eye(4) * 3),
    "gzip of nothing": lambda r: _first_vta(r).write_bytes(gzip.compress(b"")),
    "empty image file": lambda r: _first_vta(r).write_bytes(b""),
    "ROI off the grid": lambda r: nib.save(
        nib.Nifti1Image(np.ones((5, 5, 5), np.uint8), np.eye(4)),
        sorted((r / "rois").iterdir())[0]),
    "ROI missing": lambda r: sorted((r / "rois").iterdir())[0].unlink(),
}


REFUSED = {  # breakage: what the refusal must say
    "blank subject id": "has 1 rows without a subject id",
    "inf in a numeric field": ".fields.age: 1 values in table subjects are infinite",
    "huge integer": ".fields.updrs_off: 1 values in table outcomes are infinite (or past "
                   "float range)",
    "fraction in an integer field": ".fields.frequency_hz.type: declared integer, but 1 values in "
                                    "table stimulation are not whole numbers",
    "image path is a directory": "is not a file",
    "ROI off the grid": "ROI gpi_left (gpi_left.nii.gz) is not on the grid of image field "
                        "'vta_path'",
    "duplicate subject": "has 1 duplicate subject ids",
    "undeclared level": "'dbs_outcomes'.fields.sex.levels: table subjects has 1 values outside the "
                        "declared levels",
    "table is a directory": "subjects.csv is not a file",
}


@pytest.mark.parametrize("breakage", sorted(BREAKAGES))
def test_a_broken_catalog_loads_or_is_refused_by_name(site: tuple[Path, Path],
                                                      breakage: str) -> None:
    """A damaged catalog either loads or is refused with a message naming the catalog or file,
    never its data."""
    path, root = site
    BREAKAGES[breakage](root)
    try:
        catalogs = load_catalogs(load_config(path).catalogs)
    except (CatalogError, ConfigError) as exc:  # ConfigError: a declared file is missing
        message = str(exc)
        assert message != "" and SECRET not in message and "9" * 50 not in message, message
        assert "dbs_outcomes" in message or ".csv" in message or ".nii" in message, message
        assert REFUSED.get(breakage, "") in message, message
        return
    assert breakage not in REFUSED, f"{breakage} loaded"
    # Loaded: it must then answer a query over every column without an internal error.
    from stimnet.query.sql import parse_sql
    from stimnetd.query.engine import compute

    catalog = catalogs.get("dbs_outcomes")
    spec = parse_sql("SELECT count(*), avg(age), sum(updrs_off), count_map(vta_path), "
                     "roi_overlap(vta_path) FROM dbs_outcomes GROUP BY sex")
    compute(spec, catalog)
