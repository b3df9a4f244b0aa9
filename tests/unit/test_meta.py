"""Study-level meta-analysis == statsmodels' combine_effects (fixed effect, DerSimonian-
Laird, heterogeneity, forest-plot rows, leave-one-site-out); REML, which combine_effects
does not offer, == the maximum of the restricted likelihood and metafor's published fit."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import optimize, stats
from statsmodels.stats.meta_analysis import combine_effects

from stimnetd.query.meta import Pooled, meta_analysis, pool, tau2_reml


@st.composite
def studies(draw, min_k: int = 2):
    """k sites' estimates and standard errors, with or without between-site spread."""
    k = draw(st.integers(min_k, 8))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    se = rng.uniform(0.05, 1.0, k)
    spread = draw(st.sampled_from([0.0, 0.1, 0.5, 2.0]))
    y = rng.normal(rng.uniform(-2, 2), 1.0, 1) + rng.normal(0, spread, k) + rng.normal(0, se)
    return [f"site{i}" for i in range(k)], y, se


def reference(y: np.ndarray, se: np.ndarray, sites: list[str] | None = None) -> dict:
    """What combine_effects(method_re="dl") reports. When its τ² is negative the
    random-effects values it derives (square roots of negative variances) are NaN, so
    numpy's warnings about them are silenced; the comparisons use its fixed effect then."""
    with np.errstate(invalid="ignore", divide="ignore"):
        res = combine_effects(y, se**2, method_re="dl", row_names=sites)
        ci = res.conf_int()
        return {"fe": (res.mean_effect_fe, res.sd_eff_w_fe, *ci[0], 0.0),
                "re": (res.mean_effect_re, res.sd_eff_w_re, *ci[1], res.tau2), "tau2": res.tau2,
                "q": res.q, "k": res.k, "p": res.test_homogeneity().pvalue, "i2": res.i2,
                "frame": res.summary_frame()}


def assert_pooled_equals(ours: Pooled, ref: dict, random: bool) -> None:
    """Our random effects are combine_effects' unless its τ² is negative (it does not
    truncate τ² at 0, so its random fit then differs from its fixed one)."""
    want = ref["re"] if random and ref["tau2"] > 0 else ref["fe"]
    got = (ours.estimate, ours.std_error, ours.ci_low, ours.ci_high, ours.tau2)
    assert got == pytest.approx(want, rel=1e-9, abs=1e-12)
    z = want[0] / want[1]
    assert (ours.z, ours.p_value) == pytest.approx((z, 2 * stats.norm.sf(abs(z))), rel=1e-9, abs=1e-300)


def assert_heterogeneity_equals(het, ref: dict) -> None:
    assert het.df == ref["k"] - 1
    assert het.q == pytest.approx(ref["q"], rel=1e-9, abs=1e-12)
    assert het.p_value == pytest.approx(ref["p"], rel=1e-9, abs=1e-300)
    assert het.i2 == pytest.approx(max(0.0, ref["i2"]), rel=1e-9, abs=1e-12)


@settings(max_examples=60, deadline=None)
@given(case=studies())
def test_fixed_and_dl_equal_combine_effects(case):
    """Fixed-effect and DerSimonian-Laird pooled estimates, standard errors, intervals,
    τ², Q with its p and I² equal combine_effects(method_re="dl")."""
    sites, y, se = case
    m = meta_analysis(sites, y, se)
    res = reference(y, se)
    assert_pooled_equals(m.fixed, res, random=False)
    assert_pooled_equals(m.dl, res, random=True)
    assert_heterogeneity_equals(m.heterogeneity, res)
    assert m.dl.i2 == pytest.approx(m.heterogeneity.i2, rel=1e-9, abs=1e-12)


@settings(max_examples=40, deadline=None)
@given(case=studies())
def test_forest_rows_equal_combine_effects_summary_frame(case):
    """Each site's row has its estimate, 95% interval and shares of the fixed and DL
    weights as in combine_effects' summary frame; every method's shares sum to one."""
    sites, y, se = case
    m = meta_analysis(sites, y, se)
    res = reference(y, se, sites)
    frame = res["frame"].loc[sites]
    rows = np.array([(r.estimate, r.std_error, r.ci_low, r.ci_high, r.weight_fixed) for r in m.sites])
    np.testing.assert_allclose(rows, frame[["eff", "sd_eff", "ci_low", "ci_upp", "w_fe"]], rtol=1e-12, atol=1e-13)
    if res["tau2"] > 0:
        np.testing.assert_allclose([r.weight_dl for r in m.sites], frame["w_re"], rtol=1e-9)
    assert [r.site for r in m.sites] == sites
    for shares in ([r.weight_fixed for r in m.sites], [r.weight_dl for r in m.sites],
                   [r.weight_reml for r in m.sites]):
        assert math.fsum(shares) == pytest.approx(1.0, abs=1e-12)


@settings(max_examples=25, deadline=None)
@given(case=studies(min_k=3))
def test_leave_one_site_out_equals_combine_effects_on_the_others(case):
    """Each leave-one-site-out fit equals combine_effects on the other k - 1 sites."""
    sites, y, se = case
    m = meta_analysis(sites, y, se)
    assert [loo.omitted for loo in m.leave_one_out] == sites
    for i, loo in enumerate(m.leave_one_out):
        keep = np.arange(len(sites)) != i
        res = reference(y[keep], se[keep])
        assert_pooled_equals(loo.fixed, res, random=False)
        assert_pooled_equals(loo.dl, res, random=True)
        assert_heterogeneity_equals(loo.heterogeneity, res)
        assert loo.reml == pool(y[keep], se[keep], "reml")


def _negative_restricted_loglik(y: np.ndarray, v: np.ndarray, t: float) -> float:
    w = 1 / (v + t)
    mu = w @ y / w.sum()
    return 0.5 * (np.sum(np.log(v + t)) + np.log(w.sum()) + w @ (y - mu) ** 2)


def _restricted_loglik_max(y: np.ndarray, v: np.ndarray) -> float:
    """τ² maximising the REML log-likelihood, found numerically on [0, 100]."""
    found = optimize.minimize_scalar(lambda t: _negative_restricted_loglik(y, v, t), bounds=(0.0, 100.0),
                                     method="bounded", options={"xatol": 1e-13})
    at_zero = _negative_restricted_loglik(y, v, 0.0)
    return 0.0 if at_zero <= _negative_restricted_loglik(y, v, found.x) else float(found.x)


@settings(max_examples=40, deadline=None)
@given(case=studies())
def test_reml_tau2_maximises_the_restricted_likelihood(case):
    """REML's τ² is where the restricted log-likelihood peaks (0 when it peaks at the
    boundary): at least as high as a bounded numerical search finds, and next to it (the
    flat peak limits the search to ~1e-6), and its pooled estimate is the inverse-variance
    mean at that τ²."""
    _, y, se = case
    reml = pool(y, se, "reml")
    want = _restricted_loglik_max(y, se**2)
    assert reml.converged is True
    assert (_negative_restricted_loglik(y, se**2, reml.tau2)
            <= _negative_restricted_loglik(y, se**2, want) + 1e-12)
    assert reml.tau2 == pytest.approx(want, rel=1e-5, abs=1e-8)
    w = 1 / (se**2 + reml.tau2)
    assert (reml.estimate, reml.std_error) == pytest.approx((w @ y / w.sum(), w.sum() ** -0.5), rel=1e-12)


def _bcg() -> tuple[np.ndarray, np.ndarray]:
    """metafor's dat.bcg (13 BCG vaccine trials) as log risk ratios and their variances."""
    tpos, tneg, cpos, cneg = np.array([
        [4, 119, 11, 128], [6, 300, 29, 274], [3, 228, 11, 209], [62, 13536, 248, 12619],
        [33, 5036, 47, 5761], [180, 1361, 372, 1079], [8, 2537, 10, 619], [505, 87886, 499, 87892],
        [29, 7470, 45, 7232], [17, 1699, 65, 1600], [186, 50448, 141, 27197], [5, 2493, 3, 2338],
        [27, 16886, 29, 17825]], dtype=float).T
    y = np.log(tpos / (tpos + tneg)) - np.log(cpos / (cpos + cneg))
    return y, 1 / tpos - 1 / (tpos + tneg) + 1 / cpos - 1 / (cpos + cneg)


def test_bcg_trials_match_metafor_to_its_printed_digits():
    """On metafor's BCG example, rma(method="REML") prints τ² = 0.3132, estimate -0.7145,
    se 0.1798, I² = 92.22%, Q(12) = 152.2330; method="DL" prints τ² = 0.3088, -0.7141."""
    y, v = _bcg()
    m = meta_analysis([f"trial{i}" for i in range(13)], y, np.sqrt(v))
    assert round(m.reml.tau2, 4) == 0.3132
    assert (round(m.reml.estimate, 4), round(m.reml.std_error, 4)) == (-0.7145, 0.1798)
    assert round(100 * m.reml.i2, 2) == 92.22
    assert (round(m.heterogeneity.q, 4), m.heterogeneity.df) == (152.2330, 12)
    assert (round(m.dl.tau2, 4), round(m.dl.estimate, 4)) == (0.3088, -0.7141)


def test_homogeneous_sites_have_no_between_site_variance():
    """When Q < k - 1 both random-effects methods give τ² = 0 and the fixed-effect fit."""
    y = np.array([1.0, 1.01, 0.99, 1.0])
    se = np.array([0.5, 0.4, 0.6, 0.5])
    m = meta_analysis(["a", "b", "c", "d"], y, se)
    assert m.heterogeneity.q < 3
    assert (m.dl.tau2, m.reml.tau2, m.heterogeneity.i2) == (0.0, 0.0, 0.0)
    assert m.dl.estimate == pytest.approx(m.fixed.estimate, rel=1e-15)
    assert tau2_reml(y, se**2) == (0.0, True)


def test_one_site_is_its_own_pooled_estimate():
    """A single site pools to itself, with Q = 0, I² = 0, no p value and no leave-one-out fits."""
    m = meta_analysis(["only"], [0.4], [0.2])
    assert m.k == 1
    assert (m.fixed.estimate, m.dl.estimate, m.reml.estimate) == pytest.approx((0.4, 0.4, 0.4), rel=1e-15)
    assert m.heterogeneity.q == pytest.approx(0.0, abs=1e-25)
    assert (m.heterogeneity.p_value, m.heterogeneity.i2, m.leave_one_out) == (None, 0.0, ())
    assert m.pooled("reml") == m.reml


@pytest.mark.parametrize(("sites", "estimates", "ses"), [
    (["a", "b"], [1.0, 2.0], [0.1, 0.0]),
    (["a", "b"], [1.0, math.nan], [0.1, 0.2]),
    (["a", "a"], [1.0, 2.0], [0.1, 0.2]),
    (["a", "b"], [1.0], [0.1, 0.2]),
    ([], [], []),
])
def test_invalid_site_estimates_are_refused(sites, estimates, ses):
    """A zero or missing standard error, a missing estimate, a repeated site or mismatched
    lengths are a ValueError, never a pooled number."""
    with pytest.raises(ValueError):
        meta_analysis(sites, estimates, ses)
