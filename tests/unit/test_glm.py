"""Federated GLM == statsmodels GLM on the pooled rows (issue 23's acceptance): IRLS over
1-5 sites' additive rounds, the outcomes that are not estimates (separation,
non-convergence, singular systems), and the entry's round-by-round state machine."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import statsmodels.api as sm
import statsmodels.formula.api as smf
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from stimnet.errors import IncompatiblePartials, QueryError
from stimnetd.query.design import Formula, columns, design, parse_formula
from stimnetd.query.glm import (
    GlmControl,
    GlmOutcome,
    GlmRound,
    IrlsState,
    advance,
    combine,
    fit,
    site_round,
    start,
)
from stimnetd.query.glm_family import FamilyName
from stimnetd.testing import shared_data

SM_FAMILIES = {"gaussian": sm.families.Gaussian, "binomial": sm.families.Binomial,
               "poisson": sm.families.Poisson}
LEVELS = ("a", "b", "c")


def sites_of(frames: list[pd.DataFrame], formula: Formula, levels: dict, family: FamilyName,
             offset: str | None = None) -> list:
    """One in-process site per frame: its design, evaluated at whatever β it is sent."""
    designs = [design(f, formula, levels, offset=offset) for f in frames]
    return [lambda b, d=d: site_round(d.x, d.y, b, family, d.offset) for d in designs]


def reference(frames: list[pd.DataFrame], formula: Formula, levels: dict, family: FamilyName,
              offset: str | None = None):
    """statsmodels GLM on the concatenated complete rows, with the same design, iterated
    to the maximum: its default stops once the deviance moves by < 1e-8 and takes the
    covariance from the weights one step before, up to ~1e-5 off the MLE's."""
    pooled = design(pd.concat(frames, ignore_index=True), formula, levels, offset=offset)
    model = sm.GLM(pooled.y, pooled.x, family=SM_FAMILIES[family](), offset=pooled.offset)
    return model.fit(use_t=family == "gaussian", tol=1e-12)


def diverged(ref) -> bool:
    """statsmodels' fit of a quasi-separated binomial: some row fitted with near-certainty
    and the standard errors blown up (its criterion stops on the deviance, not on β)."""
    mu = np.asarray(ref.mu)
    return bool(np.min(np.minimum(mu, 1 - mu)) < 1e-6 and np.max(ref.bse) > 50)


def assert_equals_statsmodels(out: GlmOutcome, ref) -> None:
    assert out.kind == "converged", out.detail
    f = out.fit
    assert f is not None
    np.testing.assert_allclose(f.coefficients, ref.params, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(f.std_errors, ref.bse, rtol=1e-6, atol=1e-8)
    # R's criterion leaves β up to ~1e-6 standard errors from the exact maximum, and a
    # p value far in the tail magnifies that by z·φ(z)/p.
    np.testing.assert_allclose(f.p_values, ref.pvalues, rtol=1e-5, atol=1e-10)
    cov = np.asarray(ref.cov_params())
    np.testing.assert_allclose(f.covariance, cov, rtol=1e-6, atol=1e-6 * np.abs(cov).max())
    for ours, theirs in [(f.deviance, ref.deviance), (f.null_deviance, ref.null_deviance),
                         (f.aic, ref.aic), (f.loglik, ref.llf), (f.dispersion, ref.scale)]:
        assert ours == pytest.approx(theirs, rel=1e-8, abs=1e-8)
    assert (f.n, f.df_residual, f.df_null) == (ref.nobs, ref.df_resid, ref.nobs - 1)


@st.composite
def glm_cases(draw, family: FamilyName):
    """Random data from a GLM of the family, split into 1-5 non-empty sites."""
    n = draw(st.integers(40, 150))
    k = draw(st.integers(1, 5))
    cuts = sorted(draw(st.lists(st.integers(1, n - 1), min_size=k - 1, max_size=k - 1, unique=True)))
    numeric = draw(st.integers(0, 3))
    categorical = draw(st.booleans())
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    cols = {f"x{j}": rng.normal(rng.uniform(-2, 2), rng.uniform(0.5, 3), n) for j in range(numeric)}
    eta = np.full(n, rng.uniform(-1, 1)) + sum(rng.uniform(-0.4, 0.4) * (c - c.mean()) / c.std()
                                   for c in cols.values())
    if categorical:
        cols["g"] = rng.choice(LEVELS, n)
        eta = eta + np.select([cols["g"] == lv for lv in LEVELS], rng.uniform(-0.5, 0.5, 3))
    if family == "binomial":
        y = (rng.random(n) < 1 / (1 + np.exp(-eta))).astype(float)
    elif family == "poisson":
        y = rng.poisson(np.exp(eta + 1.0)).astype(float)
    else:
        y = eta + rng.normal(0, rng.uniform(0.2, 3), n)
    frame = pd.DataFrame({"y": y, **cols})
    frames = [frame.iloc[a:b] for a, b in zip([0, *cuts], [*cuts, n], strict=True)]
    ref_level = draw(st.sampled_from(LEVELS))
    levels = {"g": (ref_level, *[lv for lv in LEVELS if lv != ref_level])} if categorical else {}
    return frames, Formula("y", tuple(cols)), levels


@pytest.mark.parametrize("family", ["binomial", "poisson", "gaussian"])
@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_federated_glm_equals_pooled_statsmodels(family: FamilyName, data):
    """For any split of the rows over 1-5 sites, the federated fit's coefficients, standard
    errors, p values, deviance, null deviance and AIC equal statsmodels on the pooled rows."""
    frames, formula, levels = data.draw(glm_cases(family))
    names = columns(formula, levels)
    out = fit(sites_of(frames, formula, levels, family), len(names), family, terms=names)
    ref = reference(frames, formula, levels, family)
    if family == "binomial" and diverged(ref):
        # The random data can be quasi-separated: statsmodels then "converges" on an
        # estimate that is still running off with a huge standard error.
        assert out.kind == "separation", out.detail
        return
    assert_equals_statsmodels(out, ref)
    assert out.rounds <= GlmControl().max_rounds
    assert out.fit is not None and out.fit.statistic == ("t" if family == "gaussian" else "z")
    assert out.fit.terms == names


@settings(max_examples=15, deadline=None)
@given(data=st.data(), family=st.sampled_from(["binomial", "poisson", "gaussian"]))
def test_sum_of_site_rounds_is_the_round_of_the_pooled_rows(data, family: FamilyName):
    """Every field of a round is additive: the sites' rounds summed equal one round on all
    the rows, at the starting means and at any β."""
    frames, formula, levels = data.draw(glm_cases(family))
    designs = [design(f, formula, levels) for f in frames]
    pooled = design(pd.concat(frames, ignore_index=True), formula, levels)
    beta = np.random.default_rng(0).uniform(-0.3, 0.3, pooled.x.shape[1])
    for b in (None, beta):
        summed = combine([site_round(d.x, d.y, b, family) for d in designs])
        whole = site_round(pooled.x, pooled.y, b, family)
        np.testing.assert_allclose(summed.xtwx, whole.xtwx, rtol=1e-10, atol=1e-10)
        np.testing.assert_allclose(summed.xtwz, whole.xtwz, rtol=1e-10, atol=1e-10)
        got = (summed.deviance, summed.loglik, summed.y_sum, summed.y_sq_sum, summed.y_log_y_sum)
        want = (whole.deviance, whole.loglik, whole.y_sum, whole.y_sq_sum, whole.y_log_y_sum)
        assert got == pytest.approx(want, rel=1e-10, abs=1e-9)
        assert (summed.n, summed.boundary) == (whole.n, whole.boundary)


def test_poisson_offset_equals_statsmodels_including_null_deviance():
    """A Poisson rate model with a log-exposure offset equals statsmodels, and its null
    deviance (an intercept-only fit with the offset, run as extra rounds) does too."""
    rng = np.random.default_rng(5)
    n = 200
    exposure = rng.uniform(0.5, 4, n)
    x = rng.normal(size=n)
    frame = pd.DataFrame({"y": rng.poisson(exposure * np.exp(0.2 + 0.4 * x)), "x": x,
                          "log_t": np.log(exposure)})
    frames = [frame.iloc[:70], frame.iloc[70:]]
    formula = Formula("y", ("x",))
    null = sites_of(frames, Formula("y", ()), {}, "poisson", offset="log_t")
    out = fit(sites_of(frames, formula, {}, "poisson", offset="log_t"), 2, "poisson", null_sites=null)
    assert_equals_statsmodels(out, reference(frames, formula, {}, "poisson", offset="log_t"))
    without = fit(sites_of(frames, formula, {}, "poisson", offset="log_t"), 2, "poisson")
    assert without.fit is not None and without.fit.null_deviance is None


def _fit_arrays(parts: list[tuple[np.ndarray, np.ndarray]], family: FamilyName,
                control: GlmControl | None = None) -> GlmOutcome:
    sites = [lambda b, x=x, y=y: site_round(x, y, b, family) for x, y in parts]
    return fit(sites, parts[0][0].shape[1], family, control=control)


@settings(max_examples=15, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), k=st.integers(1, 5), n=st.integers(10, 120))
def test_complete_separation_is_an_outcome_not_estimates(seed: int, k: int, n: int):
    """When a linear combination of the predictors splits the 0s from the 1s, the fit
    ends as "separation" with no coefficients, however the rows are split."""
    rng = np.random.default_rng(seed)
    x = np.column_stack([np.ones(n), rng.normal(size=(n, 2))])
    score = x[:, 1] - 0.7 * x[:, 2]
    y = (score > np.median(score)).astype(float)
    out = _fit_arrays(list(zip(np.array_split(x, k), np.array_split(y, k), strict=True)), "binomial")
    assert (out.kind, out.fit) == ("separation", None)
    assert out.rounds <= GlmControl().max_rounds


def test_quasi_complete_separation_by_a_level_is_an_outcome():
    """A level whose rows all have outcome 0 drives its coefficient to -inf while R's
    criterion converges; the fit reports separation instead of the diverged estimate."""
    rng = np.random.default_rng(11)
    g = rng.choice(LEVELS, 150)
    y = np.where(g == "c", 0.0, (rng.random(150) < 0.4).astype(float))
    frames = [pd.DataFrame({"y": y, "g": g}).iloc[s] for s in (slice(0, 60), slice(60, 150))]
    out = fit(sites_of(frames, Formula("y", ("g",)), {"g": LEVELS}, "binomial"), 3, "binomial")
    assert (out.kind, out.fit) == ("separation", None)
    assert "separation" in out.detail


def test_poisson_level_without_events_is_separation():
    """A Poisson level with only zero counts has no finite rate estimate: "separation"."""
    rng = np.random.default_rng(2)
    g = np.tile(["a", "b"], 60)
    y = np.where(g == "b", 0, rng.poisson(3.0, 120))
    frames = [pd.DataFrame({"y": y, "g": g})]
    out = fit(sites_of(frames, Formula("y", ("g",)), {"g": ("a", "b")}, "poisson"), 2, "poisson")
    assert (out.kind, out.fit) == ("separation", None)


def test_too_few_iterations_is_not_converged_as_statsmodels_agrees():
    """With maxit = 2 a logistic fit that needs more solves ends "not_converged" after
    exactly 2 solves (3 rounds); statsmodels with maxiter=2 does not converge either."""
    rng = np.random.default_rng(4)
    x = np.column_stack([np.ones(300), rng.normal(size=300)])
    y = (rng.random(300) < 1 / (1 + np.exp(-(1.5 + 2 * x[:, 1])))).astype(float)
    out = _fit_arrays([(x[:100], y[:100]), (x[100:], y[100:])], "binomial", GlmControl(maxit=2))
    assert (out.kind, out.iterations, out.rounds, out.fit) == ("not_converged", 2, 3, None)
    assert len(out.deviances) == 3
    assert sm.GLM(y, x, family=sm.families.Binomial()).fit(maxiter=2).converged is False


def test_collinear_predictors_are_singular():
    """A predictor that is a multiple of another leaves β unidentifiable: "singular"."""
    rng = np.random.default_rng(8)
    x1 = rng.normal(size=80)
    x = np.column_stack([np.ones(80), x1, 3 * x1])
    y = rng.poisson(2.0, 80).astype(float)
    out = _fit_arrays([(x[:30], y[:30]), (x[30:], y[30:])], "poisson")
    assert (out.kind, out.fit, out.iterations, out.rounds) == ("singular", None, 0, 1)


def test_a_declared_level_no_site_has_is_singular():
    """A declared level absent from every site makes an all-zero design column: "singular"."""
    rng = np.random.default_rng(9)
    frame = pd.DataFrame({"y": rng.normal(size=50), "g": rng.choice(["a", "b"], 50)})
    out = fit(sites_of([frame], Formula("y", ("g",)), {"g": LEVELS}, "gaussian"), 3, "gaussian")
    assert (out.kind, out.fit) == ("singular", None)


def test_fewer_rows_than_coefficients_is_singular():
    """Two rows cannot identify three coefficients."""
    x = np.array([[1.0, 0.5, 2.0], [1.0, -1.0, 0.0]])
    out = _fit_arrays([(x, np.array([1.0, 2.0]))], "gaussian")
    assert (out.kind, out.detail) == ("singular", "no more rows than coefficients")


def test_gaussian_takes_two_rounds_and_binomial_streams_each_iteration():
    """A gaussian fit is exact after one solve (2 rounds); a logistic fit calls on_round
    after every round but the last, with the iteration count rising by one each time."""
    rng = np.random.default_rng(1)
    x = np.column_stack([np.ones(100), rng.normal(size=100)])
    gauss = _fit_arrays([(x, x[:, 1] + rng.normal(size=100))], "gaussian")
    assert (gauss.kind, gauss.iterations, gauss.rounds) == ("converged", 1, 2)
    y = (rng.random(100) < 1 / (1 + np.exp(-x[:, 1]))).astype(float)
    seen: list[tuple[int, int]] = []
    out = fit([lambda b: site_round(x, y, b, "binomial")], 2, "binomial",
              on_round=lambda s: seen.append((s.iteration, s.rounds)))
    assert out.kind == "converged"
    assert seen == [(i, i) for i in range(1, out.rounds)]
    assert len(out.deviances) == out.rounds


def _round(deviance: float, p: int = 2, xtwz: float = 1.0) -> GlmRound:
    return GlmRound(np.eye(p) * 50, np.full(p, xtwz), deviance, -deviance / 2, 100, 40.0, 40.0,
                    0.0, 0)


def test_non_finite_deviance_halves_the_step_within_the_round_bound():
    """A round whose deviance is not finite sends the next round halfway back to the last
    good β, keeps the iteration count, and counts against the rounds a fit may take."""
    state = start("poisson", 2, GlmControl(maxit=3))
    state = advance(state, _round(120.0))
    assert isinstance(state, IrlsState) and state.beta is not None
    first_beta = state.beta
    state = advance(state, _round(110.0, xtwz=3.0))
    assert isinstance(state, IrlsState) and state.accepted is not None
    good, bad = state.accepted.copy(), state.beta.copy()
    np.testing.assert_array_equal(good, first_beta)
    np.testing.assert_allclose(bad, [0.06, 0.06])
    halved = advance(state, _round(math.inf))
    assert isinstance(halved, IrlsState)
    np.testing.assert_allclose(halved.beta, (good + bad) / 2)
    assert (halved.iteration, halved.rounds, halved.deviance) == (2, 3, 110.0)
    ended = advance(halved, _round(math.nan))
    assert isinstance(ended, GlmOutcome)
    assert (ended.kind, ended.rounds) == ("not_converged", 4)


def test_a_round_over_other_rows_than_the_first_is_refused():
    """Every round must cover the first round's rows: a site that changed its data or
    dropped out mid-fit is refused, never folded into the fit."""
    state = advance(start("poisson", 2), _round(120.0))
    assert isinstance(state, IrlsState)
    fewer = GlmRound(np.eye(2) * 50, np.ones(2), 100.0, -50.0, 99, 40.0, 40.0, 0.0, 0)
    with pytest.raises(IncompatiblePartials, match="other rows"):
        advance(state, fewer)


def test_round_documents_round_trip_and_refuse_another_model():
    """A round survives to_doc/from_doc unchanged; a document for another number of
    coefficients, or rounds of different sizes, are refused as incompatible."""
    rng = np.random.default_rng(3)
    x = np.column_stack([np.ones(20), rng.normal(size=20)])
    r = site_round(x, rng.poisson(2.0, 20).astype(float), np.array([0.5, 0.1]), "poisson")
    back = GlmRound.from_doc(r.to_doc(), 2)
    np.testing.assert_array_equal(back.xtwx, r.xtwx)
    assert back.to_doc() == r.to_doc()
    with pytest.raises(IncompatiblePartials):
        GlmRound.from_doc(r.to_doc(), 3)
    with pytest.raises(IncompatiblePartials):
        combine([r, _round(1.0, p=3)])


@pytest.mark.parametrize(("family", "y", "rule"), [
    ("binomial", [0.0, 1.0, 2.0], "0/1"),
    ("poisson", [1.0, -1.0, 0.0], "non-negative"),
    ("gaussian", [1.0, math.inf, 0.0], "finite"),
])
def test_response_outside_the_family_support_is_refused(family: FamilyName, y: list, rule: str):
    """A response the family cannot model is a QueryError naming the rule, not a value."""
    with pytest.raises(QueryError, match=rule):
        site_round(np.ones((3, 1)), np.array(y), None, family)


# --------------------------------------------------------------------------- formulas, designs


def test_formula_parses_response_and_terms():
    """'response ~ term + term' gives the response and the terms in order."""
    assert parse_formula(" responder ~ amplitude_ma +age ") == Formula("responder", ("amplitude_ma", "age"))


@pytest.mark.parametrize("text", ["y", "y ~", "~ x", "y ~ x + ", "y ~ log(x)", "y ~ x*z", "y ~ 1 + x",
                                  "y ~ x + x", "y ~ y", "y ~ a ~ b"])
def test_malformed_formulas_are_query_errors(text: str):
    """Anything but distinct plain field names around one '~' is refused."""
    with pytest.raises(QueryError):
        parse_formula(text)


@settings(max_examples=15, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), ref=st.sampled_from(LEVELS), n=st.integers(30, 80))
def test_categorical_expansion_equals_statsmodels_treatment_coding(seed: int, ref: str, n: int):
    """A categorical term expands like statsmodels' C(g, Treatment(reference=...)): same
    columns (by name), same complete rows after missing values, same coefficients."""
    rng = np.random.default_rng(seed)
    frame = pd.DataFrame({"y": rng.normal(size=n), "x": rng.normal(size=n),
                          "g": rng.choice(LEVELS, n).astype(object)})
    frame.loc[rng.choice(n, 3, replace=False), "x"] = np.nan
    frame.loc[rng.choice(n, 3, replace=False), "g"] = None
    frame.loc[:2, "g"] = LEVELS  # every level observed, as statsmodels only knows those
    levels = {"g": (ref, *[lv for lv in LEVELS if lv != ref])}
    ours = design(frame, Formula("y", ("x", "g")), levels)
    model = smf.glm(f"y ~ x + C(g, Treatment(reference='{ref}'))", frame)
    theirs = dict(zip(model.exog_names, model.exog.T, strict=True))
    renamed = {name.replace(f"C(g, Treatment(reference='{ref}'))", "g"): col for name, col in theirs.items()}
    assert set(renamed) == set(ours.columns)
    for j, name in enumerate(ours.columns):
        np.testing.assert_array_equal(ours.x[:, j], renamed[name])
    np.testing.assert_array_equal(ours.y, model.endog)
    assert ours.dropped == n - len(model.endog)
    out = fit([lambda b: site_round(ours.x, ours.y, b, "gaussian")], ours.x.shape[1], "gaussian",
              terms=ours.columns)
    assert out.fit is not None
    got = dict(zip(out.fit.terms, out.fit.coefficients, strict=True))
    want = model.fit().params.rename(lambda s: s.replace(f"C(g, Treatment(reference='{ref}'))", "g"))
    assert got == pytest.approx(want.to_dict(), rel=1e-9, abs=1e-12)


def test_design_names_columns_before_reading_data_and_refuses_undeclared_values():
    """Columns come from the formula and declared levels alone; a value outside the
    declared levels, a non-numeric value or an unknown field is a QueryError that does
    not echo the value."""
    formula = Formula("y", ("dose", "target"))
    levels = {"target": ("STN", "GPi", "VIM")}
    assert columns(formula, levels) == ("Intercept", "dose", "target[T.GPi]", "target[T.VIM]")
    frame = pd.DataFrame({"y": [1.0, 2.0], "dose": [0.5, 1.0], "target": ["STN", "secret"]})
    with pytest.raises(QueryError, match="outside its declared levels") as e:
        design(frame, formula, levels)
    assert "secret" not in str(e.value)
    with pytest.raises(QueryError, match="not numeric"):
        design(frame.assign(dose=["a", "b"]), formula, {"target": ("STN", "secret")})
    with pytest.raises(QueryError, match="unknown field 'age'"):
        design(frame, Formula("y", ("age",)), {})


def test_two_level_categorical_response_codes_its_second_level_as_one():
    """A categorical response of two declared levels is 0 for the first, 1 for the second."""
    frame = pd.DataFrame({"status": ["non-responder", "responder", None, "responder"],
                          "x": [1.0, 2.0, 3.0, 4.0]})
    d = design(frame, Formula("status", ("x",)), {"status": ("non-responder", "responder")})
    assert (d.y.tolist(), d.dropped) == ([0.0, 1.0, 1.0], 1)


# --------------------------------------------------------------------------- CNSIM


def _cnsim(i: int) -> pd.DataFrame:
    df = pd.read_csv(shared_data("cnsim", f"CNSIM{i}.csv"), index_col=0)
    df.columns = [c.strip() for c in df.columns]
    # As the catalog loader stores categories: stripped strings ("1", not 1.0).
    df["PM_BMI_CATEGORICAL"] = df["PM_BMI_CATEGORICAL"].map(lambda v: v if pd.isna(v) else str(int(v)))
    df["GENDER"] = df["GENDER"].astype(str)
    df["CONDITIONS"] = df[["DIS_CVA", "MEDI_LPD", "DIS_DIAB", "DIS_AMI"]].sum(axis=1)
    return df


@pytest.mark.parametrize(("family", "text", "levels"), [
    ("binomial", "DIS_DIAB ~ PM_BMI_CONTINUOUS + LAB_TSC", {}),
    ("poisson", "CONDITIONS ~ PM_BMI_CONTINUOUS + GENDER", {"GENDER": ("0", "1")}),
    ("gaussian", "LAB_HDL ~ PM_BMI_CATEGORICAL + GENDER + LAB_TSC",
     {"PM_BMI_CATEGORICAL": ("1", "2", "3"), "GENDER": ("0", "1")}),
])
def test_cnsim_three_cohorts_equal_statsmodels_on_the_concatenated_files(family, text, levels):
    """On the public CNSIM data split as published (three cohorts), the federated GLM
    equals statsmodels on the concatenated rows, missing values dropped in both."""
    frames = [_cnsim(i) for i in (1, 2, 3)]
    formula = parse_formula(text)
    names = columns(formula, levels)
    out = fit(sites_of(frames, formula, levels, family), len(names), family, terms=names)
    ref = reference(frames, formula, levels, family)
    assert_equals_statsmodels(out, ref)
    pooled = pd.concat(frames, ignore_index=True)
    assert out.n == len(pooled[list(formula.fields)].dropna())
    if family == "binomial":
        plain = sm.GLM.from_formula(text, pooled, family=sm.families.Binomial()).fit(tol=1e-12)
        np.testing.assert_allclose(out.fit.coefficients, plain.params, rtol=1e-6)
