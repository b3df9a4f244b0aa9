"""Voxel maps' per-subject sums from the sparse image cache (the daemon's default runner).

Each subject's image comes from `SparseReader` (cached, or decoded on every core) as its
non-zero voxels; the sums are `np.bincount` over the covering voxels of all subjects, in
subject order, so the work is proportional to the non-zero voxels and the results equal
`subjects.chunk_sums` / `chunk_moments` / `roi_chunk_sums` exactly: the counts are the
same integers, and each voxel's float sum adds the same terms in the same order (a dense
`+= w * mask` adds 0.0 where a subject does not cover, which changes no sum).
The grid-sized output arrays are made once per aggregate, not once per subject.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from stimnet.errors import DataContractViolation
from stimnetd.catalog.imagecache import ImageCache
from stimnetd.catalog.imagereader import SparseReader
from stimnetd.catalog.sparse import SparseImage
from stimnetd.config.compute import ComputeSettings
from stimnetd.query.fieldsums import FieldSums
from stimnetd.query.subjects import DaskImages, Items, Moments, RoiSums, Sums


def covered(image: SparseImage, column: str, shape: tuple[int, ...],
            max_voxels: int | None) -> np.ndarray:
    """The flat indices the subject covers (value > 0), after the checks of the catalog's
    contract (`subjects.binarized`'s, with its messages)."""
    if tuple(image.shape) != tuple(shape):
        raise DataContractViolation(
            f"an image in {column!r} is not on the catalog grid {tuple(shape)}")
    idx = image.index[image.values > 0]
    if max_voxels is not None and idx.size > max_voxels:
        raise DataContractViolation(
            f"an image in {column!r} has more non-zero voxels than its declared "
            f"max_voxels ({max_voxels})")
    return idx


class CachedImages:
    """`SubjectImages` over the site's `SparseReader`."""

    def __init__(self, reader: SparseReader) -> None:
        self.reader = reader

    def _covered(self, catalog: Any, column: str, shape: tuple[int, ...],
                 max_voxels: int | None, relpaths: Sequence[str]) -> list[np.ndarray]:
        images = self.reader.read(catalog.root, catalog.name, relpaths)
        return [covered(im, column, shape, max_voxels) for im in images]

    def _sums(self, catalog: Any, column: str, shape: tuple[int, ...],
              max_voxels: int | None, items: Items, powers: int) -> list[np.ndarray]:
        """Per voxel: the covering count, Σ w and (powers 2) Σ w²."""
        parts = self._covered(catalog, column, shape, max_voxels, [rel for rel, _ in items])
        size = int(np.prod(shape))
        idx = np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)
        lengths = np.fromiter((p.size for p in parts), dtype=np.int64, count=len(parts))
        w = np.repeat(np.asarray([wi for _, wi in items], dtype=np.float64), lengths)
        out = [np.bincount(idx, minlength=size).astype(np.float64),
               np.bincount(idx, weights=w, minlength=size)]
        if powers == 2:
            out.append(np.bincount(idx, weights=w * w, minlength=size))
        return [a.reshape(shape) for a in out]

    def voxel_sums(self, catalog: Any, column: str, shape: tuple[int, ...],
                   max_voxels: int | None, items: Items) -> Sums:
        count, total = self._sums(catalog, column, shape, max_voxels, items, 1)
        return len(items), count, total

    def voxel_moments(self, catalog: Any, column: str, shape: tuple[int, ...],
                      max_voxels: int | None, items: Items) -> Moments:
        count, total, squares = self._sums(catalog, column, shape, max_voxels, items, 2)
        return len(items), count, total, squares

    def roi_sums(self, catalog: Any, column: str, shape: tuple[int, ...],
                 max_voxels: int | None, masks: Sequence[np.ndarray],
                 paths: Sequence[str]) -> RoiSums:
        flat = [np.asarray(m, dtype=bool).reshape(-1) for m in masks]
        n, s1, s2 = (np.zeros(len(masks)) for _ in range(3))
        for idx in self._covered(catalog, column, shape, max_voxels, paths):
            for i, roi in enumerate(flat):
                v = float(np.count_nonzero(roi[idx]))
                n[i] += v > 0
                s1[i] += v
                s2[i] += v * v
        return len(paths), n, s1, s2

    def field_sums(self, catalog: Any, column: str, shape: tuple[int, ...],
                   max_voxels: int | None, bounds: tuple[float, float] | None,
                   items: Items) -> FieldSums:
        """`fieldsums.chunk_field_sums` from the cache: the same checks and messages, and
        the same terms added in the same order at each voxel."""
        images = self.reader.read(catalog.root, catalog.name, [rel for rel, _ in items])
        where, xs, ws = [], [], []
        for image, (_, weight) in zip(images, items, strict=True):
            idx, x = _values(image, column, shape, max_voxels, bounds)
            where.append(idx)
            xs.append(x)
            ws.append(x * weight)
        size = int(np.prod(shape))
        idx = np.concatenate(where) if where else np.zeros(0, dtype=np.int64)
        x = np.concatenate(xs) if xs else np.zeros(0)
        out = [np.bincount(idx, minlength=size).astype(np.float64),
               np.bincount(idx, weights=x, minlength=size),
               np.bincount(idx, weights=x * x, minlength=size),
               np.bincount(idx, weights=np.concatenate(ws) if ws else x, minlength=size)]
        return (len(items), *(a.reshape(shape) for a in out))  # type: ignore[return-value]

    def close(self) -> None:
        self.reader.close()


def _values(image: SparseImage, column: str, shape: tuple[int, ...], max_voxels: int | None,
            bounds: tuple[float, float] | None) -> tuple[np.ndarray, np.ndarray]:
    """`fieldsums.values_of` on the sparse form."""
    if tuple(image.shape) != tuple(shape):
        raise DataContractViolation(
            f"an image in {column!r} is not on the catalog grid {tuple(shape)}")
    values = image.values.astype(np.float64)
    if not np.all(np.isfinite(values)):
        raise DataContractViolation(f"an image in {column!r} holds NaN or infinite values; a "
                                    "continuous image has a finite value (0 outside) everywhere")
    if max_voxels is not None and image.index.size > max_voxels:
        raise DataContractViolation(
            f"an image in {column!r} has more non-zero voxels than its declared "
            f"max_voxels ({max_voxels})")
    if bounds is not None:
        values = np.clip(values, bounds[0], bounds[1])
    return image.index, values


def site_images(settings: ComputeSettings, state_dir: Path) -> CachedImages | DaskImages:
    """The runner `[compute]` asks for: a Dask cluster, else the cache and the local pool
    (its disk entries under `state_dir`/image-cache)."""
    if settings.scheduler:
        return DaskImages(settings.scheduler)
    cache = ImageCache(settings.image_cache_mb << 20, state_dir / "image-cache",
                       settings.image_cache_disk_mb << 20)
    return CachedImages(SparseReader(cache, settings.worker_count()))
