"""A federation's reference space: `describe` shows every site's grid, and a voxel-wise
query over sites on different grids is refused at the entry before any site computes."""

from __future__ import annotations

import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from stimctl import demodata
from stimnet.errors import JobFailed

MAP_QUERY = "SELECT mean_map(vta_path, improvement_pct) AS m FROM dbs_outcomes"
PAD = (4, 4, 2)  # 91×109×91 padded on each side to 99×117×95, the same voxels in MNI


def _onto_wider_grid(root: Path) -> None:
    """Every NIfTI under `root` moved onto the 99×117×95 MNI 2 mm grid (same world
    positions, a larger field of view): a site whose images came from another pipeline."""
    affine = demodata.GRID_AFFINE.copy()
    affine[:3, 3] -= affine[:3, :3] @ np.array(PAD, dtype=float)
    for path in root.rglob("*.nii.gz"):
        img = nib.load(path)
        data = np.pad(np.asarray(img.dataobj), [(p, p) for p in PAD])
        out = nib.Nifti1Image(data, affine)
        out.set_sform(affine, code="mni")
        out.set_qform(affine, code="mni")
        nib.save(out, path)


@pytest.fixture
def two_grids(tmp_path: Path, small_catalog_root: Path, small_catalog: dict) -> list[list[dict]]:
    roots = [tmp_path / "a", tmp_path / "b"]
    for r in roots:
        shutil.copytree(small_catalog_root, r)
    _onto_wider_grid(roots[1])
    declared = {"shape": list(demodata.GRID_SHAPE), "affine": demodata.GRID_AFFINE.tolist(),
                "space": "MNI152NLin2009cAsym"}
    return [[{**small_catalog, "root": str(roots[0]), "grid": declared}],
            [{**small_catalog, "root": str(roots[1])}]]


async def test_describe_shows_each_sites_grid(federation, two_grids) -> None:
    async with federation(two_grids) as fed, fed.client(0) as c:
        grids = {g.site: g for g in (await c.describe("dbs_outcomes")).grids}
        own = (await c.describe("dbs_outcomes", federated=False)).grids
    assert set(grids) == {"site-a", "site-b"}
    assert list(grids["site-a"].shape) == [91, 109, 91] and grids["site-a"].declared
    assert grids["site-a"].space == "MNI152NLin2009cAsym"
    assert list(grids["site-b"].shape) == [99, 117, 95] and not grids["site-b"].declared
    assert list(grids["site-b"].affine)[3] == 98.0 and not grids["site-b"].error
    assert [g.site for g in own] == ["site-a"]


async def _subjobs_at(daemon) -> int:  # type: ignore[no-untyped-def]
    """How many sub-jobs the site was sent (its audit of FederationService calls)."""
    return sum(1 for r in await daemon.store.audit_rows() if "SubJob" in r.action)


async def test_a_grid_mismatch_is_refused_before_any_site_computes(federation,
                                                                   two_grids) -> None:
    async with federation(two_grids, privacy={"dp": "off"}) as fed:
        async with fed.client(0) as c:
            with pytest.raises(JobFailed, match="grids disagree") as err:
                await c.query(MAP_QUERY, federated=True)
            refused_subjobs = await _subjobs_at(fed.daemons[1])
            # The same sites answer a table query: only the voxel-wise one is refused.
            table = await c.query("SELECT count(*) FROM dbs_outcomes", federated=True)
            assert {m["site"] for m in table.manifest if m["state"] == "done"} == \
                {"site-a", "site-b"}
        msg = str(err.value)
        assert "site-a on 91×109×91 at 2×2×2 mm (MNI152NLin2009cAsym)" in msg
        assert "site-b on 99×117×95 at 2×2×2 mm" in msg and "no site computed" in msg
        assert err.value.job is not None
        assert {(e.site, e.state) for e in err.value.job.sites} == \
            {("site-a", "refused"), ("site-b", "refused")}
        # The peer was never sent the map's sub-job; it was sent the table query's.
        assert refused_subjobs == 0 and await _subjobs_at(fed.daemons[1]) >= 1
