"""Partials as codec documents: what a site sends the entry node, and what it stores."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np

from stimnet.codec import CodecError, jsonable
from stimnetd.query.aggregate import KINDS, Partial


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


def partials_from_doc(docs: Any, arrays: Mapping[str, np.ndarray]) -> list[Partial]:
    return list(iter_partials(docs, arrays))


def iter_partials(docs: Any, arrays: Mapping[str, np.ndarray]) -> Iterator[Partial]:
    """The partials one at a time: with codec.LazyArrays, each one's arrays are decoded only
    when it is reached."""
    if not isinstance(docs, list):
        raise CodecError("partials must be a list")
    for d in docs:
        try:
            if d["kind"] not in KINDS:
                raise CodecError(f"unknown partial kind {d['kind']!r}")
            stats = {k: arrays[aid] for k, aid in d["stats"].items()}
            p = Partial(
                name=str(d["name"]), kind=d["kind"],
                group=tuple((str(a), str(b)) for a, b in d["group"]), n=int(d["n"]),
                stats=stats, meta=dict(d["meta"]),
                cell_mask=arrays[d["cell_mask"]] if d["cell_mask"] else None,
                suppressed_reason=d["suppressed_reason"])
        except (KeyError, TypeError, ValueError) as exc:
            raise CodecError(f"malformed partial: {exc}") from None
        yield p
