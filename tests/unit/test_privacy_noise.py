"""The site's epsilon decision and the DP release: sensitivities, budget split, samplers."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import opendp.prelude as dp
import pytest
from scipy import stats

from stimnet import errors
from stimnet.query.fields import FieldMeta
from stimnetd.privacy.noise import (
    COHORT_N,
    NoiseMechanism,
    NoiseReport,
    add_noise,
    sensitivities,
)
from stimnetd.privacy.policy import PrivacyPolicy, PrivacyRefusal, decide_epsilon
from stimnetd.privacy.release import Refusal
from stimnetd.privacy.suppress import suppress_small_cells
from stimnetd.query.aggregate import Partial

FIELDS = {
    "age": FieldMeta("age", "subjects", "numeric", bounds=(18.0, 90.0)),
    "updrs_change": FieldMeta("updrs_change", "outcomes", "numeric", bounds=(-60.0, 20.0)),
    "vta": FieldMeta("vta", "images", "image", max_voxels=500),
    "unbounded": FieldMeta("unbounded", "outcomes", "numeric"),
    "image_without_cap": FieldMeta("image_without_cap", "images", "image"),
}


class ShiftNoise:
    """A deterministic stand-in: adds `offset` × scale to every element and records calls."""

    def __init__(self, offset: float = 1.0) -> None:
        self.offset = offset
        self.calls: list[tuple[str, float, int]] = []

    def laplace(self, values: np.ndarray, scale: float) -> np.ndarray:
        self.calls.append(("laplace", scale, values.size))
        return np.asarray(values, dtype=np.float64) + self.offset * scale

    def discrete_laplace(self, values: np.ndarray, scale: float) -> np.ndarray:
        self.calls.append(("discrete laplace", scale, values.size))
        return np.rint(values).astype(np.int64) + round(self.offset * scale)


class MisScaled:
    """The real samplers at the wrong scale: the statistical tests must catch this."""

    def __init__(self, factor: float) -> None:
        self.inner = NoiseMechanism()
        self.factor = factor

    def laplace(self, values: np.ndarray, scale: float) -> np.ndarray:
        return self.inner.laplace(values, scale * self.factor)

    def discrete_laplace(self, values: np.ndarray, scale: float) -> np.ndarray:
        return self.inner.discrete_laplace(values, scale * self.factor)


def moments(n: int = 40, field: str = "updrs_change") -> Partial:
    return Partial(f"avg({field})", "moments", (), n,
                   {"n": np.array([float(n)]), "s1": np.array([-400.0]),
                    "s2": np.array([9000.0])}, {"field": field})


def crossprod() -> Partial:
    m = np.array([[40.0, 2000.0, -400.0], [2000.0, 110000.0, -21000.0],
                  [-400.0, -21000.0, 9000.0]])
    return Partial("corr(age,updrs_change)", "crossprod", (), 40, {"m": m},
                   {"fields": ["age", "updrs_change"], "purpose": "corr"})


def voxel_map(column: str = "vta") -> Partial:
    count = np.array([[12.0, 0.0], [7.0, 30.0]])
    return Partial("mean_map(vta,updrs_change)", "voxel_map", (), 40,
                   {"count": count, "sum": count * -10.0},
                   {"column": column, "weight": "updrs_change", "shape": (2, 2)})


def roi_overlap() -> Partial:
    return Partial("roi_overlap(vta)", "roi_overlap", (), 40,
                   {"n": np.array([25.0, 30.0, 9.0]), "s1": np.array([900.0, 800.0, 50.0]),
                    "s2": np.array([4e4, 3e4, 500.0])},
                   {"column": "vta", "rois": ["a", "b", "c"]})


def counts_partial(kind: str) -> Partial:
    counts = np.array([[6.0, 9.0], [12.0, 5.0]]) if kind == "contingency" else np.arange(5, 10.0)
    return Partial(f"{kind}(age)", kind, (), int(counts.sum()), {"counts": counts})


# -- decide_epsilon ---------------------------------------------------------------------


def test_dp_off_without_request_adds_no_noise() -> None:
    """A dp=off site answers a request without epsilon with no noise."""
    assert decide_epsilon(PrivacyPolicy(dp="off"), None) is None


def test_dp_off_refuses_a_requested_epsilon() -> None:
    """A dp=off site refuses a requested epsilon instead of silently releasing exact values."""
    with pytest.raises(PrivacyRefusal, match="dp=off") as e:
        decide_epsilon(PrivacyPolicy(dp="off"), 1.0)
    assert e.value.policy == "dp"


def test_dp_optional_adds_noise_only_when_asked() -> None:
    """A dp=optional site uses the requested epsilon, and none when none is requested."""
    policy = PrivacyPolicy(dp="optional")
    assert decide_epsilon(policy, None) is None
    assert decide_epsilon(policy, 2.5) == 2.5


def test_dp_required_uses_the_request_or_the_site_default() -> None:
    """A dp=required site uses the requested epsilon, or its default when none is asked."""
    policy = PrivacyPolicy(dp="required", default_epsilon=0.7)
    assert decide_epsilon(policy, None) == 0.7
    assert decide_epsilon(policy, 3.0) == 3.0


@pytest.mark.parametrize("requested", [0.0, -1.0, math.nan, True])
def test_non_positive_or_non_numeric_epsilon_is_refused(requested: float) -> None:
    """An epsilon that is not a number above 0 is refused under the dp rule."""
    with pytest.raises(PrivacyRefusal, match="greater than 0|must be a number") as e:
        decide_epsilon(PrivacyPolicy(dp="required"), requested)
    assert e.value.policy == "dp"


@pytest.mark.parametrize("requested", [5.0001, math.inf])
def test_epsilon_above_the_site_maximum_is_refused_naming_the_maximum(requested: float) -> None:
    """An epsilon above max_epsilon_per_query is refused with the site's maximum stated."""
    with pytest.raises(PrivacyRefusal, match=r"max_epsilon_per_query = 5\b"):
        decide_epsilon(PrivacyPolicy(dp="optional", max_epsilon_per_query=5.0), requested)
    assert decide_epsilon(PrivacyPolicy(dp="optional", max_epsilon_per_query=5.0), 5.0) == 5.0


def test_policy_rejects_a_default_epsilon_above_its_maximum() -> None:
    """A policy whose default epsilon exceeds its per-query maximum cannot be built."""
    with pytest.raises(ValueError, match="default_epsilon"):
        PrivacyPolicy(dp="required", default_epsilon=6.0, max_epsilon_per_query=5.0)


def test_budget_exhausted_is_a_budget_refusal_with_its_own_status() -> None:
    """The budget rule's refusal raises errors.BudgetExhausted, naming the budget rule and
    mapping to RESOURCE_EXHAUSTED; the other rules' refusals are FAILED_PRECONDITION."""
    e = Refusal("budget", "epsilon budget of 10 for this catalog is spent").error()
    assert type(e) is errors.BudgetExhausted
    assert (e.policy, e.code, str(e)) == (
        "budget", "RESOURCE_EXHAUSTED", "epsilon budget of 10 for this catalog is spent")
    assert PrivacyRefusal("k_min", "x").code == "FAILED_PRECONDITION"
    overlap = Refusal("overlap", "x").error()
    assert (type(overlap), overlap.policy, overlap.code) == (  # type: ignore[attr-defined]
        PrivacyRefusal, "overlap", "FAILED_PRECONDITION")


# -- sensitivities ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("partial", "expected"),
    [
        (Partial("count", "count", (), 40, {"n": np.array([40.0])}), {"n": 1.0}),
        (moments(), {"n": 1.0, "s1": 60.0, "s2": 3600.0}),
        (counts_partial("histogram"), {"counts": 1.0}),
        (counts_partial("quantiles"), {"counts": 1.0}),
        (counts_partial("contingency"), {"counts": 1.0}),
        # z = [1, age ≤ 90, |updrs| ≤ 60]: 1 + 90 + 60 + 90² + 90·60 + 60²
        (crossprod(), {"m": 1 + 90 + 60 + 8100 + 5400 + 3600, COHORT_N: 1}),
        (voxel_map(), {"count": 500.0, "sum": 500.0 * 60.0, COHORT_N: 1.0}),
        (roi_overlap(), {"n": 3.0, "s1": 1500.0, "s2": 3 * 500.0**2, COHORT_N: 1.0}),
    ],
    ids=lambda v: v.kind if isinstance(v, Partial) else "",
)
def test_sensitivity_table(partial: Partial, expected: dict[str, float]) -> None:
    """Each kind's L1 sensitivities follow the documented table, from declared bounds only."""
    assert sensitivities(partial, FIELDS) == pytest.approx(expected)


def test_sensitivity_ignores_the_data() -> None:
    """Sensitivities depend on declared bounds, not on the values in the partial."""
    small, large = moments(), moments()
    large.stats["s1"][:] = 1e9
    assert sensitivities(small, FIELDS) == sensitivities(large, FIELDS)


@pytest.mark.parametrize(
    ("partial", "match"),
    [
        (moments(field="unbounded"), "field 'unbounded' has no declared clamping bounds"),
        (moments(field="not_in_catalog"), "field 'not_in_catalog' has no declared clamping"),
        (voxel_map(column="image_without_cap"), "no declared max_voxels"),
        (Partial("avg(x)", "moments", (), 40, {"n": np.array([40.0])}), "does not name its field"),
    ],
)
def test_missing_bound_is_refused_before_any_noise(partial: Partial, match: str) -> None:
    """A partial whose sensitivity needs an undeclared bound is refused, and nothing is sampled."""
    noise = ShiftNoise()
    with pytest.raises(PrivacyRefusal, match=match) as e:
        add_noise([counts_partial("histogram"), partial], FIELDS, 1.0, noise)
    assert e.value.policy == "dp"
    assert noise.calls == []


# -- add_noise --------------------------------------------------------------------------


def test_stats_array_without_a_sensitivity_is_refused() -> None:
    """A partial carrying an array the sensitivity table does not cover raises instead of
    releasing that array exact."""
    p = moments()
    p.stats["s3"] = np.array([1e6])
    noise = ShiftNoise()
    with pytest.raises(ValueError, match="s3"):
        add_noise([p], FIELDS, 1.0, noise)
    assert noise.calls == []


@pytest.mark.parametrize("epsilon", [1e-300, 1e-14])
def test_an_epsilon_too_small_for_the_samplers_is_refused_before_any_noise(
        epsilon: float) -> None:
    """With epsilon 1e-300 OpenDP's integer sampler saturated at the int64 range: counts
    of 9223372036854775808 were released and summed. Refused instead, naming the scale."""
    noise = ShiftNoise()
    with pytest.raises(PrivacyRefusal, match=r"epsilon 1e-\d+ is too small for this query: "
                                             r"its noisiest array would get Laplace scale") as e:
        add_noise([moments(), voxel_map()], FIELDS, epsilon, noise)
    assert e.value.policy == "dp" and noise.calls == []
    _, report = add_noise([moments(), voxel_map()], FIELDS, 1e-6, noise)  # still allowed
    assert max(a.scale for a in report.arrays) <= 2**52


def test_epsilon_is_split_evenly_over_every_released_array() -> None:
    """Each released array gets epsilon / (number of arrays) and scale = sensitivity / share."""
    partials = [moments(), voxel_map(), counts_partial("histogram")]
    _, report = add_noise(partials, FIELDS, 1.4, ShiftNoise())
    assert len(report.arrays) == 3 + 3 + 1
    assert report.epsilon == pytest.approx(1.4)
    for a in report.arrays:
        assert a.epsilon == pytest.approx(0.2)
        assert a.scale == pytest.approx(a.sensitivity / 0.2)


def test_counts_use_the_discrete_laplace_and_sums_the_float_laplace() -> None:
    """Count arrays are noised as integers (discrete Laplace), sums with the float Laplace."""
    _, report = add_noise([moments(), voxel_map()], FIELDS, 1.0, ShiftNoise())
    kinds = {a.stat: a.mechanism for a in report.arrays}
    assert kinds == {"n": "discrete laplace", "s1": "laplace", "s2": "laplace",
                     "count": "discrete laplace", "sum": "laplace",
                     COHORT_N: "discrete laplace"}


def test_noised_n_replaces_the_true_n() -> None:
    """After noise a partial reports its noised count as n, never the true one."""
    (m, v, h), report = add_noise(
        [moments(n=40), voxel_map(), counts_partial("histogram")], FIELDS, 0.7, ShiftNoise()
    )
    scale = {a.stat: a.scale for a in report.arrays}
    assert m.n == 40 + round(scale["n"]) == round(m.stats["n"][0])
    assert v.n == 40 + round(scale[COHORT_N])
    assert h.n == round(h.stats["counts"].sum()) != 35


def test_noised_n_is_floored_at_zero() -> None:
    """A noised count below zero is reported as n = 0."""
    (out,), _ = add_noise([moments(n=40)], FIELDS, 1.0, ShiftNoise(offset=-100.0))
    assert out.n == 0


def test_withheld_partials_pass_through_and_take_no_epsilon() -> None:
    """A partial suppressed by k_min is released as withheld and gets no share of epsilon."""
    small_group = dataclasses.replace(moments(n=3), group=(("target", "GPi"),))
    suppressed, _ = suppress_small_cells([small_group, moments(n=40)], 5)
    (small, big), report = add_noise(suppressed, FIELDS, 0.9, ShiftNoise())
    assert small is suppressed[0]
    assert [a.epsilon for a in report.arrays] == pytest.approx([0.3, 0.3, 0.3])
    assert report.epsilon_for(small.name, small.group) is None
    assert report.epsilon_for(big.name, big.group) == pytest.approx(0.9)


def test_nothing_to_release_spends_no_epsilon() -> None:
    """When every partial is withheld the report spends nothing and no noise is drawn."""
    suppressed, _ = suppress_small_cells([moments(n=3)], 5)
    noise = ShiftNoise()
    out, report = add_noise(suppressed, FIELDS, 1.0, noise)
    assert out == suppressed and report == NoiseReport(0.0, ())
    assert noise.calls == []


def test_withheld_cells_stay_zero_and_are_not_sampled() -> None:
    """Cells masked by k_min stay exactly 0 after noise and are not passed to the sampler."""
    (p,), _ = suppress_small_cells([voxel_map()], 5)
    noise = ShiftNoise()
    (out,), _ = add_noise([p], FIELDS, 1.0, noise)
    assert out.stats["count"][0, 1] == 0 and out.stats["sum"][0, 1] == 0
    assert np.all(out.stats["count"][~p.cell_mask] != p.stats["count"][~p.cell_mask])
    assert sorted(size for _, _, size in noise.calls) == [1, 3, 3]


def test_crossprod_stays_symmetric_with_only_the_upper_triangle_noised() -> None:
    """The cross-product release is symmetric, and only its 6 upper-triangle entries are noised."""
    noise = ShiftNoise()
    (out,), _ = add_noise([crossprod()], FIELDS, 1.0, noise)
    np.testing.assert_array_equal(out.stats["m"], out.stats["m"].T)
    assert noise.calls[0][2] == 6
    assert out.n == 40 + 2  # its own subject count, noised at scale 1 / (1/2)


def test_epsilon_per_output_sums_its_arrays() -> None:
    """The report gives each output's epsilon as the sum of its arrays' shares."""
    _, report = add_noise([moments(), counts_partial("histogram")], FIELDS, 2.0, ShiftNoise())
    assert report.epsilon_for("avg(updrs_change)", ()) == pytest.approx(1.5)
    assert report.epsilon_for("histogram(age)", ()) == pytest.approx(0.5)
    assert report.epsilon_for("absent", ()) is None


def test_report_fills_each_decision_with_its_epsilon() -> None:
    """Annotating decisions gives released outputs their epsilon and withheld ones None."""
    small_group = dataclasses.replace(moments(n=3), group=(("target", "GPi"),))
    suppressed, decisions = suppress_small_cells([small_group, moments(n=40)], 5)
    _, report = add_noise(suppressed, FIELDS, 0.9, ShiftNoise())
    small, big = report.annotate(decisions)
    assert small.epsilon is None and small.action == "suppressed"
    assert big.epsilon == pytest.approx(0.9) and big.action == "released"


def test_opendp_privacy_map_certifies_every_share() -> None:
    """OpenDP's own privacy map, at each array's sensitivity and scale, gives its share."""
    dp.enable_features("contrib")
    _, report = add_noise([moments(), crossprod(), roi_overlap()], FIELDS, 1.0, ShiftNoise())
    for a in report.arrays:
        if a.mechanism == "laplace":
            space = dp.vector_domain(dp.atom_domain(T=float, nan=False)), dp.l1_distance(T=float)
            d_in: float | int = a.sensitivity
        else:
            space = dp.vector_domain(dp.atom_domain(T="i64")), dp.l1_distance(T="i64")
            d_in = int(a.sensitivity)
        loss = dp.m.make_laplace(*space, scale=a.scale).map(d_in)
        assert loss == pytest.approx(a.epsilon, rel=1e-9)


# -- the real samplers ------------------------------------------------------------------


def test_discrete_laplace_returns_integers_of_the_same_shape() -> None:
    """OpenDP's discrete Laplace returns integer counts in the input's shape."""
    out = NoiseMechanism().discrete_laplace(np.array([[3.0, 4.0], [5.0, 6.0]]), 2.0)
    assert out.shape == (2, 2) and out.dtype == np.int64


def test_discrete_laplace_refuses_fractional_counts() -> None:
    """Counts that are not whole numbers are refused rather than rounded silently."""
    with pytest.raises(ValueError, match="integer-valued"):
        NoiseMechanism().discrete_laplace(np.array([1.5]), 1.0)


def test_laplace_refuses_non_finite_values() -> None:
    """A NaN or infinite sum is refused rather than passed to the sampler."""
    with pytest.raises(ValueError, match="non-finite"):
        NoiseMechanism().laplace(np.array([1.0, math.nan]), 1.0)


# Statistical acceptance tests. OpenDP draws from the OS's randomness and cannot be
# seeded, so each test has a stated false-alarm rate. KS at ALPHA: a 1.5× mis-scale moves
# the Laplace CDF by up to ~0.074, against a critical distance of ~0.044 at RUNS samples, so
# a miss is far rarer than ALPHA. The count's chi-square test uses ALPHA_COUNTS: its power
# against a 1.5× mis-scale is overwhelming (p-values around 1e-30 and below), so a much
# smaller false-alarm rate costs nothing and keeps the suite quiet in CI.
ALPHA = 1e-3
ALPHA_COUNTS = 1e-6
RUNS = 2000
EPSILON = 1.0


def released(mechanism: object) -> tuple[np.ndarray, np.ndarray, NoiseReport]:
    """RUNS independent releases of one fixed moments query: (noised n, noised s1, report)."""
    p = moments(n=40)
    ns, s1s = np.empty(RUNS), np.empty(RUNS)
    report = None
    for i in range(RUNS):
        (out,), report = add_noise([p], FIELDS, EPSILON, mechanism)  # type: ignore[arg-type]
        ns[i], s1s[i] = out.stats["n"][0], out.stats["s1"][0]
    assert report is not None
    return ns, s1s, report


@pytest.fixture(scope="module")
def true_mechanism_releases() -> tuple[np.ndarray, np.ndarray, NoiseReport]:
    return released(NoiseMechanism())


def ks_pvalue(samples: np.ndarray, loc: float, scale: float) -> float:
    return float(stats.kstest(samples, stats.laplace(loc=loc, scale=scale).cdf).pvalue)


def discrete_laplace_pvalue(samples: np.ndarray, loc: int, scale: float) -> float:
    """Chi-square goodness of fit of integer samples to the discrete Laplace(loc, scale)."""
    alpha = math.exp(-1.0 / scale)
    width = math.ceil(3 * scale)
    ks = np.arange(-width, width + 1)
    pmf = (1 - alpha) / (1 + alpha) * alpha ** np.abs(ks)
    expected = np.append(pmf, 1 - pmf.sum()) * samples.size
    offsets = np.rint(samples).astype(np.int64) - loc
    inside = np.abs(offsets) <= width
    observed = np.append(np.bincount(offsets[inside] + width, minlength=ks.size), (~inside).sum())
    return float(stats.chisquare(observed, expected).pvalue)


def test_released_sums_follow_the_configured_laplace(true_mechanism_releases) -> None:  # type: ignore[no-untyped-def]
    """Over many releases the noised sum is Laplace(true sum, sensitivity / epsilon share)
    (KS test, false-alarm rate 0.001)."""
    _, s1s, report = true_mechanism_releases
    (s1,) = [a for a in report.arrays if a.stat == "s1"]
    assert s1.scale == pytest.approx(60.0 / (EPSILON / 3))
    assert ks_pvalue(s1s, -400.0, s1.scale) > ALPHA


def test_released_counts_follow_the_configured_discrete_laplace(true_mechanism_releases) -> None:  # type: ignore[no-untyped-def]
    """Over many releases the noised count is discrete Laplace(true n, 1 / epsilon share)
    (chi-square test, false-alarm rate 1e-6)."""
    ns, _, report = true_mechanism_releases
    (n,) = [a for a in report.arrays if a.stat == "n"]
    assert n.scale == pytest.approx(3.0)
    assert discrete_laplace_pvalue(ns, 40, n.scale) > ALPHA_COUNTS


@pytest.mark.parametrize("factor", [1.5, 1 / 1.5])
def test_mis_scaled_noise_is_detected(factor: float) -> None:
    """A mechanism drawing at 1.5× or 1/1.5× the configured scale fails both the sum's KS test
    and the count's chi-square test."""
    ns, s1s, report = released(MisScaled(factor))
    scale = {a.stat: a.scale for a in report.arrays}
    assert ks_pvalue(s1s, -400.0, scale["s1"]) < ALPHA
    assert discrete_laplace_pvalue(ns, 40, scale["n"]) < ALPHA_COUNTS


def test_an_average_releases_a_sum_and_a_count_only() -> None:
    """avg needs n and s1: s2 is not released (zeros) and takes no share of epsilon."""
    p = dataclasses.replace(moments(), meta={"field": "updrs_change", "func": "mean"})
    (out,), report = add_noise([p], FIELDS, 1.0, ShiftNoise())
    assert sorted(a.stat for a in report.arrays) == ["n", "s1"]
    assert [a.epsilon for a in report.arrays] == [0.5, 0.5]
    assert out.stats["s2"].tolist() == [0.0]


def test_groups_of_a_query_share_by_parallel_composition() -> None:
    """Three disjoint groups of one count each get the whole epsilon; the charge is 1."""
    groups = [dataclasses.replace(moments(), kind="count", name="count(*)",
                                  group=(("diagnosis", d),), stats={"n": np.array([40.0])},
                                  meta={}) for d in ("PD", "ET", "dystonia")]
    _, even = add_noise(groups, FIELDS, 1.0, ShiftNoise())
    _, parallel = add_noise(groups, FIELDS, 1.0, ShiftNoise(), partitioned=True)
    assert [a.epsilon for a in even.arrays] == pytest.approx([1 / 3] * 3)
    assert [a.epsilon for a in parallel.arrays] == [1.0] * 3
    assert (even.epsilon, parallel.epsilon) == (pytest.approx(1.0), 1.0)
