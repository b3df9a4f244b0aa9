"""Packed documents (stimnet.codec) as the store keeps them: byte-shuffled and compressed.

A released map is mostly empty (a VTA covers a few thousand of a grid's 900,000 voxels),
and a noised one holds float32-precision values in float64 slots (privacy/noise rounds
them): grouping each array's bytes by significance (byte k of every element together, as
Blosc's shuffle does) turns the zero high and low bytes into long runs that zlib removes.
Lossless: `expand(compact(b)) == b`. Rows written before this module are plain packed
documents; `expand` returns them as they are (no packed document starts with MAGIC: its
first four bytes are a header length, and MAGIC read so is over 800 MB).
"""

from __future__ import annotations

import json
import zlib

import numpy as np

from stimnet import codec

MAGIC = b"SNZ1"
LEVEL = 6


def compact(blob: bytes) -> bytes:
    """`blob` (codec.pack's output) as stored."""
    try:
        header, body = codec.split(blob)
    except codec.CodecError:  # not a packed document: compressed as it is
        return MAGIC + zlib.compress(blob, LEVEL)
    sizes = _item_sizes(header, len(body))
    shuffled = _shuffle(body, sizes, forward=True) if sizes else body
    return MAGIC + zlib.compress(blob[:len(blob) - len(body)] + shuffled, LEVEL)


def expand(stored: bytes | None) -> bytes | None:
    """A stored document as codec.pack made it (None stays None)."""
    if stored is None or not stored.startswith(MAGIC):
        return stored
    try:
        raw = zlib.decompress(stored[len(MAGIC):])
    except zlib.error as exc:
        raise codec.CodecError(f"stored document is corrupt: {exc}") from None
    try:
        header, body = codec.split(raw)
    except codec.CodecError:
        return raw
    sizes = _item_sizes(header, len(body))
    return raw[:len(raw) - len(body)] + (_shuffle(body, sizes, forward=False) if sizes else body)


def _item_sizes(header: str, body_len: int) -> list[tuple[int, int]]:
    """(byte length, item size) of each array in the body, in order; [] if the header does
    not describe the body exactly (then the body is compressed unshuffled)."""
    try:
        specs = json.loads(header)["arrays"]
        out = [seg for spec in specs.values() for seg in codec.segment_sizes(spec)]
    except (ValueError, KeyError, TypeError, AttributeError):
        return []
    return out if sum(n for n, _ in out) == body_len else []


def _shuffle(body: bytes, sizes: list[tuple[int, int]], *, forward: bool) -> bytes:
    parts, pos = [], 0
    for n, item in sizes:
        piece = np.frombuffer(body, dtype=np.uint8, count=n, offset=pos)
        pos += n
        if item == 1 or n == 0:
            parts.append(piece.tobytes())
        elif forward:
            parts.append(piece.reshape(-1, item).T.tobytes())
        else:
            parts.append(piece.reshape(item, -1).T.tobytes())
    return b"".join(parts)
