"""Documents with arrays travel as a header plus ≤ CHUNK body pieces, and nothing else."""

from __future__ import annotations

import numpy as np
import pytest

from stimnet import codec


def _roundtrip(doc, arrays):  # type: ignore[no-untyped-def]
    asm = codec.Assembler()
    for kind, item in codec.chunks(doc, arrays):
        if kind == "header":
            asm.header(item)
        else:
            asm.chunk(*item)
    assert asm.complete is True
    return asm.result()


def test_large_arrays_are_chunked_and_reassembled() -> None:
    """A voxel-map-sized array crosses in pieces no larger than CHUNK and comes back equal."""
    rng = np.random.default_rng(0)
    arrays = {"count": rng.random((91, 109, 91)), "mask": rng.random(10) > 0.5,
              "empty": np.zeros((0,))}
    pieces = [item for kind, item in codec.chunks({"a": 1}, arrays) if kind == "chunk"]
    assert [len(p[2]) for p in pieces if len(p[2]) > codec.CHUNK] == []
    assert len(pieces) > 10
    doc, back = _roundtrip({"a": 1}, arrays)
    assert doc == {"a": 1}
    for k, v in arrays.items():
        assert back[k].dtype == (np.bool_ if v.dtype == bool else np.float64)
        np.testing.assert_array_equal(back[k], v)


def test_small_result_is_two_messages() -> None:
    """Many small arrays still make one header and one body piece."""
    items = list(codec.chunks({}, {f"a{i}": np.ones(3) for i in range(20)}))
    assert [k for k, _ in items] == ["header", "chunk"]


def test_pack_unpack_roundtrip() -> None:
    """pack/unpack (the stored form) round-trips documents and arrays exactly."""
    doc, arrays = codec.unpack(codec.pack({"x": [1, 2]}, {"v": np.arange(5.0)}))
    assert doc == {"x": [1, 2]} and arrays["v"].tolist() == [0, 1, 2, 3, 4]


@pytest.mark.parametrize("header, problem", [
    ('{"doc": {}, "arrays": {"a": {"dtype": "object", "shape": [1]}}}', "invalid description"),
    ('{"doc": {}, "arrays": {"a": {"dtype": "float64", "shape": [100000, 100000]}}}', "larger than"),
    # 2^32 x 2^32 elements: a product that wraps to 0 in 64-bit integers.
    ('{"doc": {}, "arrays": {"a": {"dtype": "float64", "shape": [4294967296, 4294967296]}}}',
     "larger than"),
    ('{"doc": {}, "arrays": {"a": {"dtype": "float64", "shape": [true]}}}', "invalid description"),
    ('{"doc": {}, "arrays": {"a": {"dtype": "float64", "shape": [-1]}}}', "invalid description"),
    ("not json", "malformed result header"),
    ('{"doc": ' + "9" * 5000 + ', "arrays": {}}', "malformed result header: ValueError"),
    ("[" * 100_000 + "]" * 100_000, "malformed result header: RecursionError"),
])
def test_hostile_headers_are_refused(header: str, problem: str) -> None:
    """A peer's header asking for absurd, negative or non-numeric arrays is refused."""
    with pytest.raises(codec.CodecError, match=problem):
        codec.Assembler().header(header)


def test_out_of_order_and_oversized_chunks_are_refused() -> None:
    """Chunks must arrive in order and never exceed what the header announced."""
    asm = codec.Assembler()
    asm.header('{"doc": {}, "arrays": {"a": {"dtype": "float64", "shape": [2]}}}')
    with pytest.raises(codec.CodecError, match="out of order"):
        asm.chunk(codec.BODY, 8, b"\0" * 8, False)
    with pytest.raises(codec.CodecError, match="out of order or oversized"):
        asm.chunk(codec.BODY, 0, b"\0" * 24, True)
    asm.chunk(codec.BODY, 0, b"\0" * 8, False)
    assert asm.complete is False
    with pytest.raises(codec.CodecError, match="of 16 bytes"):
        asm.result()


@pytest.mark.parametrize("arrays, messages", [
    ({f"a{i}": np.ones(3) for i in range(20)}, ["header+body"]),          # small: inline
    ({}, ["header"]),                                                      # no arrays
    ({"v": np.ones(8192)}, ["header+body"]),                               # exactly INLINE
    ({"v": np.ones(8193)}, ["header", "chunk"]),                           # just over
    ({"map": np.ones(300_000)}, ["header"] + ["chunk"] * 5),               # 2.4 MB in pieces
])
def test_frames_inline_a_small_body_and_chunk_a_large_one(arrays, messages) -> None:  # type: ignore[no-untyped-def]
    """On the wire a small result is one message; a large one is never one oversized message."""
    from stimnet.frames import INLINE, feed, to_frames

    frames = list(to_frames({"k": 1}, arrays))
    kinds = [("header+body" if f.header.body else "header") if f.HasField("header") else "chunk"
             for f in frames]
    assert kinds == messages
    assert [f for f in frames if len(f.chunk.data) > codec.CHUNK or len(f.header.body) > INLINE] == []
    asm = codec.Assembler()
    for f in frames:
        feed(asm, f)
    doc, back = asm.result()
    assert doc == {"k": 1} and set(back) == set(arrays)
    for k, v in arrays.items():
        np.testing.assert_array_equal(back[k], v)


def _vta_like(fill: float) -> np.ndarray:
    grid = np.full((91, 109, 91), fill)
    grid[40:50, 50:60, 30:35] = np.arange(500.0).reshape(10, 10, 5) + 1
    grid[40, 50, 30] = 0.0 if np.isnan(fill) else np.nan  # the other fill value, kept exactly
    return grid


@pytest.mark.parametrize("fill", [0.0, np.nan])
def test_mostly_empty_maps_travel_sparse_and_come_back_equal(fill: float) -> None:
    """A VTA-like map (500 of 900,000 voxels set) is sent as indices and values: its body
    is a few KB instead of 7 MB, and it decodes to the same array, fill and all."""
    arrays = {"m": _vta_like(fill), "mask": _vta_like(0.0) > 0, "withheld": ~(_vta_like(0.0) > 0),
              "dense": np.arange(2000.0)}
    header, body = codec.encode({}, arrays)
    assert len(body) < 30_000 + 2000 * 8
    doc, back = codec.unpack(codec.pack({}, arrays))
    for k, v in arrays.items():
        assert back[k].dtype == v.dtype and back[k].shape == v.shape
        np.testing.assert_array_equal(back[k], v)
    assert "sparse" not in codec.describe_arrays({"d": np.arange(2000.0)})["d"]


@pytest.mark.parametrize("sparse, body, problem", [
    ({"nnz": 5, "fill": 0}, b"\0" * 16 * 5, "invalid sparse"),             # more than the shape
    ({"nnz": 1, "fill": 7}, b"\0" * 16, "invalid sparse"),                 # unknown fill
    ({"nnz": True, "fill": 0}, b"\0" * 16, "invalid sparse"),
    ({"nnz": 2, "fill": 0}, np.array([2, 1], "<i8").tobytes() + b"\0" * 16, "out of order"),
    ({"nnz": 1, "fill": 0}, np.array([4], "<i8").tobytes() + b"\0" * 8, "out of range"),
    ({"nnz": 1, "fill": 0}, np.array([-1], "<i8").tobytes() + b"\0" * 8, "out of range"),
])
def test_hostile_sparse_arrays_are_refused(sparse, body, problem) -> None:  # type: ignore[no-untyped-def]
    """A peer's sparse array cannot set an element twice, outside its shape, or claim more
    elements than the shape holds."""
    import json

    header = json.dumps({"doc": {}, "arrays": {"a": {"dtype": "float64", "shape": [4],
                                                     "sparse": sparse}}})
    with pytest.raises(codec.CodecError, match=problem):
        asm = codec.Assembler()
        asm.header(header)
        asm.chunk(codec.BODY, 0, body, True)
        asm.result()


def test_stored_sparse_documents_round_trip_through_compaction() -> None:
    """The store shuffles each run of like items (indices, then values) and restores them."""
    from stimnetd.store import blobs

    blob = codec.pack({"x": 1}, {"m": _vta_like(np.nan), "c": _vta_like(0.0)})
    stored = blobs.compact(blob)
    assert blobs.expand(stored) == blob and len(stored) < len(blob)


def test_a_tiny_sparse_header_cannot_announce_unbounded_grids() -> None:
    """Empty sparse arrays cost no body bytes; their decoded total is still capped."""
    import json

    n = codec.MAX_ARRAY_BYTES // 8
    arrays = {f"a{i}": {"dtype": "float64", "shape": [n], "sparse": {"nnz": 0, "fill": 0}}
              for i in range(codec.MAX_DENSE_BYTES // codec.MAX_ARRAY_BYTES + 1)}
    with pytest.raises(codec.CodecError, match="decoded, more than"):
        codec.Assembler().header(json.dumps({"doc": {}, "arrays": arrays}))
