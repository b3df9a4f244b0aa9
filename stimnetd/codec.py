"""Documents with large arrays: one JSON header plus raw little-endian arrays.

Used to store released partials and results, and to stream them: the header travels as one
frame and each array as ≤ CHUNK-byte chunks, so no message grows with the voxel grid.
No pickle anywhere: a peer's bytes are parsed, never executed.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Iterator
from typing import Any

import numpy as np

from stimnetd.query.aggregate import KINDS, Partial

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


def chunks(doc: dict[str, Any], arrays: dict[str, np.ndarray]) -> Iterator[tuple[str, Any]]:
    """("header", json) then ("chunk", (array_id, offset, data, last)) items."""
    described = describe_arrays(arrays)
    yield "header", json.dumps({"doc": jsonable(doc), "arrays": described}, allow_nan=False)
    for aid, arr in arrays.items():
        data = array_bytes(arr, described[aid]["dtype"])
        if not data:
            yield "chunk", (aid, 0, b"", True)
        for off in range(0, len(data), CHUNK):
            piece = data[off:off + CHUNK]
            yield "chunk", (aid, off, piece, off + len(piece) >= len(data))


class Assembler:
    """Rebuilds (doc, arrays) from a header and chunks, checking sizes and order."""

    def __init__(self) -> None:
        self.doc: dict[str, Any] | None = None
        self._specs: dict[str, dict[str, Any]] = {}
        self._bufs: dict[str, bytearray] = {}
        self._done: set[str] = set()

    def header(self, text: str) -> None:
        if self.doc is not None:
            raise CodecError("two headers in one result")
        try:
            head = json.loads(text)
            self.doc = head["doc"]
            specs = head["arrays"]
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise CodecError(f"malformed result header: {exc}") from None
        for aid, spec in specs.items():
            if spec.get("dtype") not in _DTYPES or not isinstance(spec.get("shape"), list):
                raise CodecError(f"array {aid!r} has an invalid description")
            size = int(np.prod(spec["shape"], dtype=np.int64)) * _DTYPES[spec["dtype"]].itemsize
            if size > MAX_ARRAY_BYTES or any(int(s) < 0 for s in spec["shape"]):
                raise CodecError(f"array {aid!r} is larger than {MAX_ARRAY_BYTES} bytes")
            spec["nbytes"] = size
            self._bufs[aid] = bytearray()
        self._specs = specs

    def chunk(self, aid: str, offset: int, data: bytes, last: bool) -> None:
        if aid not in self._specs or aid in self._done:
            raise CodecError(f"unexpected chunk for array {aid!r}")
        buf = self._bufs[aid]
        if offset != len(buf) or len(buf) + len(data) > self._specs[aid]["nbytes"]:
            raise CodecError(f"array {aid!r}: chunk at offset {offset} out of order or oversized")
        buf.extend(data)
        if last:
            if len(buf) != self._specs[aid]["nbytes"]:
                raise CodecError(f"array {aid!r} is incomplete")
            self._done.add(aid)

    @property
    def complete(self) -> bool:
        return self.doc is not None and self._done == set(self._specs)

    def result(self) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        if self.doc is None:
            raise CodecError("result has no header")
        missing = set(self._specs) - self._done
        if missing:
            raise CodecError(f"result is missing arrays {sorted(missing)}")
        arrays = {aid: np.frombuffer(bytes(self._bufs[aid]), dtype=_DTYPES[s["dtype"]])
                  .reshape(s["shape"]).copy() for aid, s in self._specs.items()}
        return self.doc, arrays


def pack(doc: dict[str, Any], arrays: dict[str, np.ndarray]) -> bytes:
    parts: list[bytes] = []
    for kind, item in chunks(doc, arrays):
        if kind == "header":
            head = item.encode()
            parts.append(struct.pack("<I", len(head)) + head)
        else:
            parts.append(item[2])
    return b"".join(parts)


def unpack(blob: bytes) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    (hlen,) = struct.unpack_from("<I", blob, 0)
    asm = Assembler()
    asm.header(blob[4:4 + hlen].decode())
    pos = 4 + hlen
    for aid, spec in asm._specs.items():
        n = spec["nbytes"]
        asm.chunk(aid, 0, blob[pos:pos + n], True)
        pos += n
    return asm.result()


# -- partials ----------------------------------------------------------------------------


def partials_to_doc(partials: list[Partial]) -> tuple[list[dict[str, Any]], dict[str, np.ndarray]]:
    docs, arrays = [], {}
    for i, p in enumerate(partials):
        stats = {}
        for k, v in p.stats.items():
            aid = f"p{i}.{k}"
            arrays[aid] = np.asarray(v, dtype=np.float64)
            stats[k] = aid
        mask = None
        if p.cell_mask is not None:
            mask = f"p{i}.mask"
            arrays[mask] = np.asarray(p.cell_mask, dtype=bool)
        docs.append({"name": p.name, "kind": p.kind, "group": [list(g) for g in p.group],
                     "n": int(p.n), "meta": jsonable(p.meta), "stats": stats, "cell_mask": mask,
                     "suppressed_reason": p.suppressed_reason})
    return docs, arrays


def partials_from_doc(docs: Any, arrays: dict[str, np.ndarray]) -> list[Partial]:
    if not isinstance(docs, list):
        raise CodecError("partials must be a list")
    out = []
    for d in docs:
        try:
            if d["kind"] not in KINDS:
                raise CodecError(f"unknown partial kind {d['kind']!r}")
            stats = {k: arrays[aid] for k, aid in d["stats"].items()}
            out.append(Partial(
                name=str(d["name"]), kind=d["kind"],
                group=tuple((str(a), str(b)) for a, b in d["group"]), n=int(d["n"]),
                stats=stats, meta=dict(d["meta"]),
                cell_mask=arrays[d["cell_mask"]] if d["cell_mask"] else None,
                suppressed_reason=d["suppressed_reason"]))
        except (KeyError, TypeError, ValueError) as exc:
            raise CodecError(f"malformed partial: {exc}") from None
    return out
