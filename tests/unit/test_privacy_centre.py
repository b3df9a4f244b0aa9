"""Centred release (privacy/centre.py): exact rebuild, true sensitivities, same ε charged."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import opendp.prelude as dp
import pytest
from scipy import stats

from stimnet.query.fields import FieldMeta
from stimnetd.privacy.centre import centring
from stimnetd.privacy.noise import NoiseMechanism, add_noise
from stimnetd.query.aggregate import Partial

FIELDS = {
    "age": FieldMeta("age", "subjects", "numeric", bounds=(18.0, 90.0)),
    "updrs": FieldMeta("updrs", "outcomes", "numeric", bounds=(-60.0, 20.0)),
    "flat": FieldMeta("flat", "outcomes", "numeric", bounds=(3.0, 3.0)),
}
RNG = np.random.default_rng(20)


class Zero:
    """No noise at all: what is released is then exactly the rebuild of the centred sums."""

    def laplace(self, values: np.ndarray, scale: float) -> np.ndarray:
        return np.asarray(values, dtype=np.float64).copy()

    def discrete_laplace(self, values: np.ndarray, scale: float) -> np.ndarray:
        return np.rint(values).astype(np.int64)


class Recorder(Zero):
    """Zero noise that keeps every array handed to a sampler, in call order."""

    def __init__(self) -> None:
        self.seen: list[np.ndarray] = []

    def laplace(self, values: np.ndarray, scale: float) -> np.ndarray:
        self.seen.append(np.asarray(values, dtype=np.float64).copy())
        return super().laplace(values, scale)

    def discrete_laplace(self, values: np.ndarray, scale: float) -> np.ndarray:
        self.seen.append(np.asarray(values, dtype=np.float64).copy())
        return super().discrete_laplace(values, scale)


def moments_of(x: np.ndarray, func: str, field: str = "age") -> Partial:
    return Partial(f"{func}({field})", "moments", (), x.size,
                   {"n": np.array([float(x.size)]), "s1": np.array([x.sum()]),
                    "s2": np.array([(x * x).sum()])}, {"func": func, "field": field})


def crossprod_of(z: np.ndarray) -> Partial:
    zz = np.column_stack([np.ones(len(z)), z])
    return Partial("regress(updrs,age)", "crossprod", (), len(z), {"m": zz.T @ zz},
                   {"fields": ["age", "updrs"], "purpose": "regression", "func": "regression"})


def ages(n: int) -> np.ndarray:
    return RNG.uniform(18, 90, n)


def sample_z(n: int) -> np.ndarray:
    return np.column_stack([RNG.uniform(18, 90, n), RNG.uniform(-60, 20, n)])


@pytest.mark.parametrize("func", ["mean", "var", "sd"])
def test_without_noise_the_rebuild_gives_back_the_exact_moments(func: str) -> None:
    """Centring then rebuilding is exact algebra: zero noise releases the true sums."""
    p = moments_of(ages(57), func)
    (out,), _ = add_noise([p], FIELDS, 1.0, Zero())
    assert out.stats["n"][0] == p.stats["n"][0]
    assert out.stats["s1"][0] == pytest.approx(p.stats["s1"][0], rel=1e-12)
    if func == "mean":
        assert out.stats["s2"][0] == 0.0  # not released
    else:
        assert out.stats["s2"][0] == pytest.approx(p.stats["s2"][0], rel=1e-12)


def test_without_noise_the_rebuild_gives_back_the_exact_cross_products() -> None:
    p = crossprod_of(sample_z(40))
    (out,), _ = add_noise([p], FIELDS, 1.0, Zero())
    np.testing.assert_allclose(out.stats["m"], p.stats["m"], rtol=1e-12, atol=1e-8)
    np.testing.assert_array_equal(out.stats["m"], out.stats["m"].T)


def test_sum_and_fields_without_a_range_stay_uncentred() -> None:
    """A sum's rebuild would add c times the count's noise, and a degenerate range has
    nothing to gain: both keep the plain release and its sensitivities."""
    assert centring(moments_of(ages(5), "sum"), FIELDS) is None
    assert centring(moments_of(np.full(5, 3.0), "mean", field="flat"), FIELDS) is None
    _, report = add_noise([moments_of(ages(5), "sum")], FIELDS, 1.0, Zero())
    assert {a.stat: a.sensitivity for a in report.arrays} == {"n": 1.0, "s1": 90.0}


@pytest.mark.parametrize("case", ["var", "regression"])
def test_one_subject_moves_each_centred_array_by_at_most_its_sensitivity(case: str) -> None:
    """Neighbouring cohorts (one subject added, at the bounds' corners or anywhere inside):
    every array handed to the sampler moves, in L1, by at most the sensitivity the report
    states, which is also the one OpenDP's privacy map turns into the array's share."""
    corners = [(18.0, -60.0), (90.0, 20.0), (18.0, 20.0), (90.0, -60.0), (54.0, -20.0)]
    extra = corners + [tuple(v) for v in sample_z(30)]
    for _ in range(5):
        base = sample_z(int(RNG.integers(5, 60)))
        for new in extra:
            bigger = np.vstack([base, np.asarray(new)[None, :]])
            if case == "var":
                pair = [moments_of(base[:, 0], "var"), moments_of(bigger[:, 0], "var")]
            else:
                pair = [crossprod_of(base), crossprod_of(bigger)]
            seen, report = [], None
            for p in pair:
                rec = Recorder()
                _, report = add_noise([p], FIELDS, 1.0, rec)
                seen.append(rec.seen)
            assert report is not None
            for a, before, after in zip(report.arrays, seen[0], seen[1], strict=True):
                moved = float(np.abs(after - before).sum())
                assert moved <= a.sensitivity * (1 + 1e-9) + 1e-9, (a.stat, new, moved)


def test_centred_sensitivities_are_the_half_widths() -> None:
    """age in [18, 90]: c = 54, h = 36; s1 at h, s2 at h²/2; n at 1 (not the uncentred
    90 and 8100)."""
    _, report = add_noise([moments_of(ages(30), "var")], FIELDS, 1.0, Zero())
    assert {a.stat: a.sensitivity for a in report.arrays} == {"n": 1.0, "s1": 36.0,
                                                            "s2": 648.0}
    _, report = add_noise([crossprod_of(sample_z(30))], FIELDS, 1.0, Zero())
    m = next(a for a in report.arrays if a.stat == "m")
    assert m.sensitivity == pytest.approx(1 + 36 + 40 + 36 * 36 + 36 * 40 + 40 * 40)


@pytest.mark.parametrize("partitioned", [False, True])
def test_charged_epsilon_is_the_sum_of_the_shares_and_what_was_asked(partitioned: bool) -> None:
    """What the ledger is charged (report.epsilon, site/local.py) is the requested ε, and
    (without groups) the sum of every array's share, with centred outputs among plain ones;
    each share is what OpenDP's privacy map gives at the array's scale and sensitivity."""
    dp.enable_features("contrib")
    partials = [moments_of(ages(40), "mean"), moments_of(ages(40), "var", field="age"),
                crossprod_of(sample_z(40)), moments_of(ages(40), "sum"),
                Partial("count(*)", "count", (), 40, {"n": np.array([40.0])}, {"func": "count"})]
    partials[1] = dataclasses.replace(partials[1], name="variance(age)")
    _, report = add_noise(partials, FIELDS, 1.7, Zero(), partitioned=partitioned)
    assert report.epsilon == pytest.approx(1.7, rel=1e-12)
    assert math.fsum(a.epsilon for a in report.arrays) == pytest.approx(1.7, rel=1e-12)
    for a in report.arrays:
        if a.mechanism == "laplace":
            space = dp.vector_domain(dp.atom_domain(T=float, nan=False)), dp.l1_distance(T=float)
            d_in: float | int = a.sensitivity
        else:
            space = dp.vector_domain(dp.atom_domain(T="i64")), dp.l1_distance(T="i64")
            d_in = int(a.sensitivity)
        assert dp.m.make_laplace(*space, scale=a.scale).map(d_in) == pytest.approx(a.epsilon)


def test_a_released_mean_carries_laplace_noise_at_the_centred_scale() -> None:
    """Over 2000 releases with OpenDP's samplers, s1 − c·n̂ − Σ(x − c) is Laplace of scale
    h / share (KS test, false-alarm rate 0.001), and not of the uncentred scale B / share."""
    x = ages(50)
    p = moments_of(x, "mean")
    mech = NoiseMechanism()
    errs = []
    scale = 0.0
    for _ in range(2000):
        (out,), report = add_noise([p], FIELDS, 1.0, mech)
        errs.append(out.stats["s1"][0] - 54.0 * out.stats["n"][0] - (x - 54.0).sum())
        scale = next(a.scale for a in report.arrays if a.stat == "s1")
    assert scale == pytest.approx(36.0 / 0.5)
    assert stats.kstest(errs, stats.laplace(scale=scale).cdf).pvalue > 1e-3
    assert stats.kstest(errs, stats.laplace(scale=90.0 / 0.5).cdf).pvalue < 1e-3
