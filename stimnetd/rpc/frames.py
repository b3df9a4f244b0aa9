"""Documents with arrays ↔ ResultFrame streams (header frame, then ≤512 KiB chunks)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np

from stimnet.v1 import common_pb2
from stimnetd import codec


def to_frames(doc: dict[str, Any], arrays: dict[str, np.ndarray]) -> Iterator[common_pb2.ResultFrame]:
    for kind, item in codec.chunks(doc, arrays):
        if kind == "header":
            yield common_pb2.ResultFrame(header=common_pb2.ResultHeader(header_json=item))
        else:
            aid, off, data, last = item
            yield common_pb2.ResultFrame(chunk=common_pb2.ArrayChunk(
                array_id=aid, offset=off, data=data, last=last))


def feed(asm: codec.Assembler, frame: common_pb2.ResultFrame) -> None:
    which = frame.WhichOneof("frame")
    if which == "header":
        asm.header(frame.header.header_json)
    elif which == "chunk":
        c = frame.chunk
        asm.chunk(c.array_id, c.offset, c.data, c.last)
    else:
        raise codec.CodecError("empty result frame")
