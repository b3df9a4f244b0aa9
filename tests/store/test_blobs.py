"""Stored documents: compressed losslessly, and read back whether compressed or not."""

from __future__ import annotations

import numpy as np
from hypothesis import given
from hypothesis import strategies as st

from stimnet import codec
from stimnetd.store import blobs


def test_a_sparse_map_is_stored_in_a_small_fraction_of_its_size() -> None:
    """A mostly empty voxel map (as a VTA's) packs sparse (stimnet/codec.py) and stores in
    under 0.1 % of its dense float64 bytes."""
    grid = np.zeros((91, 109, 91))
    grid[40:50, 50:60, 40:45] = np.random.default_rng(0).random((10, 10, 5))
    blob = codec.pack({"kind": "map"}, {"sum": grid, "count": (grid > 0).astype(float)})
    stored = blobs.compact(blob)
    dense = 2 * grid.nbytes
    assert len(blob) < 0.002 * dense and len(stored) < 0.001 * dense
    assert blobs.expand(stored) == blob


def test_float32_precision_values_shrink_to_about_half() -> None:
    """A dense noised map at float32 precision (privacy/noise rounds maps) stores in at most
    55 % of its float64 bytes: the shuffle groups the zero low bytes."""
    noisy = np.random.default_rng(1).laplace(size=200_000).astype(np.float32).astype(np.float64)
    blob = codec.pack({}, {"m": noisy})
    assert len(blobs.compact(blob)) < 0.55 * len(blob)


def test_a_row_stored_before_compression_reads_as_it_was() -> None:
    """A plain packed document (rows written by earlier versions) is returned unchanged."""
    blob = codec.pack({"a": 1}, {"x": np.arange(5.0)})
    assert blobs.expand(blob) == blob
    assert blobs.expand(None) is None


@given(st.lists(st.integers(-(2**40), 2**40), max_size=50), st.binary(max_size=64))
def test_compaction_is_lossless_for_any_document(values: list[int], junk: bytes) -> None:
    """expand(compact(b)) == b for packed documents of each dtype, and for bytes that are
    not a packed document at all."""
    arrays = {"i": np.asarray(values, dtype=np.int64), "f": np.asarray(values, dtype=float) / 3,
              "b": np.asarray([v > 0 for v in values], dtype=bool)}
    for blob in (codec.pack({"n": len(values)}, arrays), junk):
        assert blobs.expand(blobs.compact(blob)) == blob
