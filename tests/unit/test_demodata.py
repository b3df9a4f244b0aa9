"""The synthetic DBS cohort: determinism, catalog/table agreement, image geometry, and
the structure (site differences, sweet spot) that makes federated demos meaningful."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from stimctl.demodata import (
    GRID_AFFINE,
    GRID_SHAPE,
    SWEET_SPOTS_MM,
    VTA_RADIUS_MAX_MM,
    generate_federation,
    generate_site,
    site_profile,
    vta_max_voxels,
)
from stimnet.query.fields import FIELD_TYPES

N_SUBJECTS = 40
SITES = ["a", "b"]


@pytest.fixture(scope="module")
def federation(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, dict]]:
    root = tmp_path_factory.mktemp("federation")
    return root, generate_federation(root, SITES, n_subjects=N_SUBJECTS, seed=3)


def _tables(root: Path, catalog: dict) -> dict[str, pd.DataFrame]:
    return {name: pd.read_csv(root / rel) for name, rel in catalog["tables"].items()}


def _joined(root: Path, catalog: dict) -> pd.DataFrame:
    tables = _tables(root, catalog)
    return tables["subjects"].merge(tables["stimulation"]).merge(tables["outcomes"])


def _voxels(root: Path, relpath: str) -> np.ndarray:
    return np.asarray(nib.load(root / relpath).dataobj)


def _world_mm(ijk: np.ndarray) -> np.ndarray:
    return ijk @ GRID_AFFINE[:3, :3].T + GRID_AFFINE[:3, 3]


def _snap(xyz: np.ndarray) -> np.ndarray:
    """The nearest voxel centre, computed from the grid rather than the module's helper."""
    ijk = np.round(np.linalg.solve(GRID_AFFINE, np.append(xyz, 1.0))[:3])
    return _world_mm(ijk)


def _stn_outcomes(federation: tuple[Path, dict[str, dict]]) -> list[tuple[Path, pd.Series]]:
    root, catalogs = federation
    rows = []
    for site in SITES:
        frame = _joined(root / site, catalogs[site])
        frame = frame[(frame["target"] == "STN") & frame["improvement_pct"].notna()]
        rows.extend((root / site, row) for _, row in frame.iterrows())
    return rows


def _all_files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def test_same_seed_writes_identical_files(tmp_path: Path) -> None:
    """Two runs with the same seed and site index write byte-identical files and catalogs."""
    first = generate_site(tmp_path / "1", site="a", site_index=1, n_subjects=6, seed=11)
    second = generate_site(tmp_path / "2", site="a", site_index=1, n_subjects=6, seed=11)
    assert first == second
    assert _all_files(tmp_path / "1") == _all_files(tmp_path / "2")


def test_different_seed_draws_a_different_cohort(tmp_path: Path) -> None:
    """Changing the seed changes the drawn cohort, so the seed really drives the data."""
    generate_site(tmp_path / "1", site="a", site_index=0, n_subjects=6, seed=11)
    generate_site(tmp_path / "2", site="a", site_index=0, n_subjects=6, seed=12)
    first = pd.read_csv(tmp_path / "1" / "stimulation.csv")
    second = pd.read_csv(tmp_path / "2" / "stimulation.csv")
    assert first.to_dict() != second.to_dict()


def test_every_table_has_one_row_per_subject(federation) -> None:
    """Each table holds exactly one row per subject, keyed by the same subject ids."""
    root, catalogs = federation
    for site in SITES:
        tables = _tables(root / site, catalogs[site])
        expected = set(tables["subjects"]["subject_id"])
        assert len(expected) == N_SUBJECTS
        for name, table in tables.items():
            assert len(table) == N_SUBJECTS, name
            assert int(table["subject_id"].duplicated().sum()) == 0, name
            assert set(table["subject_id"]) == expected, name


def test_subject_ids_are_unique_across_sites(federation) -> None:
    """Subject ids carry the site prefix, so no id occurs at two sites."""
    root, catalogs = federation
    ids = {
        site: set(_tables(root / site, catalogs[site])["subjects"]["subject_id"]) for site in SITES
    }
    assert ids["a"] & ids["b"] == set()
    assert sorted(i for i in ids["a"] if not i.startswith("a-")) == []


def test_declared_fields_are_exactly_the_table_columns(federation) -> None:
    """Every declared field is a column of its table and every column is declared, with the
    subject key declared once, in the subjects table."""
    root, catalogs = federation
    catalog = catalogs["a"]
    key = catalog["subject_key"]
    assert catalog["fields"][key]["table"] == "subjects"
    assert catalog["fields"][key]["type"] == "id"
    for name, table in _tables(root / "a", catalog).items():
        declared = {f for f, meta in catalog["fields"].items() if meta["table"] == name}
        columns = set(table.columns) if name == "subjects" else set(table.columns) - {key}
        assert declared == columns, name


def test_field_declarations_are_complete(federation) -> None:
    """Numeric/integer fields declare increasing bounds and a unit, categoricals declare
    levels, and the image field declares a positive max_voxels."""
    _, catalogs = federation
    for name, meta in catalogs["a"]["fields"].items():
        assert meta["type"] in FIELD_TYPES, name
        if meta["type"] in ("numeric", "integer"):
            lo, hi = meta["bounds"]
            assert lo < hi, name
            assert isinstance(meta["unit"], str) and meta["unit"] != "", name
        if meta["type"] == "categorical":
            assert len(meta["levels"]) >= 2, name
        if meta["type"] == "image":
            assert isinstance(meta["max_voxels"], int) and meta["max_voxels"] > 0


def test_catalog_entry_is_toml_representable_and_points_at_files(federation) -> None:
    """The catalog holds only TOML-representable values (no None) and every table and ROI
    path it names exists relative to the catalog root."""
    root, catalogs = federation

    def check(value: object) -> None:
        if isinstance(value, dict):
            assert [k for k in value if not isinstance(k, str)] == []
            for v in value.values():
                check(v)
        elif isinstance(value, list):
            for v in value:
                check(v)
        else:
            assert isinstance(value, str | int | float), repr(value)

    catalog = catalogs["a"]
    check(catalog)
    assert set(catalog) == {
        "name",
        "description",
        "subject_key",
        "schema_version",
        "tables",
        "rois",
        "fields",
    }
    for rel in [*catalog["tables"].values(), *catalog["rois"].values()]:
        assert (root / "a" / rel).is_file(), rel


def test_values_lie_within_declared_bounds_and_levels(federation) -> None:
    """Every non-null value respects its field's declared bounds, integrality and levels."""
    root, catalogs = federation
    for site in SITES:
        catalog = catalogs[site]
        tables = _tables(root / site, catalog)
        for name, meta in catalog["fields"].items():
            values = tables[meta["table"]][name].dropna()
            if meta["type"] in ("numeric", "integer"):
                lo, hi = meta["bounds"]
                assert values[~values.between(lo, hi)].tolist() == [], (site, name)
            if meta["type"] == "integer":
                assert values[values != values.round()].tolist() == [], (site, name)
            if meta["type"] == "categorical":
                assert set(values) <= set(meta["levels"]), (site, name)


def test_updrs_is_recorded_for_parkinsons_only(federation) -> None:
    """UPDRS columns are empty for ET and dystonia, baseline is present for every PD
    subject, updrs_change is off minus on wherever both exist, and some follow-ups are
    missing."""
    root, catalogs = federation
    frame = pd.concat(_joined(root / s, catalogs[s]) for s in SITES)
    pd_rows = frame["diagnosis"] == "PD"
    updrs = frame[["updrs_off", "updrs_on", "updrs_change"]]
    assert int(updrs[~pd_rows].notna().sum().sum()) == 0
    assert int(frame.loc[pd_rows, "updrs_off"].isna().sum()) == 0
    both = frame.dropna(subset=["updrs_off", "updrs_on"])
    assert both["updrs_change"].tolist() == (both["updrs_off"] - both["updrs_on"]).tolist()
    assert int(frame["improvement_pct"][~pd_rows].notna().sum()) > 0
    # Missed 12-month visits leave nulls that aggregates must skip.
    assert int(frame["improvement_pct"].isna().sum()) > 0


def test_vta_images_are_binary_on_the_declared_grid(federation) -> None:
    """Every vta_path loads as a uint8 binary image on the MNI 2 mm grid with between 1
    and max_voxels non-zero voxels."""
    root, catalogs = federation
    for site in SITES:
        max_voxels = catalogs[site]["fields"]["vta_path"]["max_voxels"]
        paths = _tables(root / site, catalogs[site])["stimulation"]["vta_path"]
        for rel in paths:
            image = nib.load(root / site / rel)
            data = np.asarray(image.dataobj)
            assert image.shape == GRID_SHAPE
            np.testing.assert_allclose(image.affine, GRID_AFFINE)
            assert data.dtype == np.uint8
            assert set(np.unique(data)) <= {0, 1}
            assert 1 <= np.count_nonzero(data) <= max_voxels, rel


def test_vta_sides_follow_the_implanted_hemisphere(federation) -> None:
    """Left VTAs lie at negative x, right VTAs at positive x, bilateral VTAs on both sides."""
    root, catalogs = federation
    stimulation = _tables(root / "a", catalogs["a"])["stimulation"]
    for _, row in stimulation.iterrows():
        x = _world_mm(np.argwhere(_voxels(root / "a", row["vta_path"])))[:, 0]
        sides = {"left": (x < 0).any(), "right": (x > 0).any()}
        expected = {
            "left": {"left": True, "right": False},
            "right": {"left": False, "right": True},
            "bilateral": {"left": True, "right": True},
        }[row["hemisphere"]]
        assert sides == expected, row["subject_id"]


def test_vta_sides_are_centred_on_voxels(federation) -> None:
    """Each side of a VTA is a ball centred on a voxel centre, the premise max_voxels
    rests on."""
    root, catalogs = federation
    for rel in _tables(root / "a", catalogs["a"])["stimulation"]["vta_path"]:
        xyz = _world_mm(np.argwhere(_voxels(root / "a", rel)))
        for side in (xyz[:, 0] < 0, xyz[:, 0] > 0):
            if side.any():
                centroid = xyz[side].mean(axis=0)
                np.testing.assert_allclose(centroid, _snap(centroid), atol=1e-9)


def test_max_voxels_is_a_bilateral_vta_of_the_largest_radius() -> None:
    """max_voxels equals two balls of the largest VTA radius around voxel centres on the
    grid, so it bounds every VTA and is attained."""
    world = _world_mm(np.argwhere(np.ones(GRID_SHAPE, dtype=bool)))
    centre = np.array(SWEET_SPOTS_MM["STN"])
    nearest = world[np.argmin(np.linalg.norm(world - centre, axis=1))]
    per_side = int((np.linalg.norm(world - nearest, axis=1) <= VTA_RADIUS_MAX_MM).sum())
    assert vta_max_voxels() == 2 * per_side


def test_roi_masks_load_on_the_grid_at_their_side(federation) -> None:
    """All six ROI masks load as non-empty uint8 masks on the grid, each on its named side."""
    root, catalogs = federation
    rois = catalogs["a"]["rois"]
    assert set(rois) == {f"{t}_{s}" for t in ("stn", "gpi", "vim") for s in ("left", "right")}
    for name, rel in rois.items():
        image = nib.load(root / "a" / rel)
        data = np.asarray(image.dataobj)
        assert image.shape == GRID_SHAPE
        np.testing.assert_allclose(image.affine, GRID_AFFINE)
        assert data.dtype == np.uint8
        assert int(np.count_nonzero(data)) > 0, name
        centre_x = _world_mm(np.argwhere(data))[:, 0].mean()
        assert (centre_x < 0) == name.endswith("_left"), name


def test_sites_differ_in_target_mix_and_programming(federation) -> None:
    """Site 0 and site 1 differ in GPi share and mean amplitude, so federated answers are
    not a multiple of one site's."""
    root, catalogs = federation
    a = _tables(root / "a", catalogs["a"])["stimulation"]
    b = _tables(root / "b", catalogs["b"])["stimulation"]
    assert (b["target"] == "GPi").mean() > (a["target"] == "GPi").mean() + 0.2
    assert b["amplitude_ma"].mean() > a["amplitude_ma"].mean() + 0.5


def test_sites_beyond_the_archetypes_have_their_own_profile() -> None:
    """A fourth site is not a copy of the first even though it shares its archetype."""
    assert site_profile(3) != site_profile(0)
    assert site_profile(3) == site_profile(3)


def test_improvement_falls_with_distance_to_the_sweet_spot(federation) -> None:
    """Across STN subjects, improvement correlates negatively with the distance between
    each VTA's centroid (per side, read from the image) and the STN sweet spot."""
    sweet = np.array(SWEET_SPOTS_MM["STN"])
    distances, improvements = [], []
    for site_root, row in _stn_outcomes(federation):
        xyz = _world_mm(np.argwhere(_voxels(site_root, row["vta_path"])))
        per_side = []
        for side in (xyz[:, 0] < 0, xyz[:, 0] > 0):
            if side.any():
                centroid = xyz[side].mean(axis=0)
                per_side.append(np.linalg.norm(centroid - sweet * [np.sign(centroid[0]), 1, 1]))
        distances.append(np.mean(per_side))
        improvements.append(row["improvement_pct"])
    assert len(distances) >= 20
    assert np.corrcoef(distances, improvements)[0, 1] < -0.3


def test_mean_improvement_map_peaks_near_the_sweet_spot(federation) -> None:
    """The voxel-wise mean-improvement map of STN subjects (sides folded together, voxels
    covered by at least 5 subjects) peaks within 5 mm of the STN sweet spot."""
    total = np.zeros(GRID_SHAPE)
    count = np.zeros(GRID_SHAPE)
    for site_root, row in _stn_outcomes(federation):
        covered = _voxels(site_root, row["vta_path"]).astype(bool)
        # The grid is symmetric in x, so reversing axis 0 mirrors left onto right.
        folded = covered | covered[::-1]
        total[folded] += row["improvement_pct"]
        count[folded] += 1
    mean = np.where(count >= 5, total / np.maximum(count, 1), -np.inf)
    peak = _world_mm(np.array(np.unravel_index(np.argmax(mean), GRID_SHAPE)))
    sweet = np.array(SWEET_SPOTS_MM["STN"]) * [np.sign(peak[0]), 1, 1]
    assert np.linalg.norm(peak - sweet) <= 5.0


@pytest.mark.parametrize(("site", "n_subjects"), [("a/b", 5), ("", 5), ("a", 0)])
def test_generate_site_rejects_unsafe_names_and_empty_cohorts(
    tmp_path: Path, site: str, n_subjects: int
) -> None:
    """Site names that could escape a path or id, and empty cohorts, are refused."""
    with pytest.raises(ValueError):
        generate_site(tmp_path, site=site, site_index=0, n_subjects=n_subjects, seed=1)


def test_generate_federation_refuses_duplicate_sites(tmp_path: Path) -> None:
    """Two sites with the same name would overwrite each other, so they are refused."""
    with pytest.raises(ValueError):
        generate_federation(tmp_path, ["a", "a"], n_subjects=2)
