"""A map's NIfTI says MNI (sform and qform code 4) exactly when every input image did, and
carries a JSON sidecar of provenance."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from stimctl.results import QueryAnswer
from stimnetd.catalog import load_catalogs
from stimnetd.config import load_config
from stimnetd.query.aggregate import Partial
from stimnetd.query.combine import combine
from stimnetd.testing import CertFactory, write_node_config


@pytest.fixture
def catalog(tmp_path: Path, pki: CertFactory, small_catalog_root: Path, small_catalog: dict) -> dict:
    root = tmp_path / "catalog"
    shutil.copytree(small_catalog_root, root)
    path = write_node_config(tmp_path / "site", pki.issue("node-a", "node"), "node-a",
                             port=7001, catalogs=[{**small_catalog, "root": str(root)}])
    return {"path": path, "root": root}


def _geometry(path: Path):  # type: ignore[no-untyped-def]
    (cat,) = list(load_catalogs(load_config(path).catalogs))
    return cat.geometry("vta_path")


def test_mni_images_give_code_4_and_one_aligned_image_gives_0(catalog: dict) -> None:
    assert _geometry(catalog["path"]).xform_code == 4  # demodata writes MNI (code 4)
    victim = sorted((catalog["root"] / "images" / "vta").iterdir())[2]
    img = nib.load(victim)
    img = nib.Nifti1Image(np.asarray(img.dataobj), img.affine)
    img.set_sform(img.affine, code="aligned")
    nib.save(img, victim)
    assert _geometry(catalog["path"]).xform_code == 0


def _partial(code: int) -> Partial:
    meta = {"column": "vta", "weight": None, "shape": [2, 2, 2],
            "affine": np.eye(4).tolist(), "xform_code": code}
    return Partial("m", "voxel_map", (), 3, {"count": np.ones((2, 2, 2))}, meta)


def test_sites_that_disagree_on_the_space_pool_to_an_undeclared_one() -> None:
    assert combine([[_partial(4)], [_partial(4)]])[0].meta["xform_code"] == 4
    assert combine([[_partial(4)], [_partial(2)]])[0].meta["xform_code"] == 0


def _answer(code: int) -> QueryAnswer:
    affine = [[2.0, 0, 0, -2], [0, 2.0, 0, -14], [0, 0, 2.0, -8], [0, 0, 0, 1]]  # near the STN
    m = {"name": "sweet", "group": {}, "count_key": "c", "affine": affine, "shape": [3, 3, 3],
         "n": 42, "xform_code": code}
    doc = {"result": {"maps": [m]}, "query": {"sql": "SELECT mean_map(vta) FROM t"},
           "manifest": [{"site": "a", "state": "done", "n": 20}, {"site": "b", "state": "done",
                                                                   "n": 22}],
           "privacy": [{"site": "a", "mechanism": "laplace", "epsilon": 0.5, "delta": 0.0},
                       {"site": "b", "mechanism": "laplace", "epsilon": 0.5, "delta": 0.0}]}
    return QueryAnswer("job9", doc, {"c": np.arange(27.0).reshape(3, 3, 3)})


def test_nifti_codes_and_sidecar(tmp_path: Path) -> None:
    paths = _answer(4).save_maps(tmp_path)
    img = nib.load(tmp_path / "sweet_count.nii.gz")
    assert int(img.header["sform_code"]) == 4 and int(img.header["qform_code"]) == 4
    np.testing.assert_allclose(img.affine, _answer(4).maps[0]["affine"])
    side = json.loads((tmp_path / "sweet_count.json").read_text())
    assert tmp_path / "sweet_count.json" in paths
    assert side["job_id"] == "job9" and side["n"] == 42 and side["space"] == "MNI"
    assert side["query"] == {"sql": "SELECT mean_map(vta) FROM t"}
    assert [s["n"] for s in side["sites"]] == [20, 22]
    assert [(p["mechanism"], p["epsilon"]) for p in side["privacy"]] == [("laplace", 0.5)] * 2
    assert "correction" in side and side["correction"] is None
    other = _answer(0).to_nifti()
    assert int(other.header["sform_code"]) == 2 and int(other.header["qform_code"]) == 2
    assert _answer(0).sidecar()["space"] == "undeclared"


def test_png_is_drawn_on_the_template_with_a_colorbar(tmp_path: Path) -> None:
    """The PNG a researcher shows: the MNI152 template behind the map (many grey levels,
    mostly non-black), three panels and a colorbar, and a title naming query and n."""
    import matplotlib.image as mpimg

    ans = _answer(4)
    ans.save_maps(tmp_path)
    png = mpimg.imread(tmp_path / "sweet_count.png")
    height, width = png.shape[:2]
    assert (width, height) == (1000, 360)
    rgb = png[..., :3]
    assert float(np.mean(rgb.max(axis=-1) > 0.05)) > 0.5  # more than half non-black
    grey = rgb[(np.ptp(rgb, axis=-1) < 0.02) & (rgb.mean(axis=-1) < 0.95)
               & (rgb.mean(axis=-1) > 0.05)]
    assert len(np.unique(np.round(grey.mean(axis=-1), 2))) > 40  # anatomy, not flat fill
    # The colorbar: a column strip on the right whose colour runs through many hues.
    right = rgb[:, int(width * 0.9):]
    assert len(np.unique(np.round(right.reshape(-1, 3), 1), axis=0)) > 10
    assert "SELECT mean_map(vta) FROM t" in ans._title(ans.maps[0], "count")
    assert "n = 42" in ans._title(ans.maps[0], "count")
