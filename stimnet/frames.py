"""Documents with arrays ↔ ResultFrame streams (header frame, then ≤512 KiB chunks).

A body of at most INLINE bytes rides in the header frame itself: per-message overhead, not
bytes, dominates small federated queries, and most answers are a few hundred bytes.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np

from stimnet import codec
from stimnet.v1 import common_pb2

INLINE = 64 * 1024


def to_frames(doc: dict[str, Any], arrays: dict[str, np.ndarray]) -> Iterator[common_pb2.ResultFrame]:
    return _frames(*codec.encode(doc, arrays))


def packed_frames(blob: bytes) -> Iterator[common_pb2.ResultFrame]:
    """Frames of an already packed document (a stored release or result): its header and
    body go out as they are, without decoding and re-encoding."""
    return _frames(*codec.split(blob))


def _frames(header: str, body: bytes) -> Iterator[common_pb2.ResultFrame]:
    if len(body) <= INLINE:
        yield common_pb2.ResultFrame(header=common_pb2.ResultHeader(header_json=header, body=body))
        return
    yield common_pb2.ResultFrame(header=common_pb2.ResultHeader(header_json=header))
    for off in range(0, len(body), codec.CHUNK):
        piece = body[off:off + codec.CHUNK]
        yield common_pb2.ResultFrame(chunk=common_pb2.ArrayChunk(
            array_id=codec.BODY, offset=off, data=piece, last=off + len(piece) >= len(body)))


def feed(asm: codec.Assembler, frame: common_pb2.ResultFrame) -> None:
    which = frame.WhichOneof("frame")
    if which == "header":
        asm.header(frame.header.header_json)
        if frame.header.body:
            asm.chunk(codec.BODY, 0, frame.header.body, True)
    elif which == "chunk":
        c = frame.chunk
        asm.chunk(c.array_id, c.offset, c.data, c.last)
    else:
        raise codec.CodecError("empty result frame")
