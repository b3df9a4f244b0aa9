"""What one site's share of a job came to: the value the fan-out gathers and a peer sends back."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import numpy as np

from stimnet import codec
from stimnet.states import SiteState
from stimnetd.query import partial_docs
from stimnetd.query.aggregate import Partial

# Outcomes whose arrays are larger than this keep only their packed (sparse) form until the
# entry combines them (`one_by_one`): a grouped map query's dense arrays are hundreds of MB
# per site, and the entry would otherwise hold every site's at once.
LEAN_BYTES = 4 * 1024 * 1024
# Arrays past this are suppressed and packed on a worker thread: a map's grids take the
# event loop for a tenth of a second and more (at 2 mm), and health checks wait behind it.
OFF_LOOP_BYTES = 1024 * 1024
T = TypeVar("T")


async def beside_loop(partials: list[Partial], fn: Callable[..., T], *args: Any) -> T:
    """`fn(*args)`, on a worker thread when `partials` carry large arrays."""
    if sum(np.asarray(a).nbytes for p in partials for a in p.stats.values()) > OFF_LOOP_BYTES:
        return await asyncio.to_thread(fn, *args)
    return fn(*args)


def pack_release(partials: list[Partial], head: dict[str, Any]) -> bytes:
    """The release blob: the partials' document and arrays, after `head`'s fields."""
    docs, arrays = partial_docs.partials_to_doc(partials)
    return codec.pack({"partials": docs, **head}, arrays)


@dataclass(frozen=True)
class SiteOutcome:
    """A site's final word on its share: `state` is one of SITE_FINAL; only a "done" share
    carries partials the entry combines (a suppressed one carries the withheld cells)."""

    site: str
    state: SiteState
    detail: str = ""
    n: int = 0
    partials: list[Partial] = field(default_factory=list)
    epsilon: float | None = None
    delta: float | None = None
    mechanism: str | None = None
    # The release as stored ({"partials", "n", "epsilon", "delta", "mechanism"} packed): a peer
    # streams these bytes as they are instead of encoding `partials` again. At the entry, a
    # peer's share as it arrived.
    packed: bytes | None = None

    def one_by_one(self) -> Iterable[Partial]:
        """The partials, each decoded from `packed` only when it is reached: the entry adds
        them to its running sums one at a time (query/combine.py), so one partial's grids
        are dense at once, not the whole share's."""
        if self.partials or self.packed is None:
            return self.partials
        doc, arrays = codec.unpack_lazy(self.packed)
        return partial_docs.iter_partials(doc["partials"], arrays)


def lean(partials: list[Partial], packed: bytes | None) -> list[Partial]:
    """`partials`, or none when they are large and `packed` holds them (one_by_one() again)."""
    if packed is None:
        return partials
    size = sum(np.asarray(a).nbytes for p in partials for a in p.stats.values())
    return [] if size > LEAN_BYTES else partials
