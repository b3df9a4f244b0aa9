"""One image in the compact form voxel maps need: its non-zero voxels' flat C-order indices
(increasing) and its values there, in the image's own dtype (a uint8 VTA keeps one byte a
voxel, an E-field its floats). Under 0.25 % of a VTA's voxels are non-zero, so this is what
the image cache holds and what maps are built from, in work proportional to the non-zero
voxels rather than to the grid.

`decode_sparse` is a function of paths only (like `loader.read_image`), so a worker
process reads an image exactly as the daemon would.
"""

from __future__ import annotations

import gzip
import zlib
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import numpy.typing as npt

from stimnetd.catalog.loader import _inside, read_image

# Bytes a cached entry costs besides its arrays (the objects, the key): counted so that a
# cap in bytes also bounds how many near-empty images are kept.
ENTRY_OVERHEAD_BYTES = 256
# A trailer claiming more than this is not believed for the buffer's first allocation.
MAX_PRESIZED = 1 << 30


@dataclass(frozen=True, eq=False)
class SparseImage:
    """`index`: flat C-order indices of the voxels whose value is not 0, increasing;
    `values`: the image there (NaN is not 0, so it is kept, as a dense `img > 0` would
    see it)."""

    shape: tuple[int, ...]
    index: npt.NDArray[np.integer]
    values: np.ndarray

    @property
    def nbytes(self) -> int:
        return int(self.index.nbytes + self.values.nbytes) + ENTRY_OVERHEAD_BYTES

    def dense(self) -> np.ndarray:
        grid = np.zeros(int(np.prod(self.shape)), dtype=self.values.dtype)
        grid[self.index] = self.values
        return grid.reshape(self.shape)


def index_dtype(shape: tuple[int, ...]) -> type[np.integer]:
    return np.int32 if int(np.prod(shape)) < 2**31 else np.int64


def sparse_of(img: np.ndarray) -> SparseImage:
    """The non-zero voxels of a dense image."""
    a = np.asarray(img)
    shape = tuple(int(s) for s in a.shape)
    if a.ndim > 1 and a.flags.f_contiguous and not a.flags.c_contiguous:
        # NIfTI data are stored in Fortran order: scan them as stored (a copy into C order
        # costs more than the scan) and convert the few hits' indices.
        flat = a.T.reshape(-1)
        where = _nonzero(flat)
        index = np.ravel_multi_index(np.unravel_index(where, shape, order="F"), shape)
        order = np.argsort(index, kind="stable")
        index, values = index[order], flat[where][order]
    else:
        flat = np.ascontiguousarray(a).reshape(-1)
        index = _nonzero(flat)
        values = flat[index]
    return SparseImage(shape, index.astype(index_dtype(shape)), values.copy())


def _nonzero(flat: np.ndarray) -> npt.NDArray[np.intp]:
    """np.flatnonzero(flat), found word by word: numpy's nonzero on a byte array is ten
    times slower than reading it as 8-byte words, and almost every word is zero."""
    size = flat.dtype.itemsize
    if size not in (1, 2, 4, 8) or flat.size < 64:
        return np.flatnonzero(flat)
    per_word = 8 // size
    whole = flat.size - flat.size % per_word
    words = flat[:whole].view(np.uint64)
    hit = np.flatnonzero(words)
    # A word with a non-zero byte may still hold only zero values (-0.0), so each
    # candidate is compared by value.
    cand = (hit[:, None] * per_word + np.arange(per_word)).ravel()
    cand = cand[flat[cand] != 0]
    tail = np.flatnonzero(flat[whole:]) + whole
    return np.concatenate([cand, tail]).astype(np.intp)


def decode_sparse(root: Path, catalog: str, relpath: str) -> SparseImage:
    """One image of the catalog at `root`, decoded into its sparse form.

    A single-file NIfTI-1 (`.nii`, `.nii.gz`) is read whole and gunzipped in one call, then
    parsed by nibabel from memory: the same header and scaling as `nib.load`, at a third
    of its time on a 1 mm grid (nibabel's streamed gunzip reads in small blocks). Anything
    else, and any file that path cannot parse, goes through `read_image`, whose errors are
    the catalog's."""
    path = _inside(root, relpath, catalog)
    try:
        img = _fast_read(path)
    except Exception:  # nibabel and gzip raise many types; read_image names the problem
        img = None
    return sparse_of(img if img is not None else read_image(root, catalog, relpath))


def gunzip(data: bytes) -> bytes:
    """`gzip.decompress(data)`, with the output buffer sized up front from the gzip trailer
    (ISIZE): growing it while inflating a 1 mm grid's 7 MB of mostly zeros took 40 % of the
    time. A file whose first member does not yield ISIZE bytes (several members, a lying
    trailer) takes gzip's own path."""
    size = int.from_bytes(data[-4:], "little") if len(data) >= 18 else 0
    if 0 < size <= MAX_PRESIZED:
        try:
            out = zlib.decompress(data, 31, size)
        except zlib.error:
            out = b""
        if len(out) == size:
            return out
    return gzip.decompress(data)


def _fast_read(path: Path) -> np.ndarray | None:
    name = path.name.lower()
    if not name.endswith((".nii", ".nii.gz")):
        return None
    raw = path.read_bytes()
    if name.endswith(".gz"):
        raw = gunzip(raw)
    # Single-file NIfTI-1 only ("n+1" at byte 344); NIfTI-2 and pairs take nibabel's path.
    if raw[344:348] != b"n+1\x00":
        return None
    return np.asarray(nib.Nifti1Image.from_bytes(raw).dataobj)
