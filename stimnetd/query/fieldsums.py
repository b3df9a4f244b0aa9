"""A continuous image's per-voxel sums over a chunk of subjects (corr_map, and mean_map
of a continuous image): what `query/subjects.py` runs in the daemon or on a Dask worker.

A voxel with a non-zero value counts as covered; Σx, Σx² and Σxw over the covering
subjects equal those over the cohort, since x = 0 elsewhere. Each subject's work is
proportional to its non-zero voxels, not to the grid: the sums are added at its
`np.flatnonzero` indices, so a cohort's images never need to be in memory together.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from stimnet.errors import DataContractViolation

# (relative image path, weight) pairs, nulls already dropped.
Items = Sequence[tuple[str, float]]
# n subjects; per voxel: non-zero subjects, Σx, Σx², Σxw.
FieldSums = tuple[int, np.ndarray, np.ndarray, np.ndarray, np.ndarray]
Reader = Callable[[str], np.ndarray]


def values_of(img: np.ndarray, column: str, shape: tuple[int, ...], max_voxels: int | None,
              bounds: tuple[float, float] | None) -> tuple[np.ndarray, np.ndarray]:
    """A subject's non-zero voxels (flat indices) and its values there, after the checks
    the catalog's contract makes; clamped to `bounds` when given (under DP)."""
    img = np.asarray(img)
    if tuple(img.shape) != tuple(shape):
        raise DataContractViolation(
            f"an image in {column!r} is not on the catalog grid {tuple(shape)}")
    flat = img.reshape(-1)
    where = np.flatnonzero(flat)
    values = flat[where].astype(np.float64)
    if not np.all(np.isfinite(values)):
        raise DataContractViolation(f"an image in {column!r} holds NaN or infinite values; a "
                                    "continuous image has a finite value (0 outside) everywhere")
    if max_voxels is not None and where.size > max_voxels:
        # The count itself is a data value, so the message leaves it out.
        raise DataContractViolation(
            f"an image in {column!r} has more non-zero voxels than its declared "
            f"max_voxels ({max_voxels})")
    if bounds is not None:
        values = np.clip(values, bounds[0], bounds[1])
    return where, values


def chunk_field_sums(read: Reader, column: str, shape: tuple[int, ...],
                     max_voxels: int | None, bounds: tuple[float, float] | None,
                     items: Items) -> FieldSums:
    """A chunk of subjects' sums: n, and per voxel the subjects with a non-zero value,
    Σx, Σx², Σxw (w the subject's weight)."""
    size = int(np.prod(shape))
    count, sx, sxx, sxw = (np.zeros(size) for _ in range(4))
    for relpath, weight in items:
        where, x = values_of(read(relpath), column, shape, max_voxels, bounds)
        # Indices from flatnonzero are distinct, so buffered fancy-index adds are exact.
        count[where] += 1.0
        sx[where] += x
        sxx[where] += x * x
        sxw[where] += x * weight
    return (len(items), *(a.reshape(shape) for a in (count, sx, sxx, sxw)))  # type: ignore[return-value]
