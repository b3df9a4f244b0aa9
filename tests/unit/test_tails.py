"""k_min on a bisection's counts: a tail of fewer than k_min subjects, on either side of
the threshold, is withheld and shown only as which side it is."""

from __future__ import annotations

import numpy as np

from stimnetd.privacy.tails import withhold_tails
from stimnetd.query.aggregate import Partial, layout_problem


def test_small_tails_on_either_side_are_withheld_and_large_counts_released() -> None:
    p = Partial("q", "threshold_counts", (), 100,
                {"le": np.array([0.0, 4.0, 5.0, 50.0, 95.0, 96.0, 100.0]), "side": np.zeros(7)},
                {"func": "quantiles_bisect", "terms": [f"t{i}" for i in range(7)],
                 "lo": 0.0, "hi": 1.0})
    q = withhold_tails(p, 5)
    assert q.stats["side"].tolist() == [-1, -1, 0, 0, 0, 1, 1]
    assert q.stats["le"].tolist() == [0, 0, 5, 50, 95, 0, 0]
    assert q.meta["k_min"] == 5 and layout_problem(q) is None
