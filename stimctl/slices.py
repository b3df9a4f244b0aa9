"""A PNG of three orthogonal slices through a map's peak, without a plotting stack.

Written with zlib and struct only: pulling matplotlib into a CLI for one figure would
double its install size. Slices go through the voxel with the largest finite value.
"""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import numpy as np


def _hot(x: np.ndarray) -> np.ndarray:
    """[0, 1] → RGB 'hot' colour map (black → red → yellow → white)."""
    r = np.clip(x * 3, 0, 1)
    g = np.clip(x * 3 - 1, 0, 1)
    b = np.clip(x * 3 - 2, 0, 1)
    return (np.stack([r, g, b], axis=-1) * 255).astype(np.uint8)


def _crop(vol: np.ndarray, margin: int = 6) -> np.ndarray:
    """The box holding every finite non-zero voxel, plus a margin: DBS maps are tiny
    against a whole-brain grid, and an uncropped figure is mostly black."""
    hit = np.isfinite(vol) & (vol != 0)
    if not hit.any():
        return vol
    idx = np.argwhere(hit)
    lo = np.maximum(idx.min(axis=0) - margin, 0)
    hi = np.minimum(idx.max(axis=0) + margin + 1, vol.shape)
    return vol[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]]


def slices_rgb(vol: np.ndarray, scale: int = 8) -> np.ndarray:
    vol = _crop(np.asarray(vol, dtype=np.float64))
    finite = np.isfinite(vol)
    if not finite.any():
        peak = tuple(s // 2 for s in vol.shape)
        lo, hi = 0.0, 1.0
    else:
        masked = np.where(finite, vol, -np.inf)
        peak = np.unravel_index(int(np.argmax(masked)), vol.shape)
        lo, hi = float(np.min(vol[finite])), float(np.max(vol[finite]))
    # Uncovered voxels (NaN) stay black; covered ones start at a dim red so a voxel with
    # the smallest value is still visibly part of the map.
    norm = np.where(finite, 0.15 + 0.85 * (vol - lo) / (hi - lo if hi > lo else 1.0), 0.0)
    x, y, z = peak
    # Radiological-agnostic display: rows are the second axis flipped so "up" is up.
    views = [norm[:, :, z].T[::-1], norm[:, y, :].T[::-1], norm[x, :, :].T[::-1]]
    height = max(v.shape[0] for v in views)
    padded = [np.pad(v, ((0, height - v.shape[0]), (0, 2))) for v in views]
    img = np.concatenate(padded, axis=1)
    img = np.kron(img, np.ones((scale, scale)))
    return _hot(img)


def write_png(rgb: np.ndarray, path: Path) -> None:
    h, w, _ = rgb.shape
    raw = b"".join(b"\x00" + rgb[row].tobytes() for row in range(h))

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(
            ">I", zlib.crc32(tag + data) & 0xFFFFFFFF)

    png = (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
           + chunk(b"IDAT", zlib.compress(raw, 9)) + chunk(b"IEND", b""))
    path.write_bytes(png)


def write_slices_png(vol: np.ndarray, path: Path, title: str = "") -> None:
    write_png(slices_rgb(vol), path)
