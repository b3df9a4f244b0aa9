"""An in-memory `CatalogView` for query-engine tests: a DataFrame, images by path, ROIs."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import pandas as pd

from stimnet.query.fields import FieldMeta, ImageGeometry
from stimnetd.catalog.columns import Columns, Rows


def numeric(name: str, lo: float, hi: float) -> FieldMeta:
    return FieldMeta(name=name, table="t", type="numeric", bounds=(lo, hi))


def categorical(name: str, levels: tuple[str, ...] | None = None) -> FieldMeta:
    return FieldMeta(name=name, table="t", type="categorical", levels=levels)


def image(name: str) -> FieldMeta:
    return FieldMeta(name=name, table="t", type="image")


class FakeCatalog:
    """Satisfies `CatalogView`. Images are looked up by the path stored in the frame, so
    several FakeCatalogs (one per simulated site) can share one `images` dict."""

    def __init__(
        self,
        df: pd.DataFrame,
        fields: Mapping[str, FieldMeta],
        *,
        name: str = "fake",
        subject_key: str = "subject_id",
        images: Mapping[str, np.ndarray] | None = None,
        rois: Mapping[str, np.ndarray] | None = None,
        shape: tuple[int, ...] = (2, 2, 2),
        voxel_size: tuple[float, ...] = (1.0, 1.0, 1.0),
    ) -> None:
        self.name = name
        self.subject_key = subject_key
        self.fields = {subject_key: FieldMeta(subject_key, "t", "id"), **dict(fields)}
        self._df = df.reset_index(drop=True)
        if subject_key not in self._df:
            self._df[subject_key] = [f"s{i}" for i in df.index]
        self._images = dict(images or {})
        self._rois = dict(rois or {})
        self._shape = shape
        self._voxel_size = voxel_size
        self._columns: Columns | None = None

    def frame(self) -> pd.DataFrame:
        return self._df.copy()

    def columns(self) -> Columns:
        if self._columns is None:
            self._columns = Columns(self._df)
        return self._columns

    def subject_ids(self) -> frozenset[str]:
        return Rows(self.columns()).ids(self.subject_key)

    def load_image(self, relpath: str) -> np.ndarray:
        return self._images[relpath]

    def geometry(self, image_field: str) -> ImageGeometry:
        affine = tuple(
            tuple(
                float(self._voxel_size[i]) if i == j and i < 3 else float(i == j == 3)
                for j in range(4)
            )
            for i in range(4)
        )
        return ImageGeometry(self._shape, self._voxel_size, affine, "test")

    def roi_masks(self) -> dict[str, np.ndarray]:
        return dict(self._rois)

    def split(self, assignment: list[int], sites: int) -> list[FakeCatalog]:
        """One FakeCatalog per site, row i going to site assignment[i]."""
        out = []
        for s in range(sites):
            rows = self._df.iloc[[i for i, a in enumerate(assignment) if a == s]]
            out.append(
                FakeCatalog(
                    rows,
                    self.fields,
                    name=self.name,
                    subject_key=self.subject_key,
                    images=self._images,
                    rois=self._rois,
                    shape=self._shape,
                    voxel_size=self._voxel_size,
                )
            )
        return out
