"""Per-voxel sufficient statistics of an image column, additive across sites.

Two kinds, one frozen dataclass each:

* `CoverageStats`, for binary images (a VTA covers a voxel or not) and a numeric weight w
  per subject (an outcome; 1.0 when there is none): per voxel the number of covering
  subjects n, Σw and Σw² over them, plus the cohort totals (`CohortTotals`: N, Σw, Σw²
  over all subjects). "Not covering" is total − covering, so a site never ships a second
  set of arrays for the two-sample test.
* `FieldStats`, for continuous images (E-field magnitude as float32): per voxel the number
  of subjects whose value there is non-zero ("covering"), Σx, Σx², Σxw, and Σw, Σw² over
  the covering subjects, plus the same cohort totals. Σx, Σx² and Σxw over covering
  subjects equal those over the whole cohort (x = 0 elsewhere), so one set of arrays
  serves correlations over either population.

Both are stored sparse: `voxels` holds the sorted flat (C-order) indices of the voxels
at least one subject covers, and every per-voxel array is aligned to it. Building costs
work proportional to the non-zero voxels, never to the grid, and subjects are consumed
one at a time from an iterable, so a cohort's images together need not fit in memory.
`a + b` (or `combine([...])`) is the federated sum; it equals the statistics of the
pooled subjects, exactly when the sums are exact (integers, dyadic values) and to
rounding otherwise.

Values are not clamped here: declared bounds are the privacy layer's (sensitivity) and
with DP off federated must equal pooled.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import numpy.typing as npt

FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.int64]
StatsKind = Literal["coverage", "field"]

# Buffered (voxel, subject) entries before they are reduced into the running sums; bounds
# the builder's working memory independently of cohort size.
DEFAULT_CHUNK_ENTRIES = 1 << 20

# Per-voxel arrays of each kind, in wire order (the index array comes on top when sparse).
COVERAGE_ARRAYS = ("n", "sw", "sw2")
FIELD_ARRAYS = ("n", "sx", "sxx", "sxw", "sw", "sww")
_ITEM_BYTES = 8  # int64 indices and counts, float64 sums
_TOTALS_BYTES = 3 * _ITEM_BYTES


@dataclass(frozen=True)
class CohortTotals:
    """N, Σw and Σw² over every subject of the cohort, covering a voxel or not."""

    n: int
    sw: float
    sw2: float

    def __add__(self, other: CohortTotals) -> CohortTotals:
        return CohortTotals(self.n + other.n, self.sw + other.sw, self.sw2 + other.sw2)

    @classmethod
    def of(cls, weights: npt.ArrayLike) -> CohortTotals:
        w = _weights(weights)
        return cls(int(w.size), float(w.sum()), float((w * w).sum()))


@dataclass(frozen=True, eq=False)
class CoverageStats:
    """Per covered voxel: n covering subjects, Σw and Σw² over them; and cohort totals."""

    shape: tuple[int, ...]
    voxels: IntArray
    n: IntArray
    sw: FloatArray
    sw2: FloatArray
    totals: CohortTotals

    def __add__(self, other: CoverageStats) -> CoverageStats:
        return self.combine([self, other])

    @classmethod
    def combine(cls, parts: Sequence[CoverageStats]) -> CoverageStats:
        """The federated sum of the sites' statistics (at least one part)."""
        shape = _same_shape(parts)
        voxels, n, sums = _merge([p.voxels for p in parts], [p.n for p in parts],
                                 [[p.sw, p.sw2] for p in parts])
        return cls(shape, voxels, n, sums[0], sums[1], _sum_totals([p.totals for p in parts]))

    @property
    def nbytes(self) -> int:
        """Bytes of the sparse form: index, the per-voxel arrays and the totals."""
        arrays = (self.voxels, self.n, self.sw, self.sw2)
        return sum(a.nbytes for a in arrays) + _TOTALS_BYTES

    def dense(self) -> dict[str, np.ndarray]:
        """The per-voxel arrays on the whole grid (zero where no subject covers)."""
        return _dense(self.shape, self.voxels, dict(zip(COVERAGE_ARRAYS, (self.n, self.sw, self.sw2),
                                                        strict=True)))

    @classmethod
    def from_dense(cls, arrays: dict[str, np.ndarray], totals: CohortTotals) -> CoverageStats:
        """The inverse of `dense`: voxels with n > 0 become the support."""
        shape, voxels, cols = _sparse(arrays, COVERAGE_ARRAYS)
        return cls(shape, voxels, cols[0].astype(np.int64), cols[1], cols[2], totals)


@dataclass(frozen=True, eq=False)
class FieldStats:
    """Per voxel with a non-zero value in some subject: n such subjects, Σx, Σx², Σxw, and
    Σw, Σw² over them; and cohort totals."""

    shape: tuple[int, ...]
    voxels: IntArray
    n: IntArray
    sx: FloatArray
    sxx: FloatArray
    sxw: FloatArray
    sw: FloatArray
    sww: FloatArray
    totals: CohortTotals

    def __add__(self, other: FieldStats) -> FieldStats:
        return self.combine([self, other])

    @classmethod
    def combine(cls, parts: Sequence[FieldStats]) -> FieldStats:
        """The federated sum of the sites' statistics (at least one part)."""
        shape = _same_shape(parts)
        voxels, n, s = _merge([p.voxels for p in parts], [p.n for p in parts],
                              [[p.sx, p.sxx, p.sxw, p.sw, p.sww] for p in parts])
        return cls(shape, voxels, n, s[0], s[1], s[2], s[3], s[4],
                   _sum_totals([p.totals for p in parts]))

    @property
    def nbytes(self) -> int:
        """Bytes of the sparse form: index, the per-voxel arrays and the totals."""
        arrays = (self.voxels, self.n, self.sx, self.sxx, self.sxw, self.sw, self.sww)
        return sum(a.nbytes for a in arrays) + _TOTALS_BYTES

    def dense(self) -> dict[str, np.ndarray]:
        """The per-voxel arrays on the whole grid (zero where no subject has a value)."""
        cols = (self.n, self.sx, self.sxx, self.sxw, self.sw, self.sww)
        return _dense(self.shape, self.voxels, dict(zip(FIELD_ARRAYS, cols, strict=True)))

    @classmethod
    def from_dense(cls, arrays: dict[str, np.ndarray], totals: CohortTotals) -> FieldStats:
        """The inverse of `dense`: voxels with n > 0 become the support."""
        shape, voxels, c = _sparse(arrays, FIELD_ARRAYS)
        return cls(shape, voxels, c[0].astype(np.int64), c[1], c[2], c[3], c[4], c[5], totals)


def coverage_stats(
    shape: Sequence[int],
    subjects: Iterable[tuple[npt.ArrayLike, float]],
    *,
    chunk_entries: int = DEFAULT_CHUNK_ENTRIES,
) -> CoverageStats:
    """Statistics of subjects given as (flat indices of the voxels their image covers,
    weight). A subject covering nothing still counts in the totals; an index listed twice
    for one subject counts once (coverage is a set)."""
    grid = _grid(shape)
    acc = _Accumulator(2, chunk_entries)
    weights: list[float] = []
    for covered, weight in subjects:
        idx = _indices(covered, grid)
        if not _increasing(idx):
            idx = np.unique(idx)
        w = _weight(weight)
        weights.append(w)
        acc.add(idx, [np.full(idx.size, w), np.full(idx.size, w * w)])
    voxels, n, sums = acc.result()
    return CoverageStats(grid, voxels, n, sums[0], sums[1], CohortTotals.of(weights))


def field_stats(
    shape: Sequence[int],
    subjects: Iterable[tuple[npt.ArrayLike, npt.ArrayLike, float]],
    *,
    chunk_entries: int = DEFAULT_CHUNK_ENTRIES,
) -> FieldStats:
    """Statistics of subjects given as (flat voxel indices, the image's values there,
    weight). Zero values are dropped (x = 0 is "not covering"); an index listed twice for
    one subject is refused, since which value counts would be a guess."""
    grid = _grid(shape)
    acc = _Accumulator(5, chunk_entries)
    weights: list[float] = []
    for where, values, weight in subjects:
        idx = _indices(where, grid)
        x = np.asarray(values, dtype=np.float64).ravel()
        if x.shape != idx.shape:
            raise ValueError(f"{idx.size} voxel indices but {x.size} values")
        if not np.all(np.isfinite(x)):
            raise ValueError("image values must be finite")
        if not _increasing(idx) and np.unique(idx).size != idx.size:
            raise ValueError("a voxel index is listed twice for one subject")
        keep = x != 0
        idx, x = idx[keep], x[keep]
        w = _weight(weight)
        weights.append(w)
        ones = np.ones(idx.size)
        acc.add(idx, [x, x * x, x * w, ones * w, ones * (w * w)])
    voxels, n, s = acc.result()
    return FieldStats(grid, voxels, n, s[0], s[1], s[2], s[3], s[4], CohortTotals.of(weights))


def coverage_stats_dense(masks: npt.ArrayLike, weights: npt.ArrayLike | None = None) -> CoverageStats:
    """`coverage_stats` of images given whole: masks[subject, *grid] (non-zero = covered),
    weights one per subject (1.0 each when omitted)."""
    m = np.asarray(masks)
    w = np.ones(m.shape[0]) if weights is None else _weights(weights)
    if w.shape != (m.shape[0],):
        raise ValueError(f"{m.shape[0]} images but {w.size} weights")
    subjects = ((np.flatnonzero(m[i]), float(w[i])) for i in range(m.shape[0]))
    return coverage_stats(m.shape[1:], subjects)


def field_stats_dense(images: npt.ArrayLike, weights: npt.ArrayLike | None = None) -> FieldStats:
    """`field_stats` of images given whole: images[subject, *grid], weights one per subject
    (1.0 each when omitted)."""
    x = np.asarray(images)
    w = np.ones(x.shape[0]) if weights is None else _weights(weights)
    if w.shape != (x.shape[0],):
        raise ValueError(f"{x.shape[0]} images but {w.size} weights")

    def subject(i: int) -> tuple[IntArray, np.ndarray, float]:
        where = np.flatnonzero(x[i])
        return where, x[i].ravel()[where], float(w[i])

    return field_stats(x.shape[1:], (subject(i) for i in range(x.shape[0])))


@dataclass(frozen=True)
class StatsSize:
    """Bytes of one kind's statistics in sparse form (index + per-voxel arrays) and dense
    form (per-voxel arrays over the whole grid), totals included in both."""

    sparse: int
    dense: int

    @property
    def smaller(self) -> int:
        return min(self.sparse, self.dense)


def stats_size(kind: StatsKind, shape: Sequence[int], nonzero_voxels: int) -> StatsSize:
    """The size a site's answer will have, before it is computed: `nonzero_voxels` is the
    support (at most `support_bound`), so a site can refuse a query whose answer is too
    large."""
    grid = int(np.prod(_grid(shape)))
    if not 0 <= nonzero_voxels <= grid:
        raise ValueError(f"{nonzero_voxels} non-zero voxels on a grid of {grid}")
    arrays = len(COVERAGE_ARRAYS if kind == "coverage" else FIELD_ARRAYS)
    return StatsSize(
        sparse=nonzero_voxels * (arrays + 1) * _ITEM_BYTES + _TOTALS_BYTES,
        dense=grid * arrays * _ITEM_BYTES + _TOTALS_BYTES,
    )


def support_bound(shape: Sequence[int], nonzero_per_subject: Iterable[int]) -> int:
    """An upper bound on the support: the grid, or the subjects' non-zero voxels summed."""
    return min(int(np.prod(_grid(shape))), sum(int(k) for k in nonzero_per_subject))


class _Accumulator:
    """Running sparse sums: entries are buffered, then reduced (sort + bincount) and merged
    into the sums whenever the buffer holds `chunk_entries`."""

    def __init__(self, columns: int, chunk_entries: int) -> None:
        self._columns = columns
        self._chunk = max(1, chunk_entries)
        self._keys: list[IntArray] = []
        self._cols: list[list[np.ndarray]] = []
        self._buffered = 0
        self._voxels: IntArray = np.zeros(0, dtype=np.int64)
        self._n: IntArray = np.zeros(0, dtype=np.int64)
        self._sums: list[FloatArray] = [np.zeros(0) for _ in range(columns)]

    def add(self, idx: IntArray, cols: list[np.ndarray]) -> None:
        self._keys.append(idx)
        self._cols.append(cols)
        self._buffered += idx.size
        if self._buffered >= self._chunk:
            self._flush()

    def _flush(self) -> None:
        if not self._keys:
            return
        keys = np.concatenate(self._keys)
        cols = [np.concatenate([c[j] for c in self._cols]) for j in range(self._columns)]
        voxels, inverse = np.unique(keys, return_inverse=True)
        n = np.bincount(inverse, minlength=voxels.size).astype(np.int64)
        sums = [np.bincount(inverse, weights=c, minlength=voxels.size) for c in cols]
        self._voxels, self._n, self._sums = _merge([self._voxels, voxels], [self._n, n],
                                                   [self._sums, sums])
        self._keys, self._cols, self._buffered = [], [], 0

    def result(self) -> tuple[IntArray, IntArray, list[FloatArray]]:
        self._flush()
        return self._voxels, self._n, self._sums


def _merge(
    voxels: Sequence[IntArray], ns: Sequence[IntArray], sums: Sequence[Sequence[np.ndarray]]
) -> tuple[IntArray, IntArray, list[FloatArray]]:
    """Sparse sums over several supports: the union of the indices, each array added."""
    keys = np.concatenate(voxels)
    union, inverse = np.unique(keys, return_inverse=True)
    n = np.bincount(inverse, weights=np.concatenate(ns), minlength=union.size)
    columns = len(sums[0])
    out = [np.asarray(np.bincount(inverse, weights=np.concatenate([s[j] for s in sums]),
                                  minlength=union.size), dtype=np.float64)
           for j in range(columns)]
    return union.astype(np.int64), np.rint(n).astype(np.int64), out


def _dense(shape: tuple[int, ...], voxels: IntArray, cols: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    size = int(np.prod(shape))
    out: dict[str, np.ndarray] = {}
    for name, values in cols.items():
        grid = np.zeros(size, dtype=values.dtype)
        grid[voxels] = values
        out[name] = grid.reshape(shape)
    return out


def _sparse(
    arrays: dict[str, np.ndarray], names: tuple[str, ...]
) -> tuple[tuple[int, ...], IntArray, list[np.ndarray]]:
    shapes = {tuple(np.shape(arrays[k])) for k in names}
    if len(shapes) != 1:
        raise ValueError(f"per-voxel arrays of different shapes: {sorted(shapes)}")
    shape = shapes.pop()
    n = np.asarray(arrays["n"]).ravel()
    voxels = np.flatnonzero(n > 0).astype(np.int64)
    cols = [np.asarray(arrays[k], dtype=np.float64).ravel()[voxels] for k in names]
    return shape, voxels, cols


def _same_shape(parts: Sequence[CoverageStats] | Sequence[FieldStats]) -> tuple[int, ...]:
    if not parts:
        raise ValueError("combine needs at least one site's statistics")
    shapes = {p.shape for p in parts}
    if len(shapes) != 1:
        raise ValueError(f"statistics on different grids: {sorted(shapes)}")
    return parts[0].shape


def _sum_totals(totals: Sequence[CohortTotals]) -> CohortTotals:
    out = CohortTotals(0, 0.0, 0.0)
    for t in totals:
        out = out + t
    return out


def _grid(shape: Sequence[int]) -> tuple[int, ...]:
    grid = tuple(int(s) for s in shape)
    if not grid or any(s <= 0 for s in grid):
        raise ValueError(f"not a grid shape: {grid}")
    return grid


def _indices(where: npt.ArrayLike, grid: tuple[int, ...]) -> IntArray:
    idx = np.asarray(where).ravel()
    if idx.size and idx.dtype.kind not in "iu":
        raise ValueError("voxel indices must be integers")
    idx = idx.astype(np.int64)
    if idx.size and (idx.min() < 0 or idx.max() >= int(np.prod(grid))):
        raise ValueError(f"a voxel index lies outside the grid {grid}")
    return idx


def _increasing(idx: IntArray) -> bool:
    """Strictly increasing, hence free of repeats: np.flatnonzero's order, checked in O(n)."""
    return bool(np.all(idx[1:] > idx[:-1]))


def _weight(weight: float) -> float:
    w = float(weight)
    if not np.isfinite(w):
        raise ValueError("weights must be finite (leave out subjects without one)")
    return w


def _weights(weights: npt.ArrayLike) -> FloatArray:
    w = np.asarray(weights, dtype=np.float64).ravel()
    if not np.all(np.isfinite(w)):
        raise ValueError("weights must be finite (leave out subjects without one)")
    return w
