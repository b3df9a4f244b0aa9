"""k_min for the counts of a quantile bisection (threshold_counts partials).

A count of x <= t below k_min is withheld and shown only as "< k_min", as any small count
is; so is a count whose complement n - count is below k_min (n is released, so the
count would give the complement away), shown as "> n - k_min". The entry then knows
each withheld count only to within k_min - 1, and says how much that leaves open.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from stimnetd.query.aggregate import Partial


def withhold_tails(p: Partial, k_min: int) -> Partial:
    """`p` with every count in a tail of fewer than `k_min` subjects withheld."""
    if p.kind != "threshold_counts":
        return p
    le = np.asarray(p.stats["le"], dtype=np.float64)
    low = le < k_min
    high = ~low & (p.n - le < k_min)
    side = np.where(low, -1.0, np.where(high, 1.0, 0.0))
    return dataclasses.replace(p, stats={"le": np.where(low | high, 0.0, le), "side": side},
                               meta={**p.meta, "k_min": int(k_min)})
