"""What a researcher may know about a catalog's fields: types, units, bounds, levels,
image grids. Never a value. Shared by the daemon (which declares them) and the client
(which shows them and checks a query against them before sending it)."""

from __future__ import annotations

from dataclasses import dataclass

FIELD_TYPES = ("numeric", "integer", "categorical", "image", "id")


@dataclass(frozen=True)
class FieldMeta:
    """What a researcher may know about a field: never a value, only its shape.

    `bounds` are the declared clamping bounds [lo, hi] for numeric/integer fields, and the
    value bounds of a continuous image field; under DP values are clamped to them before
    aggregation so sensitivities come from the site's declaration, not from the data.
    `levels` are the declared categories.
    """

    name: str
    table: str
    type: str
    unit: str = ""
    description: str = ""
    bounds: tuple[float, float] | None = None
    levels: tuple[str, ...] | None = None
    # image fields only: the largest number of non-zero voxels one subject's image may
    # have (declared by the site); it bounds one subject's influence on a voxel map.
    max_voxels: int | None = None
    # image fields only: the voxels hold values (an E-field magnitude in V/mm), not a
    # mask; such a field declares `bounds` on its values. A voxel with a non-zero value
    # counts as covered.
    continuous: bool = False


@dataclass(frozen=True)
class ImageGeometry:
    shape: tuple[int, ...]
    voxel_size: tuple[float, ...]
    affine: tuple[tuple[float, ...], ...]
    space: str
    # NIfTI sform code the images agree on (4 = MNI); 0 when unknown or they differ, so a
    # map is only labelled MNI when every input said so.
    xform_code: int = 0


@dataclass(frozen=True)
class Grid:
    """A site's image grid for a catalog: the reference space every image field is on.
    Declared in the catalog's config ([catalogs.grid]) or taken from its first image."""

    shape: tuple[int, ...]
    affine: tuple[tuple[float, ...], ...]
    space: str = ""
    declared: bool = False

    def same_as(self, other: Grid) -> bool:
        # A declared space name is compared only when both sides name one: a grid taken
        # from images knows only its axis codes.
        if self.declared and other.declared and self.space != other.space:
            return False
        return self.shape == other.shape and all(
            abs(a - b) <= 1e-4 for ra, rb in zip(self.affine, other.affine, strict=True)
            for a, b in zip(ra, rb, strict=True))

    def label(self) -> str:
        zooms = [sum(self.affine[r][c] ** 2 for r in range(3)) ** 0.5 for c in range(3)]
        size = "×".join(f"{z:g}" for z in zooms)
        return ("×".join(str(s) for s in self.shape) + f" at {size} mm"
                + (f" ({self.space})" if self.space else ""))


def grid_disagreement(grids: dict[str, Grid]) -> str | None:
    """None when every site's grid is the same; else a refusal naming each group of sites."""
    groups: list[tuple[Grid, list[str]]] = []
    for site, g in grids.items():
        for rep, sites in groups:
            if rep.same_as(g):
                sites.append(site)
                break
        else:
            groups.append((g, [site]))
    if len(groups) < 2:
        return None
    parts = "; ".join(f"{', '.join(sorted(s))} on {g.label()}" for g, s in groups)
    return (f"the sites' image grids disagree ({parts}): a voxel-wise query needs one "
            "reference space, so no site computed; each site's catalog must declare or "
            "hold the same grid ([catalogs.grid])")
