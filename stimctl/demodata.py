"""Synthetic deep-brain-stimulation cohorts for demos, tests and benchmarks.

`generate_site` writes one site's `dbs_outcomes` catalog (three CSV tables, one binary
VTA image per subject, ROI masks) and returns the catalog entry for the node's TOML
config. Everything is a deterministic function of (seed, site, site_index); no patient
data is involved.

The cohort is built so that federated answers are worth looking at: sites differ in
case mix, surgical targets, programming habits and effect sizes, and clinical benefit
falls off with the distance between the VTA centre and a per-target "sweet spot", so a
voxel-wise mean-improvement map peaks there.
"""

from __future__ import annotations

import gzip
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pandas as pd

CATALOG_NAME = "dbs_outcomes"

GRID_SHAPE = (91, 109, 91)
# The MNI152 2 mm template grid, so the volumes line up with standard atlases.
GRID_AFFINE = np.array([[-2.0, 0.0, 0.0, 90.0], [0.0, 2.0, 0.0, -126.0],
                        [0.0, 0.0, 2.0, -72.0], [0.0, 0.0, 0.0, 1.0]])
VOXEL_MM = 2.0

DIAGNOSES = ("PD", "ET", "dystonia")
TARGETS = ("STN", "GPi", "VIM")
HEMISPHERES = ("left", "right", "bilateral")
SEXES = ("F", "M")

# Right-hemisphere MNI coordinates (mm); the left side mirrors x, since MNI is RAS.
TARGET_CENTRES_MM = {
    "STN": (12.0, -13.0, -5.0),
    "GPi": (20.0, -5.0, -3.0),
    "VIM": (14.0, -18.0, 3.0),
}
# Where stimulation helps most: dorsolateral STN, posteroventral GPi, ventral VIM.
SWEET_SPOTS_MM = {
    "STN": (12.5, -12.5, -3.0),
    "GPi": (21.0, -7.0, -5.0),
    "VIM": (14.0, -19.0, 1.0),
}
ROI_SEMI_AXES_MM = {
    "STN": (3.5, 5.0, 3.0),
    "GPi": (4.0, 7.0, 4.0),
    "VIM": (3.5, 3.0, 4.0),
}

VTA_RADIUS_MIN_MM = 2.0
VTA_RADIUS_MAX_MM = 5.0
# Width of the benefit fall-off around a sweet spot.
SWEET_SPOT_SIGMA_MM = 3.5

UPDRS_III_MAX = 132  # MDS-UPDRS part III


@dataclass(frozen=True)
class SiteProfile:
    """How one hospital's programme differs from the others."""

    diagnosis_p: tuple[float, float, float]  # PD, ET, dystonia
    pd_gpi_share: float
    bilateral_share: float
    age_shift_years: float
    amplitude_mean_ma: float
    frequency_p: tuple[float, float, float]  # over FREQUENCIES_HZ
    pulse_width_p: tuple[float, float, float]  # over PULSE_WIDTHS_US
    placement_sd_mm: float
    effect: float


FREQUENCIES_HZ = (130, 160, 180)
PULSE_WIDTHS_US = (60, 90, 120)

_PROFILES = (
    # A PD surgery programme: STN first, conservative programming, accurate placement.
    SiteProfile(
        diagnosis_p=(0.75, 0.15, 0.10),
        pd_gpi_share=0.10,
        bilateral_share=0.85,
        age_shift_years=2.0,
        amplitude_mean_ma=2.4,
        frequency_p=(0.80, 0.15, 0.05),
        pulse_width_p=(0.80, 0.20, 0.00),
        placement_sd_mm=1.5,
        effect=1.0,
    ),
    # A movement-disorders centre with many dystonia referrals, GPi-leaning, high settings.
    SiteProfile(
        diagnosis_p=(0.50, 0.15, 0.35),
        pd_gpi_share=0.40,
        bilateral_share=0.90,
        age_shift_years=-6.0,
        amplitude_mean_ma=3.3,
        frequency_p=(0.30, 0.30, 0.40),
        pulse_width_p=(0.30, 0.50, 0.20),
        placement_sd_mm=2.2,
        effect=0.8,
    ),
    # A tremor clinic: mostly ET treated in VIM, often unilaterally, in older patients.
    SiteProfile(
        diagnosis_p=(0.35, 0.55, 0.10),
        pd_gpi_share=0.05,
        bilateral_share=0.60,
        age_shift_years=5.0,
        amplitude_mean_ma=2.0,
        frequency_p=(0.60, 0.30, 0.10),
        pulse_width_p=(0.70, 0.30, 0.00),
        placement_sd_mm=1.8,
        effect=1.1,
    ),
)

# Share of subjects without a 12-month visit, so outcome columns carry real nulls.
_LOST_TO_FOLLOW_UP = 0.06

_SITE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


def site_profile(site_index: int) -> SiteProfile:
    """The programme of site number `site_index`; beyond the three archetypes, each
    further site is an archetype perturbed by its own index, so no two sites coincide."""
    if site_index < 0:
        raise ValueError(f"site_index must be >= 0, got {site_index}")
    base = _PROFILES[site_index % len(_PROFILES)]
    if site_index < len(_PROFILES):
        return base
    rng = np.random.default_rng([0x5171, site_index])
    return SiteProfile(
        diagnosis_p=base.diagnosis_p,
        pd_gpi_share=float(np.clip(base.pd_gpi_share + rng.normal(0, 0.05), 0.0, 0.6)),
        bilateral_share=float(np.clip(base.bilateral_share + rng.normal(0, 0.05), 0.3, 1.0)),
        age_shift_years=base.age_shift_years + float(rng.normal(0, 3.0)),
        amplitude_mean_ma=float(np.clip(base.amplitude_mean_ma + rng.normal(0, 0.3), 1.5, 4.0)),
        frequency_p=base.frequency_p,
        pulse_width_p=base.pulse_width_p,
        placement_sd_mm=base.placement_sd_mm * float(rng.uniform(0.8, 1.2)),
        effect=base.effect * float(rng.uniform(0.85, 1.15)),
    )


def vta_max_voxels() -> int:
    """The largest number of non-zero voxels one subject's VTA can have; attained.

    VTA centres are snapped to voxel centres (see `_snap_to_grid`), so a sphere of radius
    R covers exactly the lattice offsets within R of the origin, a count that grows with
    R; the largest radius gives the maximum. Bilateral VTAs are two such spheres.
    """
    reach = math.floor(VTA_RADIUS_MAX_MM / VOXEL_MM)
    steps = np.arange(-reach, reach + 1) * VOXEL_MM
    offsets = np.stack(np.meshgrid(steps, steps, steps, indexing="ij"), axis=-1)
    per_side = int(((offsets**2).sum(axis=-1) <= VTA_RADIUS_MAX_MM**2).sum())
    return 2 * per_side


def _snap_to_grid(point_mm: np.ndarray) -> np.ndarray:
    """The voxel centre nearest to a world point.

    Without snapping, the voxel count of a sphere depends on its sub-voxel offset and the
    only provable max_voxels is about twice the typical count; a looser bound means more
    DP noise on every voxel map.
    """
    inverse = np.linalg.inv(GRID_AFFINE)
    voxel = np.round(inverse[:3, :3] @ point_mm + inverse[:3, 3])
    return GRID_AFFINE[:3, :3] @ voxel + GRID_AFFINE[:3, 3]


def generate_site(root: Path, *, site: str, site_index: int, n_subjects: int, seed: int) -> dict:
    """Write one site's synthetic cohort under `root` and return its catalog entry.

    Files written (paths relative to `root`): subjects.csv, stimulation.csv,
    outcomes.csv, images/vta/<subject_id>.nii.gz and rois/<name>.nii.gz. Existing files
    of the same names are overwritten; nothing else under `root` is touched.
    """
    if not _SITE_NAME.match(site):
        raise ValueError(f"site name {site!r} must be letters, digits, '_', '-' or '.'")
    if n_subjects < 1:
        raise ValueError(f"n_subjects must be >= 1, got {n_subjects}")
    profile = site_profile(site_index)
    rng = np.random.default_rng([seed, site_index])
    root = Path(root)

    cohort = _draw_cohort(rng, profile, site, n_subjects)
    vta_dir = root / "images" / "vta"
    vta_dir.mkdir(parents=True, exist_ok=True)
    for subject_id, centres, radius in zip(
        cohort["subject_id"], cohort["vta_centres"], cohort["vta_radius_mm"], strict=True
    ):
        mask = np.zeros(GRID_SHAPE, dtype=bool)
        for centre in centres:
            _paint_ellipsoid(mask, centre, (radius, radius, radius))
        _write_mask(vta_dir / f"{subject_id}.nii.gz", mask)

    rois = _write_rois(root / "rois")
    _write_tables(root, cohort)
    return _catalog_entry(rois)


def generate_federation(
    root: Path, sites: list[str], *, n_subjects: int = 60, seed: int = 7
) -> dict[str, dict]:
    """Generate one catalog per site under root/<site>/; site i gets site_index i."""
    if len(set(sites)) != len(sites):
        raise ValueError(f"site names must be unique, got {sites}")
    return {
        site: generate_site(
            Path(root) / site, site=site, site_index=i, n_subjects=n_subjects, seed=seed
        )
        for i, site in enumerate(sites)
    }


def _draw_cohort(
    rng: np.random.Generator, profile: SiteProfile, site: str, n: int
) -> dict[str, Any]:
    """Every column of one site's cohort, plus each subject's VTA centres. The draws
    happen in a fixed order: the files are a function of the seed."""
    people = _draw_demographics(rng, profile, site, n)
    diagnosis = people["diagnosis"]
    stim = _draw_stimulation(rng, profile, diagnosis)
    centres, distance = _place_vtas(rng, profile, stim["target"], stim["hemisphere"])
    outcomes = _draw_outcomes(rng, profile, diagnosis, stim["target"], stim["hemisphere"],
                              people["disease_duration"], distance)
    return {
        **people,
        **{k: v for k, v in stim.items() if k != "vta_radius_mm"},
        "vta_path": [f"images/vta/{s}.nii.gz" for s in people["subject_id"]],
        "vta_centres": centres,
        "vta_radius_mm": stim["vta_radius_mm"],
        **outcomes,
    }


def _draw_demographics(
    rng: np.random.Generator, profile: SiteProfile, site: str, n: int
) -> dict[str, Any]:
    diagnosis = rng.choice(DIAGNOSES, size=n, p=profile.diagnosis_p)
    is_pd, is_et = diagnosis == "PD", diagnosis == "ET"

    male_p = np.select([is_pd, is_et], [0.62, 0.50], 0.40)
    sex = np.where(rng.random(n) < male_p, "M", "F")

    age_mean = np.select([is_pd, is_et], [61.0, 67.0], 42.0) + profile.age_shift_years
    age_sd = np.select([is_pd, is_et], [8.0, 9.0], 14.0)
    age = np.round(np.clip(rng.normal(age_mean, age_sd), 18.0, 85.0), 1)
    duration_mean = np.select([is_pd, is_et], [11.0, 18.0], 12.0)
    duration_sd = np.select([is_pd, is_et], [4.0, 10.0], 8.0)
    # Onset no earlier than age 5 keeps duration consistent with age for young dystonia.
    duration = np.clip(rng.normal(duration_mean, duration_sd), 0.5, age - 5.0)
    return {
        "subject_id": [f"{site}-{i:04d}" for i in range(1, n + 1)],
        "age": age,
        "sex": sex,
        "diagnosis": diagnosis,
        "disease_duration": np.round(duration, 1),
    }


def _draw_stimulation(
    rng: np.random.Generator, profile: SiteProfile, diagnosis: np.ndarray
) -> dict[str, Any]:
    n = len(diagnosis)
    is_pd, is_et, is_dys = (diagnosis == d for d in DIAGNOSES)
    pd_gpi = rng.random(n) < profile.pd_gpi_share
    target = np.select([is_et, is_dys, is_pd & pd_gpi], ["VIM", "GPi", "GPi"], "STN")

    # ET is usually operated on one side (contralateral to the dominant hand).
    bilateral_p = np.where(is_et, 0.4 * profile.bilateral_share, profile.bilateral_share)
    left_p = np.where(is_et, 0.75, 0.55)
    side_draw = rng.random(n)
    hemisphere = np.where(
        rng.random(n) < bilateral_p, "bilateral", np.where(side_draw < left_p, "left", "right")
    )

    gpi_extra = np.where(target == "GPi", 0.5, 0.0)
    amplitude: np.ndarray = rng.normal(profile.amplitude_mean_ma + gpi_extra, 0.6)
    amplitude = np.round(np.clip(amplitude, 0.5, 6.0), 1)
    frequency = rng.choice(FREQUENCIES_HZ, size=n, p=profile.frequency_p)
    pulse_width = rng.choice(PULSE_WIDTHS_US, size=n, p=profile.pulse_width_p)
    # Dystonia is commonly programmed with wider pulses.
    pulse_width = pulse_width + np.where(is_dys & (rng.random(n) < 0.5), 30, 0)
    radius = np.clip(
        1.0 + 0.8 * amplitude * (pulse_width / 60.0) ** 0.25,
        VTA_RADIUS_MIN_MM,
        VTA_RADIUS_MAX_MM,
    )
    return {
        "target": target,
        "hemisphere": hemisphere,
        "amplitude_ma": amplitude,
        "frequency_hz": frequency,
        "pulse_width_us": pulse_width,
        "vta_radius_mm": radius,
    }


def _place_vtas(
    rng: np.random.Generator, profile: SiteProfile, target: np.ndarray, hemisphere: np.ndarray
) -> tuple[list[list[np.ndarray]], np.ndarray]:
    """Each subject's VTA centres (one per side implanted, snapped to the grid) and their
    mean distance to the target's sweet spot."""
    n = len(target)
    jitter = rng.normal(0.0, profile.placement_sd_mm, size=(n, 2, 3))
    centres: list[list[np.ndarray]] = []
    distance = np.empty(n)
    for i in range(n):
        sides = {"left": (-1.0,), "right": (1.0,), "bilateral": (-1.0, 1.0)}[hemisphere[i]]
        nominal = np.array(TARGET_CENTRES_MM[target[i]])
        sweet = np.array(SWEET_SPOTS_MM[target[i]])
        mirror = np.array([1.0, 1.0, 1.0])
        subject_centres = []
        distances = []
        for j, sign in enumerate(sides):
            mirror[0] = sign
            centre = _snap_to_grid(nominal * mirror + jitter[i, j])
            subject_centres.append(centre)
            distances.append(float(np.linalg.norm(centre - sweet * mirror)))
        centres.append(subject_centres)
        distance[i] = np.mean(distances)
    return centres, distance


def _draw_outcomes(
    rng: np.random.Generator,
    profile: SiteProfile,
    diagnosis: np.ndarray,
    target: np.ndarray,
    hemisphere: np.ndarray,
    duration: np.ndarray,
    distance: np.ndarray,
) -> dict[str, Any]:
    n = len(diagnosis)
    is_pd, is_et = diagnosis == "PD", diagnosis == "ET"
    # Expected fraction of symptoms relieved with ideal placement, per indication.
    best = np.select([is_pd & (target == "STN"), is_pd, is_et], [0.75, 0.55, 0.85], 0.65)
    # One-sided surgery in PD/dystonia leaves the other body side untreated.
    laterality = np.where(hemisphere == "bilateral", 1.0, np.where(is_et, 0.9, 0.6))
    benefit = np.exp(-(distance**2) / (2 * SWEET_SPOT_SIGMA_MM**2))
    fraction = profile.effect * best * laterality * benefit + rng.normal(0.0, 0.07, n)
    fraction = np.clip(fraction, -0.3, 0.95)

    followed_up = rng.random(n) >= _LOST_TO_FOLLOW_UP
    updrs_off = np.clip(np.round(rng.normal(40.0 + 0.6 * (duration - 11.0), 9.0)), 10, 90)
    updrs_on = np.round(updrs_off * (1.0 - fraction) + rng.normal(0.0, 2.0, n))
    # Capping at twice baseline keeps improvement_pct within its declared [-100, 100].
    updrs_on = np.clip(updrs_on, 0, np.minimum(2 * updrs_off, UPDRS_III_MAX))
    scale_pct = 100.0 * fraction + rng.normal(0.0, 3.0, n)
    improvement_pct = np.where(is_pd, 100.0 * (updrs_off - updrs_on) / updrs_off, scale_pct)
    improvement_pct = np.round(np.clip(improvement_pct, -100.0, 100.0), 1)

    # UPDRS-III is a Parkinson's scale: ET and dystonia outcomes come from their own
    # scales (TETRAS, BFMDRS) and appear only as improvement_pct.
    off_na = pd.array(np.where(is_pd, updrs_off, np.nan)).astype("Int64")
    on_na = pd.array(np.where(is_pd & followed_up, updrs_on, np.nan)).astype("Int64")
    return {
        "updrs_off": off_na,
        "updrs_on": on_na,
        "updrs_change": off_na - on_na,
        "improvement_pct": np.where(followed_up, improvement_pct, np.nan),
        # Derived (no draw), so every other column is as before it existed.
        "responder": pd.array(np.where(followed_up, (improvement_pct > 30).astype(float),
                                       np.nan)).astype("Int64"),
    }


_TABLE_COLUMNS = {
    "subjects": ("subject_id", "age", "sex", "diagnosis", "disease_duration"),
    "stimulation": ("subject_id", "target", "hemisphere", "amplitude_ma", "frequency_hz",
                    "pulse_width_us", "vta_path"),
    "outcomes": ("subject_id", "updrs_off", "updrs_on", "updrs_change", "improvement_pct",
                 "responder"),
}


def _write_tables(root: Path, cohort: dict[str, Any]) -> None:
    for table, columns in _TABLE_COLUMNS.items():
        frame = pd.DataFrame({c: cohort[c] for c in columns})
        frame.to_csv(root / f"{table}.csv", index=False, lineterminator="\n")


def _write_rois(roi_dir: Path) -> dict[str, str]:
    roi_dir.mkdir(parents=True, exist_ok=True)
    rois = {}
    for target, (x, y, z) in TARGET_CENTRES_MM.items():
        for side, sign in (("left", -1.0), ("right", 1.0)):
            name = f"{target.lower()}_{side}"
            mask = np.zeros(GRID_SHAPE, dtype=bool)
            _paint_ellipsoid(mask, np.array([sign * x, y, z]), ROI_SEMI_AXES_MM[target])
            _write_mask(roi_dir / f"{name}.nii.gz", mask)
            rois[name] = f"rois/{name}.nii.gz"
    return rois


def _paint_ellipsoid(mask: np.ndarray, centre_mm: np.ndarray, semi_axes_mm: tuple) -> None:
    """Set the voxels whose centres lie in an axis-aligned ellipsoid (world mm)."""
    inverse = np.linalg.inv(GRID_AFFINE)
    centre_vox = inverse[:3, :3] @ centre_mm + inverse[:3, 3]
    reach = np.asarray(semi_axes_mm) / VOXEL_MM
    lo = np.maximum(np.floor(centre_vox - reach).astype(int), 0)
    hi = np.minimum(np.ceil(centre_vox + reach).astype(int) + 1, GRID_SHAPE)
    if np.any(lo >= hi):
        return
    idx = np.stack(
        np.meshgrid(*(np.arange(a, b) for a, b in zip(lo, hi, strict=True)), indexing="ij"),
        axis=-1,
    )
    world = idx @ GRID_AFFINE[:3, :3].T + GRID_AFFINE[:3, 3]
    inside = (((world - centre_mm) / np.asarray(semi_axes_mm)) ** 2).sum(axis=-1) <= 1.0
    mask[lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]] |= inside


def _write_mask(path: Path, mask: np.ndarray) -> None:
    image = nib.Nifti1Image(mask.astype(np.uint8), GRID_AFFINE)
    image.header.set_xyzt_units("mm")
    image.set_sform(GRID_AFFINE, code="mni")
    image.set_qform(GRID_AFFINE, code="mni")
    # nibabel's own .gz writer stamps the current time into the gzip header; mtime=0
    # makes the bytes a function of the seed alone.
    path.write_bytes(gzip.compress(image.to_bytes(), compresslevel=6, mtime=0))


# Each field of the catalog: (name, table, type, unit, bounds or levels, description).
# The catalog's privacy rests on these declarations (bounds set DP noise and clamping).
_FIELDS: tuple[tuple[str, str, str, str, Any, str], ...] = (
    ("subject_id", "subjects", "id", "", None,
     "Pseudonymous subject identifier, prefixed by the site name."),
    ("age", "subjects", "numeric", "years", [18, 90], "Age at surgery."),
    ("sex", "subjects", "categorical", "", SEXES, "Sex recorded at the clinic."),
    ("diagnosis", "subjects", "categorical", "", DIAGNOSES,
     "Indication for DBS: Parkinson's disease, essential tremor, dystonia."),
    ("disease_duration", "subjects", "numeric", "years", [0, 80],
     "Years from symptom onset to surgery."),
    ("target", "stimulation", "categorical", "", TARGETS,
     "Implanted nucleus: subthalamic nucleus, internal pallidum, ventral intermediate thalamus."),
    ("hemisphere", "stimulation", "categorical", "", HEMISPHERES, "Side(s) implanted."),
    ("amplitude_ma", "stimulation", "numeric", "mA", [0, 10],
     "Stimulation amplitude at 12 months."),
    ("frequency_hz", "stimulation", "integer", "Hz", [0, 250],
     "Stimulation frequency at 12 months."),
    ("pulse_width_us", "stimulation", "integer", "us", [0, 450], "Pulse width at 12 months."),
    ("vta_path", "stimulation", "image", "", None,
     "Binary volume of tissue activated (uint8, 1 inside), on the MNI152 2 mm grid "
     "(91x109x91); bilateral implants have one VTA per side."),
    ("updrs_off", "outcomes", "integer", "points", [0, UPDRS_III_MAX],
     "Baseline MDS-UPDRS-III, off medication. PD only; empty otherwise."),
    ("updrs_on", "outcomes", "integer", "points", [0, UPDRS_III_MAX],
     "MDS-UPDRS-III on stimulation at 12 months. PD only; empty otherwise or when the "
     "12-month visit is missing."),
    ("updrs_change", "outcomes", "integer", "points", [-UPDRS_III_MAX, UPDRS_III_MAX],
     "updrs_off - updrs_on (positive = improvement). PD only."),
    ("improvement_pct", "outcomes", "numeric", "%", [-100, 100],
     "Improvement at 12 months on the indication's own motor scale (MDS-UPDRS-III for PD, "
     "TETRAS for ET, BFMDRS for dystonia); empty when the 12-month visit is missing."),
    ("responder", "outcomes", "integer", "0/1", [0, 1],
     "1 when improvement_pct > 30 at 12 months, else 0; empty when the visit is missing."),
)


def _field(table: str, kind: str, unit: str, limits: Any, description: str) -> dict[str, Any]:
    """One field's catalog entry: bounds for numbers, levels for categories, the voxel
    bound for images."""
    entry: dict[str, Any] = {"table": table, "type": kind}
    if unit:
        entry["unit"] = unit
    if kind == "categorical":
        entry["levels"] = list(limits)
    elif kind == "image":
        entry["max_voxels"] = vta_max_voxels()
    elif limits is not None:
        entry["bounds"] = list(limits)
    entry["description"] = description
    return entry


def _catalog_entry(rois: dict[str, str]) -> dict:
    """The `dbs_outcomes` catalog entry for a node's config (without its `root`)."""
    return {
        "name": CATALOG_NAME,
        "description": "Synthetic DBS cohort: demographics, stimulation settings, 12-month "
        "motor outcomes and per-subject VTAs in MNI space.",
        "subject_key": "subject_id",
        "schema_version": 1,
        "tables": {table: f"{table}.csv" for table in _TABLE_COLUMNS},
        "rois": rois,
        "fields": {name: _field(*spec) for name, *spec in _FIELDS},
    }
