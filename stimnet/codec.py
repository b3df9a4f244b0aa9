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
from collections.abc import Iterator
from typing import Any

import numpy as np

CHUNK = 512 * 1024
MAX_ARRAY_BYTES = 256 * 1024 * 1024
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


def describe_arrays(arrays: dict[str, np.ndarray]) -> dict[str, dict[str, Any]]:
    out = {}
    for aid, arr in arrays.items():
        dtype = "bool" if arr.dtype == np.bool_ else ("int64" if arr.dtype.kind in "iu" else "float64")
        out[aid] = {"dtype": dtype, "shape": list(arr.shape)}
    return out


def array_bytes(arr: np.ndarray, dtype: str) -> bytes:
    return np.ascontiguousarray(arr, dtype=_DTYPES[dtype]).tobytes()


BODY = "body"


def encode(doc: dict[str, Any], arrays: dict[str, np.ndarray]) -> tuple[str, bytes]:
    """The JSON header (the document and how its arrays are laid out) and the body (every
    array's bytes, in header order)."""
    described = describe_arrays(arrays)
    header = json.dumps({"doc": jsonable(doc), "arrays": described}, allow_nan=False)
    return header, b"".join(array_bytes(arr, described[aid]["dtype"])
                            for aid, arr in arrays.items())


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
        total = 0
        for aid, spec in specs.items():
            # `type(x) is int`: JSON true is a bool, which isinstance() calls an int.
            if not isinstance(spec, dict) or spec.get("dtype") not in _DTYPES \
                    or not isinstance(spec.get("shape"), list) \
                    or not all(type(x) is int and x >= 0 for x in spec["shape"]):
                raise CodecError(f"array {aid!r} has an invalid description")
            # Python integers: a 64-bit product of a hostile shape could wrap to a small size.
            size = math.prod(spec["shape"]) * _DTYPES[spec["dtype"]].itemsize
            if size > MAX_ARRAY_BYTES:
                raise CodecError(f"array {aid!r} is larger than {MAX_ARRAY_BYTES} bytes")
            spec["nbytes"] = size
            total += size
        self.doc, self._specs, self._total = doc, specs, total

    def chunk(self, aid: str, offset: int, data: bytes, last: bool) -> None:
        if self.doc is None or aid != BODY:
            raise CodecError(f"unexpected chunk {aid!r}")
        if offset != len(self._body) or len(self._body) + len(data) > self._total:
            raise CodecError(f"chunk at offset {offset} out of order or oversized")
        self._body.extend(data)
        if last and len(self._body) != self._total:
            raise CodecError("result body is incomplete")

    @property
    def complete(self) -> bool:
        return self.doc is not None and len(self._body) == self._total

    def result(self) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        if self.doc is None:
            raise CodecError("result has no header")
        if len(self._body) != self._total:
            raise CodecError(f"result body has {len(self._body)} of {self._total} bytes")
        arrays, pos = {}, 0
        body = bytes(self._body)
        for aid, spec in self._specs.items():
            n = spec["nbytes"]
            arrays[aid] = np.frombuffer(body[pos:pos + n], dtype=_DTYPES[spec["dtype"]]) \
                .reshape(spec["shape"]).copy()
            pos += n
        return self.doc, arrays


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


def unpack(blob: bytes) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    header, body = split(blob)
    asm = Assembler()
    asm.header(header)
    asm.chunk(BODY, 0, body, True)
    return asm.result()
