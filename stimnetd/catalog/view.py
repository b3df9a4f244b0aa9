"""What the query engine, the privacy layer and the sandbox may read from a loaded catalog."""

from __future__ import annotations

from typing import Protocol

import numpy as np
import pandas as pd

from stimnet.query.fields import FieldMeta, ImageGeometry
from stimnetd.catalog.columns import Columns


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
