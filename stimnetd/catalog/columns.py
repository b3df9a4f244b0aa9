"""A catalog's columns as numpy arrays, each converted once, and row selections over them.

A catalog does not change while the daemon runs, so its columns are converted
(`pd.to_numeric`, label mapping, null masks) once per catalog rather than by each query,
and groups are row selections rather than DataFrame slices (bench/query.py). The
conversions are element-wise, so converting the whole column once and selecting rows
afterwards gives exactly what converting the selected rows would.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import numpy as np
import pandas as pd


def is_null(v: Any) -> bool:
    return v is None or (isinstance(v, float | np.floating) and np.isnan(v)) or v is pd.NA


def label(value: Any) -> str:
    """The canonical string of a categorical value.

    Integral floats print as integers: a column with a missing value is read as float
    at one site and as int at another, and both must produce the same group key.
    """
    if isinstance(value, bool | np.bool_):
        return str(bool(value)).lower()
    if isinstance(value, float | np.floating) and float(value).is_integer():
        return str(int(value))
    if isinstance(value, int | np.integer):
        return str(int(value))
    return str(value)


def labels_of(col: pd.Series) -> np.ndarray:
    """Each value's label (None where missing), computed once per distinct value."""
    codes, uniques = pd.factorize(col, use_na_sentinel=True)
    names = np.array([*(None if is_null(v) else label(v) for v in uniques), None], dtype=object)
    return names[codes]  # the sentinel -1 picks the trailing None


def numbers_of(col: pd.Series) -> np.ndarray:
    return pd.to_numeric(col, errors="coerce").to_numpy(dtype=np.float64, na_value=np.nan)


def _exactly_two(x: np.ndarray) -> np.ndarray:
    distinct = np.unique(x[~np.isnan(x)])
    return distinct if distinct.size == 2 else np.zeros(0)


class Columns:
    """Read-only arrays of one frame's columns, converted on first use.

    Safe to share between the event loop and worker threads: a conversion that races
    another is merely done twice, and every array handed out is read-only, so no query
    can change what the next one reads.
    """

    def __init__(self, frame: pd.DataFrame) -> None:
        self._frame = frame
        self._cache: dict[tuple[str, str], np.ndarray] = {}
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._frame)

    def _get(self, kind: str, name: str, make: Callable[[pd.Series], np.ndarray]) -> np.ndarray:
        hit = self._cache.get((kind, name))
        if hit is None:
            hit = np.asarray(make(self._frame[name]))
            hit.setflags(write=False)
            with self._lock:
                hit = self._cache.setdefault((kind, name), hit)
        return hit

    def numbers(self, name: str) -> np.ndarray:
        """float64 values, NaN where missing or not a number."""
        return self._get("numbers", name, numbers_of)

    def labels(self, name: str) -> np.ndarray:
        """Categorical labels (object array of str), None where missing."""
        return self._get("labels", name, labels_of)

    def values(self, name: str) -> np.ndarray:
        """The values as stored (e.g. image paths), as an object array."""
        return self._get("values", name, lambda c: c.to_numpy(dtype=object))

    def missing(self, name: str) -> np.ndarray:
        """True where the value is missing (pandas' isna)."""
        return self._get("missing", name, lambda c: c.isna().to_numpy())

    def two_values(self, name: str) -> tuple[float, float] | None:
        """The column's two distinct numbers (lower first) when it takes exactly two."""
        if name not in self._frame.columns:
            return None
        pair = self._get("two", name, lambda c: _exactly_two(numbers_of(c)))
        return (float(pair[0]), float(pair[1])) if pair.size == 2 else None

    def ids(self, name: str) -> np.ndarray:
        """Subject ids as labels; rows without an id hold None."""
        def make(col: pd.Series) -> np.ndarray:
            if pd.api.types.is_string_dtype(col) and not col.isna().any():
                # The common case (catalogs load keys as strings): no relabelling.
                return col.to_numpy(dtype=object)
            return labels_of(col)
        return self._get("ids", name, make)


class Rows:
    """A selection of a catalog's rows (positions, or all of them) and its columns."""

    def __init__(self, columns: Columns, positions: np.ndarray | None = None) -> None:
        self.columns = columns
        self.positions = positions  # None: every row, in order

    def __len__(self) -> int:
        return len(self.columns) if self.positions is None else len(self.positions)

    def _pick(self, a: np.ndarray) -> np.ndarray:
        return a if self.positions is None else a[self.positions]

    def numbers(self, name: str) -> np.ndarray:
        return self._pick(self.columns.numbers(name))

    def labels(self, name: str) -> np.ndarray:
        return self._pick(self.columns.labels(name))

    def values(self, name: str) -> np.ndarray:
        return self._pick(self.columns.values(name))

    def missing(self, name: str) -> np.ndarray:
        return self._pick(self.columns.missing(name))

    def subset(self, mask_or_positions: np.ndarray) -> Rows:
        """The rows selected by a boolean mask over these rows, or by positions in them."""
        local = np.flatnonzero(mask_or_positions) if mask_or_positions.dtype == bool \
            else mask_or_positions
        return Rows(self.columns, local if self.positions is None else self.positions[local])

    def ids(self, name: str) -> frozenset[str]:
        ids = frozenset(self._pick(self.columns.ids(name)).tolist())
        return ids - {None} if None in ids else ids
