"""A catalog's declared reference space ([catalogs.grid]): checked against its images at
load, with one line naming the file and key; without one, the grid is its images'."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from stimctl import demodata
from stimnet.query.fields import Grid, grid_disagreement
from stimnetd.catalog import CatalogError, load_catalogs
from stimnetd.config import ConfigError, load_config
from stimnetd.testing import CertFactory, write_node_config

MNI2 = demodata.GRID_AFFINE.tolist()


def _load(tmp_path: Path, pki: CertFactory, catalog: dict, root: Path, grid: dict | None):
    entry = {**catalog, "root": str(root), **({"grid": grid} if grid is not None else {})}
    path = write_node_config(tmp_path / "site", pki.issue("node-a", "node"), "node-a",
                             port=7001, catalogs=[entry])
    return load_catalogs(load_config(path).catalogs).get(catalog["name"])


@pytest.fixture
def root(tmp_path: Path, small_catalog_root: Path) -> Path:
    out = tmp_path / "catalog"
    shutil.copytree(small_catalog_root, out)
    return out


def test_a_declared_grid_that_matches_the_images_is_the_catalogs_grid(
        tmp_path: Path, pki: CertFactory, small_catalog: dict, root: Path) -> None:
    c = _load(tmp_path, pki, small_catalog, root,
              {"shape": [91, 109, 91], "affine": MNI2, "space": "MNI152NLin2009cAsym"})
    assert c.grid() == Grid((91, 109, 91), tuple(map(tuple, MNI2)), "MNI152NLin2009cAsym", True)


def test_without_a_declared_grid_it_is_taken_from_the_images(
        tmp_path: Path, pki: CertFactory, small_catalog: dict, root: Path) -> None:
    g = _load(tmp_path, pki, small_catalog, root, None).grid()
    assert g is not None and not g.declared
    assert g.shape == (91, 109, 91) and g.same_as(Grid((91, 109, 91), tuple(map(tuple, MNI2))))


def test_images_off_the_declared_grid_are_refused_naming_the_file_and_key(
        tmp_path: Path, pki: CertFactory, small_catalog: dict, root: Path) -> None:
    with pytest.raises(CatalogError) as err:
        _load(tmp_path, pki, small_catalog, root, {"shape": [99, 117, 95], "affine": MNI2})
    msg = str(err.value)
    assert "\n" not in msg and "'dbs_outcomes'.grid" in msg and "images/vta/" in msg
    assert "91×109×91" in msg and "99×117×95" in msg


@pytest.mark.parametrize(("grid", "key"), [
    ({"shape": [91, 109], "affine": MNI2}, "grid.shape"),
    ({"shape": [91, 109, 0], "affine": MNI2}, "grid.shape"),
    ({"shape": [91, 109, 91], "affine": [[1, 0, 0], [0, 1, 0]]}, "grid.affine"),
    ({"shape": [91, 109, 91], "affine": MNI2, "voxels": 3}, "grid"),
    ({"affine": MNI2}, "grid"),
])
def test_a_malformed_grid_is_a_config_error_naming_its_key(
        tmp_path: Path, pki: CertFactory, small_catalog: dict, root: Path,
        grid: dict, key: str) -> None:
    with pytest.raises(ConfigError, match=f"'dbs_outcomes'.{key}"):
        _load(tmp_path, pki, small_catalog, root, grid)


def test_disagreeing_grids_are_named_by_site() -> None:
    a = Grid((91, 109, 91), tuple(map(tuple, MNI2)))
    b = Grid((99, 117, 95), tuple(map(tuple, MNI2)))
    assert grid_disagreement({"site-a": a, "site-c": a}) is None
    msg = grid_disagreement({"site-a": a, "site-b": b, "site-c": a})
    assert msg is not None
    assert "site-a, site-c on 91×109×91 at 2×2×2 mm" in msg and "site-b on 99×117×95" in msg
    # Declared space names are compared only when both sides declare one.
    named = Grid(a.shape, a.affine, "MNI152NLin6Asym", True)
    assert grid_disagreement({"x": a, "y": named}) is None
    assert grid_disagreement({"x": named, "y": Grid(a.shape, a.affine, "other", True)})


def test_describe_rows_say_where_each_grid_came_from() -> None:
    from stimctl.cli import _grid_row
    from stimnet.v1 import node_pb2

    flat = [v for row in MNI2 for v in row]
    assert _grid_row(node_pb2.SiteGrid(site="a", shape=[91, 109, 91], affine=flat,
                                       space="MNI", declared=True)) == \
        ["a", "91×109×91", "2×2×2", "MNI", "declared"]
    assert _grid_row(node_pb2.SiteGrid(site="b", shape=[99, 117, 95], affine=flat))[-1] == \
        "its images"
    assert _grid_row(node_pb2.SiteGrid(site="c", error="no answer within 5s"))[-1] == \
        "not known: no answer within 5s"
