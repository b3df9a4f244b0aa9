"""Documents with arrays ↔ ResultFrame streams (header frame, then ≤512 KiB chunks).

A body of at most INLINE bytes rides in the header frame itself: per-message overhead, not
bytes, dominates small federated queries, and most answers are a few hundred bytes.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np

from stimnet.v1 import common_pb2
from stimnetd import codec

INLINE = 64 * 1024


def to_frames(doc: dict[str, Any], arrays: dict[str, np.ndarray]) -> Iterator[common_pb2.ResultFrame]:
    header: str | None = None
    for kind, item in codec.chunks(doc, arrays):
        if kind == "header":
            header = item
            continue
        aid, off, data, last = item
        if header is not None:
            if off == 0 and last and len(data) <= INLINE:
                yield common_pb2.ResultFrame(header=common_pb2.ResultHeader(header_json=header,
                                                                            body=data))
                header = None
                continue
            yield common_pb2.ResultFrame(header=common_pb2.ResultHeader(header_json=header))
            header = None
        yield common_pb2.ResultFrame(chunk=common_pb2.ArrayChunk(
            array_id=aid, offset=off, data=data, last=last))
    if header is not None:  # no arrays at all
        yield common_pb2.ResultFrame(header=common_pb2.ResultHeader(header_json=header))


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
