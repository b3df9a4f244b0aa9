"""Where a voxel map's per-subject work runs: reading each subject's image, checking it
against the catalog's contract, and adding it into the map's sums.

`InProcess` (the default) does it in the daemon, one subject at a time. `DaskImages`
(`[compute] scheduler = "tcp://..."`) splits the subjects into chunks and has the
cluster's workers do it, each reading the catalog from shared storage at the same path
(`catalog.loader.read_image`, exactly as the daemon reads) and returning only its chunk's
sums: the subject count, the per-voxel count and the per-voxel weighted sum. No image, no
per-subject value and no subject id leaves a worker; what is released, and how, is still
decided in the daemon (the engine builds the Partial, the privacy layer judges it).

The engine's `count_map` / `mean_map`, voxel tests (`tmap`, `tmap2`, `prop_map`),
continuous images' sums (`corr_map`, query/fieldsums.py) and `roi_overlap` sums go
through here; the map
statistics (query/voxelmaps.py) still run in the daemon.
"""

from __future__ import annotations

import functools
import math
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from stimnet.errors import DataContractViolation, StimnetError
from stimnetd.catalog.loader import read_image
from stimnetd.query.fieldsums import FieldSums, chunk_field_sums

# Subject (relative image path, weight) pairs, nulls already dropped.
Items = Sequence[tuple[str, float]]
# n subjects, per-voxel count of subjects covering it, per-voxel Σ weight.
Sums = tuple[int, np.ndarray, np.ndarray]
# n subjects, per-voxel count, Σ weight and Σ weight² over the subjects covering it.
Moments = tuple[int, np.ndarray, np.ndarray, np.ndarray]
# subjects, per ROI: subjects touching it, Σ overlap voxels, Σ overlap².
RoiSums = tuple[int, np.ndarray, np.ndarray, np.ndarray]
CONNECT_TIMEOUT_S = 10.0


class ComputeUnavailable(StimnetError):
    """The configured compute cluster cannot be reached or failed the work."""

    code = "UNAVAILABLE"


def binarized(img: np.ndarray, column: str, shape: tuple[int, ...],
              max_voxels: int | None) -> np.ndarray:
    """The subject's coverage mask, after the checks the catalog's contract makes."""
    img = np.asarray(img)
    if tuple(img.shape) != tuple(shape):
        raise DataContractViolation(
            f"an image in {column!r} is not on the catalog grid {tuple(shape)}")
    mask = img > 0
    if max_voxels is not None and np.count_nonzero(mask) > max_voxels:
        # DP noise on voxel maps assumes one subject covers at most max_voxels voxels;
        # the count itself is a data value, so the message leaves it out.
        raise DataContractViolation(
            f"an image in {column!r} has more non-zero voxels than its declared "
            f"max_voxels ({max_voxels})")
    return mask


Reader = Callable[[str], np.ndarray]


def chunk_sums(read: Reader, column: str, shape: tuple[int, ...], max_voxels: int | None,
               items: Items) -> Sums:
    """A chunk of subjects' map sums: n, per-voxel count, per-voxel Σ weight."""
    count = np.zeros(shape)
    total = np.zeros(shape)
    for relpath, weight in items:
        mask = binarized(read(relpath), column, shape, max_voxels)
        count += mask
        total += weight * mask
    return len(items), count, total


def chunk_moments(read: Reader, column: str, shape: tuple[int, ...], max_voxels: int | None,
                  items: Items) -> Moments:
    """A chunk of subjects' voxel-test sums (query/voxelstats.py's coverage statistics,
    on the whole grid): n, per-voxel count, Σ weight, Σ weight²."""
    count, total, squares = np.zeros(shape), np.zeros(shape), np.zeros(shape)
    for relpath, weight in items:
        mask = binarized(read(relpath), column, shape, max_voxels)
        count += mask
        total += weight * mask
        squares += weight * weight * mask
    return len(items), count, total, squares


def roi_chunk_sums(read: Reader, column: str, shape: tuple[int, ...], max_voxels: int | None,
                   masks: Sequence[np.ndarray], paths: Sequence[str]) -> RoiSums:
    """A chunk of subjects' ROI overlap sums: subjects, and per ROI the subjects touching
    it, Σ overlap voxels and Σ overlap²."""
    n, s1, s2 = (np.zeros(len(masks)) for _ in range(3))
    for relpath in paths:
        img = binarized(read(relpath), column, shape, max_voxels)
        for i, roi in enumerate(masks):
            v = float(np.count_nonzero(img & roi))
            n[i] += v > 0
            s1[i] += v
            s2[i] += v * v
    return len(paths), n, s1, s2


def on_worker(fn: Callable[..., Any], root: str, catalog: str, *args: Any) -> Any:
    """`fn` with the catalog read from shared storage, as the daemon reads it (a
    top-level function: Dask pickles it)."""
    return fn(functools.partial(read_image, Path(root), catalog), *args)


class SubjectImages(Protocol):
    def voxel_sums(self, catalog: Any, column: str, shape: tuple[int, ...],
                   max_voxels: int | None, items: Items) -> Sums: ...

    def voxel_moments(self, catalog: Any, column: str, shape: tuple[int, ...],
                      max_voxels: int | None, items: Items) -> Moments: ...

    def roi_sums(self, catalog: Any, column: str, shape: tuple[int, ...],
                 max_voxels: int | None, masks: Sequence[np.ndarray],
                 paths: Sequence[str]) -> RoiSums: ...

    def field_sums(self, catalog: Any, column: str, shape: tuple[int, ...],
                   max_voxels: int | None, bounds: tuple[float, float] | None,
                   items: Items) -> FieldSums: ...


class InProcess:
    """Every subject read and added here, one at a time (a cohort's images together need
    not fit in memory)."""

    def voxel_sums(self, catalog: Any, column: str, shape: tuple[int, ...],
                   max_voxels: int | None, items: Items) -> Sums:
        return chunk_sums(catalog.load_image, column, shape, max_voxels, items)

    def voxel_moments(self, catalog: Any, column: str, shape: tuple[int, ...],
                      max_voxels: int | None, items: Items) -> Moments:
        return chunk_moments(catalog.load_image, column, shape, max_voxels, items)

    def roi_sums(self, catalog: Any, column: str, shape: tuple[int, ...],
                 max_voxels: int | None, masks: Sequence[np.ndarray],
                 paths: Sequence[str]) -> RoiSums:
        return roi_chunk_sums(catalog.load_image, column, shape, max_voxels, masks, paths)

    def field_sums(self, catalog: Any, column: str, shape: tuple[int, ...],
                   max_voxels: int | None, bounds: tuple[float, float] | None,
                   items: Items) -> FieldSums:
        return chunk_field_sums(catalog.load_image, column, shape, max_voxels, bounds, items)


class DaskImages:
    """The subjects' work on a `dask.distributed` cluster at `scheduler`.

    Blocking (the engine runs off the event loop). The client connects on first use and
    is kept; `chunks_per_worker` chunks per worker balance uneven workers without sending
    a task per subject.
    """

    def __init__(self, scheduler: str, *, chunks_per_worker: int = 2,
                 timeout_s: float = 600.0) -> None:
        self.scheduler = scheduler
        self._chunks_per_worker = chunks_per_worker
        self._timeout_s = timeout_s
        self._client: Any = None
        self._lock = threading.Lock()

    def _connect(self) -> Any:
        from distributed import Client

        with self._lock:
            if self._client is None:
                try:
                    self._client = Client(self.scheduler, timeout=CONNECT_TIMEOUT_S,
                                          set_as_default=False)
                except (OSError, TimeoutError) as exc:
                    raise ComputeUnavailable(
                        f"the compute cluster at {self.scheduler} cannot be reached "
                        f"({type(exc).__name__}); [compute] scheduler") from None
            return self._client

    def voxel_sums(self, catalog: Any, column: str, shape: tuple[int, ...],
                   max_voxels: int | None, items: Items) -> Sums:
        if not items:
            return 0, np.zeros(shape), np.zeros(shape)
        return self._spread(chunk_sums, catalog, (column, tuple(shape), max_voxels), items)

    def voxel_moments(self, catalog: Any, column: str, shape: tuple[int, ...],
                      max_voxels: int | None, items: Items) -> Moments:
        if not items:
            return 0, np.zeros(shape), np.zeros(shape), np.zeros(shape)
        return self._spread(chunk_moments, catalog, (column, tuple(shape), max_voxels), items)

    def roi_sums(self, catalog: Any, column: str, shape: tuple[int, ...],
                 max_voxels: int | None, masks: Sequence[np.ndarray],
                 paths: Sequence[str]) -> RoiSums:
        if not paths:
            return 0, *(np.zeros(len(masks)) for _ in range(3))  # type: ignore[return-value]
        return self._spread(roi_chunk_sums, catalog,
                            (column, tuple(shape), max_voxels, list(masks)), paths)

    def field_sums(self, catalog: Any, column: str, shape: tuple[int, ...],
                   max_voxels: int | None, bounds: tuple[float, float] | None,
                   items: Items) -> FieldSums:
        if not items:
            return 0, *(np.zeros(shape) for _ in range(4))  # type: ignore[return-value]
        return self._spread(chunk_field_sums, catalog,
                            (column, tuple(shape), max_voxels, bounds), items)

    def _spread(self, fn: Callable[..., Any], catalog: Any, args: tuple[Any, ...],
                items: Sequence[Any]) -> Any:
        """`fn` over chunks of `items` on the workers; the chunks' results added up."""
        client = self._connect()
        workers = max(1, len(client.scheduler_info().get("workers", {})))
        size = max(1, math.ceil(len(items) / (workers * self._chunks_per_worker)))
        chunks = [list(items[i:i + size]) for i in range(0, len(items), size)]
        futures = [client.submit(on_worker, fn, str(catalog.root), catalog.name, *args, chunk,
                                 pure=False, key=f"{fn.__name__}-{uuid.uuid4().hex}")
                   for chunk in chunks]
        deadline = time.monotonic() + self._timeout_s
        try:
            results = [f.result(timeout=max(0.0, deadline - time.monotonic())) for f in futures]
        except StimnetError:
            raise  # the catalog's contract, judged on the worker: the same error as here
        except (OSError, TimeoutError) as exc:
            client.cancel(futures)
            raise ComputeUnavailable(f"the compute cluster at {self.scheduler} failed the "
                                     f"map work ({type(exc).__name__})") from None
        return tuple(sum(parts[1:], parts[0]) for parts in zip(*results, strict=True))

    def close(self) -> None:
        with self._lock:
            client, self._client = self._client, None
        if client is not None:
            client.close()

