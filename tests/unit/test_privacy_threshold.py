"""The noisy threshold: which cells leave the site under DP is decided on noised counts.

The statistical tests run the real OpenDP samplers through add_noise and gate_noised and
compare how often a cell is released, per true count, with the analytic curve derived here
from first principles (discrete Laplace of scale sensitivity / epsilon, threshold k_min - 1
plus the smallest t with α^t / (1 + α) <= δ). Each count is a binomial test; the family's
false-alarm rate is FAMILY_ALPHA (Bonferroni over the counts).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats

from stimnet.query.fields import FieldMeta
from stimnetd.privacy import threshold as th
from stimnetd.privacy.noise import ArrayNoise, NoiseMechanism, NoiseReport, add_noise
from stimnetd.query.aggregate import Partial

FAMILY_ALPHA = 1e-3
FIELDS = {"age": FieldMeta("age", "s", "numeric", bounds=(0.0, 100.0))}


def expected_threshold(k_min: int, scale: float, delta: float) -> int:
    """From the definition, by search: the least T with P(k_min - 1 + X >= T) <= δ."""
    alpha = math.exp(-1 / scale)
    t = 1
    while alpha**t / (1 + alpha) > delta:
        t += 1
    return k_min - 1 + t


def expected_release(count: int, t: int, scale: float) -> float:
    """P(count + X >= t), X discrete Laplace, by summing the pmf (not the closed form)."""
    alpha = math.exp(-1 / scale)
    xs = np.arange(t - count, abs(t - count) + 4000)
    return float(((1 - alpha) / (1 + alpha) * alpha ** np.abs(xs)).sum())


def histogram(counts: np.ndarray) -> Partial:
    edges = list(range(len(counts) - 1))
    return Partial("hist(age)", "histogram", (), int(counts.sum()),
                   {"counts": counts.astype(np.float64)}, {"field": "age", "edges": edges})


def released_fraction(k_min: int, epsilon: float, delta: float, true_counts: list[int],
                      reps: int, rounds: int) -> np.ndarray:
    """Per true count, the fraction of cells (reps x rounds of them) released."""
    mech = NoiseMechanism()
    cells = np.repeat(np.asarray(true_counts), reps)
    released = np.zeros(len(true_counts))
    for _ in range(rounds):
        noised, report = add_noise([histogram(cells)], FIELDS, epsilon, mech)
        (gated,), _ = th.gate_noised(noised, report, k_min, delta)
        shown = ~np.asarray(gated.cell_mask if gated.cell_mask is not None
                            else np.zeros(cells.size, dtype=bool))
        released += shown.reshape(len(true_counts), reps).sum(axis=1)
    return released / (reps * rounds)


def curve_p_value(observed: np.ndarray, trials: int, true_counts: list[int], t: int,
                  scale: float) -> float:
    """The smallest Bonferroni-adjusted binomial p-value over the counts."""
    worst = 1.0
    for frac, c in zip(observed, true_counts, strict=True):
        p = min(max(expected_release(c, t, scale), 1e-300), 1 - 1e-16)
        k = round(frac * trials)
        worst = min(worst, stats.binomtest(k, trials, p).pvalue * len(true_counts))
    return worst


K, EPS, DELTA = 5, 0.5, 1e-3
SCALE = 1 / EPS  # a histogram releases one array, of sensitivity 1: it gets all of epsilon
COUNTS = list(range(K - 1, 32))
REPS, ROUNDS = 200, 5


def test_threshold_is_the_least_that_bounds_a_small_cell_by_delta() -> None:
    for k, b, d in [(5, 2.0, 1e-3), (5, 3.0, 1e-6), (1, 0.5, 1e-9), (10, 40.0, 1e-5)]:
        t = th.threshold(k, b, d)
        assert t == expected_threshold(k, b, d)
        assert th.release_probability(k - 1, t, b) <= d < th.release_probability(k - 1, t - 1, b)


def test_release_probability_is_the_summed_pmf() -> None:
    for c in (0, 4, 10, 17, 30):
        assert th.release_probability(c, 17, 2.0) == pytest.approx(
            expected_release(c, 17, 2.0), rel=1e-9)


def test_release_probability_follows_the_analytic_curve() -> None:
    """The real samplers, the real gate: observed release rates match the curve."""
    observed = released_fraction(K, EPS, DELTA, COUNTS, REPS, ROUNDS)
    t = expected_threshold(K, SCALE, DELTA)
    assert curve_p_value(observed, REPS * ROUNDS, COUNTS, t, SCALE) > FAMILY_ALPHA
    # The curve does what k_min promises: below k_min almost never, well above it always.
    assert observed[0] <= 0.01 and observed[-1] >= 0.99


@pytest.mark.parametrize("wrong", [
    pytest.param(lambda k, b, d: th_threshold(k, b, d) - 1, id="one-below"),
    pytest.param(lambda k, b, d: th_threshold(k, b / 2, d), id="half-the-scale"),
    pytest.param(lambda k, b, d: k, id="no-margin"),
])
def test_a_mis_calibrated_threshold_fails_the_same_test(monkeypatch, wrong) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setattr(th, "threshold", wrong)
    observed = released_fraction(K, EPS, DELTA, COUNTS, REPS, ROUNDS)
    t = expected_threshold(K, SCALE, DELTA)
    assert curve_p_value(observed, REPS * ROUNDS, COUNTS, t, SCALE) < FAMILY_ALPHA


th_threshold = th.threshold


def partial(kind: str, size: int, **stats: np.ndarray) -> Partial:
    return Partial(kind, kind, (), size, dict(stats), {})


def test_a_partial_without_cells_is_gated_on_its_noised_subject_count() -> None:
    t = th.threshold(5, 2.0, 1e-6)
    report = NoiseReport(1.0, (ArrayNoise("count", (), "n", "discrete laplace", 1, 0.5, 2.0),))
    above = partial("count", t, n=np.array([float(t)]))
    below = partial("count", t - 1, n=np.array([float(t - 1)]))
    (a,), (da,) = th.gate_noised([above], report, 5, 1e-6)
    (b,), (db,) = th.gate_noised([below], report, 5, 1e-6)
    assert (da.action, a.n) == ("released", t)
    assert (db.action, b.n, b.stats["n"].tolist()) == ("suppressed", 0, [0.0])
    assert "noised count below k_min = 5" in db.reason


def test_a_partial_whose_gate_was_not_noised_is_withheld() -> None:
    (out,), (d,) = th.gate_noised([partial("count", 1000, n=np.array([1000.0]))],
                                  NoiseReport(0.0, ()), 5, 1e-6)
    assert d.action == "suppressed" and out.n == 0


def test_withheld_cells_are_zero_in_every_array_and_n_is_the_released_sum() -> None:
    t = th.threshold(5, 1.0, 1e-6)
    count = np.array([t + 3.0, t - 1.0, 0.0, t])
    p = Partial("m", "voxel_map", (), 100, {"count": count, "sum": count * 2},
                {"column": "vta", "weight": "age"})
    report = NoiseReport(1.0, (ArrayNoise("m", (), "count", "discrete laplace", 1, 1, 1.0),
                               ArrayNoise("m", (), "<n>", "discrete laplace", 1, 1, 1.0)))
    (out,), (d,) = th.gate_noised([p], report, 5, 1e-6)
    assert d.action == "partially_suppressed"
    assert out.cell_mask.tolist() == [False, True, True, False]
    assert out.stats["sum"].tolist() == [2 * (t + 3), 0, 0, 2 * t]
