"""Catalog metadata types shared by the query engine, the privacy layer and the servicers."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np
import pandas as pd

from stimnetd.query.columns import Columns

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


class CatalogView(Protocol):
    """What the query engine and sandbox may read from a loaded catalog."""

    name: str
    subject_key: str
    fields: dict[str, FieldMeta]

    def frame(self) -> pd.DataFrame:
        """All tables joined on the subject key: one row per subject; image fields hold
        paths relative to the catalog root."""
        ...

    def columns(self) -> Columns:
        """The frame's columns as arrays converted once (the query engine reads these)."""
        ...

    def subject_ids(self) -> frozenset[str]:
        """Every subject's id: the cohort of a query without a filter (one object per
        loaded catalog, so a repeated cohort is recognised without comparing its members)."""
        ...

    def load_image(self, relpath: str) -> np.ndarray:
        """The voxel array of one image, on the catalog's common grid."""
        ...

    def geometry(self, image_field: str) -> ImageGeometry: ...

    def roi_masks(self) -> dict[str, np.ndarray]:
        """Declared ROI masks (boolean arrays on the common grid), by name."""
        ...
