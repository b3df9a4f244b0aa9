"""What one site's share of a job came to: the value the fan-out gathers and a peer sends back."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np

from stimnet import codec
from stimnet.states import SiteState
from stimnetd.query import partial_docs
from stimnetd.query.aggregate import Partial

# Outcomes whose arrays are larger than this keep only their packed (sparse) form until the
# entry combines them (`one_by_one`): a grouped map query's dense arrays are hundreds of MB
# per site, and the entry would otherwise hold every site's at once.
LEAN_BYTES = 4 * 1024 * 1024


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
