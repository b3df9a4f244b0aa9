"""What a researcher may know about a catalog's fields: types, units, bounds, levels,
image grids. Never a value. Shared by the daemon (which declares them) and the client
(which shows them and checks a query against them before sending it)."""

from __future__ import annotations

from dataclasses import dataclass

FIELD_TYPES = ("numeric", "integer", "categorical", "image", "id")


@dataclass(frozen=True)
class FieldMeta:
    """What a researcher may know about a field: never a value, only its shape.

    `bounds` are the declared clamping bounds [lo, hi] for numeric/integer fields; values
    are clamped to them before aggregation so DP sensitivities come from the site's
    declaration, not from the data. `levels` are the declared categories.
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


@dataclass(frozen=True)
class ImageGeometry:
    shape: tuple[int, ...]
    voxel_size: tuple[float, ...]
    affine: tuple[tuple[float, ...], ...]
    space: str
    # NIfTI sform code the images agree on (4 = MNI); 0 when unknown or they differ, so a
    # map is only labelled MNI when every input said so.
    xform_code: int = 0
