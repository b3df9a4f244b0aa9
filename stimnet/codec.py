"""Documents with large arrays: one JSON header plus raw little-endian arrays.

Used to store released partials and results, and to stream them (the client assembles
answers with it too): the header travels as one frame and each array as ≤ CHUNK-byte
chunks, so no message grows with the voxel grid.
No pickle anywhere: a peer's bytes are parsed, never executed.
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np

CHUNK = 512 * 1024
MAX_ARRAY_BYTES = 256 * 1024 * 1024
# All of one document's arrays decoded: twice [storage] max_answer_mb's default, so no
# legitimate answer is refused, while a sparse header cannot make its reader allocate
# without bound.
MAX_DENSE_BYTES = 2 * 1024 * 1024 * 1024
_DTYPES = {"float64": np.dtype("<f8"), "bool": np.dtype("bool"), "int64": np.dtype("<i8")}


class CodecError(ValueError):
    pass


def jsonable(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return jsonable(obj.tolist())
    if isinstance(obj, np.bool_):
        return bool(obj)
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, np.floating | float):
        f = float(obj)
        return f if np.isfinite(f) else None
    return obj


# An array is sent sparse (its non-fill elements' flat indices, then their values) when
# that is under half its dense size: a VTA map covers a few thousand of a grid's 900,000
# voxels, so a grouped map query's answer shrinks from hundreds of MB to a few, on the
# wire, in the store, and in every copy made on the way.
SPARSE_MIN_ELEMENTS = 1024
_INDEX = np.dtype("<i8")
_FILLS = {"float64": (0, "nan"), "int64": (0,), "bool": (0, 1)}


def _fill(arr: np.ndarray) -> tuple[Any, int]:
    """The array's most common of 0, 1 and NaN (its fill), as JSON will carry it, and how
    many elements are not it. A withheld-voxel mask is mostly True, a count map mostly 0."""
    nonzero = int(np.count_nonzero(arr))
    counts: dict[Any, int] = {0: arr.size - nonzero}
    if arr.dtype.kind == "f":
        counts["nan"] = int(np.count_nonzero(np.isnan(arr)))
    elif arr.dtype == np.bool_:
        counts[1] = nonzero
    fill = max(counts, key=lambda k: counts[k])
    return fill, arr.size - counts[fill]


def describe_arrays(arrays: dict[str, np.ndarray]) -> dict[str, dict[str, Any]]:
    out = {}
    for aid, arr in arrays.items():
        dtype = "bool" if arr.dtype == np.bool_ else ("int64" if arr.dtype.kind in "iu" else "float64")
        spec: dict[str, Any] = {"dtype": dtype, "shape": list(arr.shape)}
        if arr.size >= SPARSE_MIN_ELEMENTS:
            fill, nnz = _fill(np.asarray(arr))
            if nnz * (_INDEX.itemsize + _DTYPES[dtype].itemsize) * 2 < arr.size * _DTYPES[dtype].itemsize:
                spec["sparse"] = {"nnz": nnz, "fill": fill}
        out[aid] = spec
    return out


def array_bytes(arr: np.ndarray, spec: dict[str, Any] | str) -> bytes:
    """The array's body bytes as `spec` (describe_arrays) lays them out."""
    if isinstance(spec, str):
        spec = {"dtype": spec}
    dense = np.ascontiguousarray(arr, dtype=_DTYPES[spec["dtype"]]).reshape(-1)
    sparse = spec.get("sparse")
    if sparse is None:
        return dense.tobytes()
    fill = sparse["fill"]
    keep = ~np.isnan(dense) if fill == "nan" else dense != fill
    idx = np.flatnonzero(keep)
    return idx.astype(_INDEX).tobytes() + dense[idx].tobytes()


def segment_sizes(spec: dict[str, Any]) -> list[tuple[int, int]]:
    """(byte length, item size) of each run of like items an array's body holds: one for
    a dense array; indices then values for a sparse one (blobs.py shuffles by item)."""
    item = _DTYPES[spec["dtype"]].itemsize
    sparse = spec.get("sparse")
    if sparse is not None:
        nnz = int(sparse["nnz"])
        return [(nnz * _INDEX.itemsize, _INDEX.itemsize), (nnz * item, item)]
    return [(math.prod(int(d) for d in spec["shape"]) * item, item)]


BODY = "body"


def encode(doc: dict[str, Any], arrays: dict[str, np.ndarray]) -> tuple[str, bytes]:
    """The JSON header (the document and how its arrays are laid out) and the body (every
    array's bytes, in header order)."""
    described = describe_arrays(arrays)
    header = json.dumps({"doc": jsonable(doc), "arrays": described}, allow_nan=False)
    return header, b"".join(array_bytes(arr, described[aid]) for aid, arr in arrays.items())


def chunks(doc: dict[str, Any], arrays: dict[str, np.ndarray]) -> Iterator[tuple[str, Any]]:
    """("header", json) then ("chunk", (BODY, offset, data, last)) items.

    All arrays travel as one body (in header order) cut into ≤ CHUNK pieces: a small
    result is two messages, however many arrays it has — per-message overhead, not
    bytes, dominated small federated queries.
    """
    header, body = encode(doc, arrays)
    yield "header", header
    for off in range(0, len(body), CHUNK):
        piece = body[off:off + CHUNK]
        yield "chunk", (BODY, off, piece, off + len(piece) >= len(body))


class Assembler:
    """Rebuilds (doc, arrays) from a header and body chunks, checking sizes and order."""

    def __init__(self) -> None:
        self.doc: dict[str, Any] | None = None
        self._specs: dict[str, dict[str, Any]] = {}
        self._body = bytearray()
        self._total = 0
        self._header = ""

    def header(self, text: str) -> None:
        if self.doc is not None:
            raise CodecError("two headers in one result")
        try:
            head = json.loads(text)
            doc = head["doc"]
            specs = head["arrays"]
            if not isinstance(specs, dict):
                raise TypeError("arrays must be an object")
        except (ValueError, KeyError, TypeError, RecursionError) as exc:
            # ValueError: JSONDecodeError, and an integer of 4,300+ digits.
            raise CodecError(f"malformed result header: {type(exc).__name__}: "
                             f"{str(exc)[:200]}") from None
        total = dense = 0
        for aid, spec in specs.items():
            total += _checked(aid, spec)
            dense += math.prod(spec["shape"]) * _DTYPES[spec["dtype"]].itemsize
        if dense > MAX_DENSE_BYTES:
            # A sparse body of a few bytes can announce gigabytes of decoded grids.
            raise CodecError(f"result would take {dense} bytes decoded, more than "
                             f"{MAX_DENSE_BYTES}")
        self.doc, self._specs, self._total, self._header = doc, specs, total, text

    def chunk(self, aid: str, offset: int, data: bytes, last: bool) -> None:
        if self.doc is None or aid != BODY:
            raise CodecError(f"unexpected chunk {aid!r}")
        if offset != len(self._body) or len(self._body) + len(data) > self._total:
            raise CodecError(f"chunk at offset {offset} out of order or oversized")
        self._body.extend(data)
        if last and len(self._body) != self._total:
            raise CodecError("result body is incomplete")

    def packed(self) -> bytes:
        """The document as `pack` lays it out (header and body as they arrived)."""
        head = self._header.encode()
        return struct.pack("<I", len(head)) + head + bytes(self._body)

    @property
    def complete(self) -> bool:
        return self.doc is not None and len(self._body) == self._total

    def result(self) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        if self.doc is None:
            raise CodecError("result has no header")
        if len(self._body) != self._total:
            raise CodecError(f"result body has {len(self._body)} of {self._total} bytes")
        arrays, pos = {}, 0
        body = memoryview(self._body)
        for aid, spec in self._specs.items():
            n = spec["nbytes"]
            arrays[aid] = _decode(aid, spec, body[pos:pos + n])
            pos += n
        return self.doc, arrays


def _checked(aid: str, spec: Any) -> int:
    """The body bytes an array description announces, after checking it: dense size
    within MAX_ARRAY_BYTES (a sparse array is made dense on arrival), a sparse one's count
    within its shape."""
    # `type(x) is int`: JSON true is a bool, which isinstance() calls an int.
    if not isinstance(spec, dict) or spec.get("dtype") not in _DTYPES \
            or not isinstance(spec.get("shape"), list) \
            or not all(type(x) is int and x >= 0 for x in spec["shape"]):
        raise CodecError(f"array {aid!r} has an invalid description")
    # Python integers: a 64-bit product of a hostile shape could wrap to a small size.
    elements = math.prod(spec["shape"])
    if elements * _DTYPES[spec["dtype"]].itemsize > MAX_ARRAY_BYTES:
        raise CodecError(f"array {aid!r} is larger than {MAX_ARRAY_BYTES} bytes")
    sparse = spec.get("sparse")
    if sparse is not None:
        if not isinstance(sparse, dict) or type(sparse.get("nnz")) is not int \
                or not 0 <= sparse["nnz"] <= elements or sparse.get("fill") not in _FILLS[spec["dtype"]]:
            raise CodecError(f"array {aid!r} has an invalid sparse description")
    spec["nbytes"] = sum(n for n, _ in segment_sizes(spec))
    return int(spec["nbytes"])


def _decode(aid: str, spec: dict[str, Any], raw: memoryview) -> np.ndarray:
    dtype = _DTYPES[spec["dtype"]]
    sparse = spec.get("sparse")
    if sparse is None:
        return np.frombuffer(raw, dtype=dtype).reshape(spec["shape"]).copy()
    nnz = sparse["nnz"]
    idx = np.frombuffer(raw, dtype=_INDEX, count=nnz)
    values = np.frombuffer(raw, dtype=dtype, count=nnz, offset=nnz * _INDEX.itemsize)
    size = math.prod(spec["shape"])
    # Strictly increasing and in range: each element is set at most once, inside the grid.
    if nnz and (idx[0] < 0 or idx[-1] >= size or np.any(np.diff(idx) <= 0)):
        raise CodecError(f"array {aid!r} has sparse indices out of order or out of range")
    out = np.full(size, np.nan if sparse["fill"] == "nan" else sparse["fill"], dtype=dtype)
    out[idx] = values
    return out.reshape(spec["shape"])


def pack(doc: dict[str, Any], arrays: dict[str, np.ndarray]) -> bytes:
    header, body = encode(doc, arrays)
    head = header.encode()
    return struct.pack("<I", len(head)) + head + body


def split(blob: bytes) -> tuple[str, bytes]:
    """A packed document's JSON header and body, as `chunks` produced them: ready to
    stream without decoding and re-encoding."""
    if len(blob) < 4:
        raise CodecError("packed document is truncated")
    (hlen,) = struct.unpack_from("<I", blob, 0)
    if 4 + hlen > len(blob):
        raise CodecError("packed document's header is truncated")
    try:
        return blob[4:4 + hlen].decode(), blob[4 + hlen:]
    except UnicodeDecodeError as exc:
        raise CodecError(f"packed document's header is not UTF-8: {exc}") from None


class LazyArrays(Mapping[str, np.ndarray]):
    """A packed document's arrays, each decoded when it is looked up (and not kept): the
    entry adds a site's partials one at a time, so only one partial's grids are dense at
    once, not the whole site's."""

    def __init__(self, specs: dict[str, dict[str, Any]], body: bytes) -> None:
        self._specs, self._body = specs, memoryview(body)
        self._at: dict[str, int] = {}
        pos = 0
        for aid, spec in specs.items():
            self._at[aid] = pos
            pos += spec["nbytes"]

    def __getitem__(self, aid: str) -> np.ndarray:
        spec, at = self._specs[aid], self._at[aid]
        return _decode(aid, spec, self._body[at:at + spec["nbytes"]])

    def __iter__(self) -> Iterator[str]:
        return iter(self._specs)

    def __len__(self) -> int:
        return len(self._specs)

    @property
    def dense_bytes(self) -> int:
        """What the arrays take decoded."""
        return sum(math.prod(s["shape"]) * _DTYPES[s["dtype"]].itemsize
                   for s in self._specs.values())


def unpack_lazy(blob: bytes) -> tuple[dict[str, Any], LazyArrays]:
    """As `unpack`, with the arrays decoded on lookup (LazyArrays); sizes checked now."""
    header, body = split(blob)
    asm = Assembler()
    asm.header(header)
    if len(body) != asm._total:
        raise CodecError(f"result body has {len(body)} of {asm._total} bytes")
    assert asm.doc is not None
    return asm.doc, LazyArrays(asm._specs, body)


def unpack(blob: bytes) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    header, body = split(blob)
    asm = Assembler()
    asm.header(header)
    asm.chunk(BODY, 0, body, True)
    return asm.result()
