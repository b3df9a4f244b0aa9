"""What one site's share of a job came to: the value the fan-out gathers and a peer sends back."""

from __future__ import annotations

from dataclasses import dataclass, field

from stimnet.states import SiteState
from stimnetd.query.aggregate import Partial


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
    # streams these bytes as they are instead of encoding `partials` again.
    packed: bytes | None = None
