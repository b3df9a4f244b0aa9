"""The noised GLM's sensitivity: one subject's contribution to a binomial round's released
vector never exceeds the bound glm_noise charges for, whatever β the entry sends."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from stimnet.errors import QueryError
from stimnet.query.fields import FieldMeta
from stimnet.query.sql import parse_sql
from stimnetd.privacy import glm_noise
from stimnetd.privacy.noise import NoiseMechanism
from stimnetd.query.aggregate import Partial
from stimnetd.query.glm import site_round

FIELDS = {"y": FieldMeta("y", "t", "integer", bounds=(0, 1)),
          "a": FieldMeta("a", "t", "numeric", bounds=(-3, 7)),
          "b": FieldMeta("b", "t", "numeric", bounds=(0, 50)),
          "g": FieldMeta("g", "t", "categorical", levels=("u", "v", "w"))}
MODEL = parse_sql("SELECT glm('y ~ a + b + g', 'binomial', 9) FROM c").model


@settings(max_examples=200, deadline=None)
@given(a=st.floats(-3, 7), b=st.floats(0, 50), level=st.integers(0, 2), y=st.integers(0, 1),
       beta=st.lists(st.floats(-40, 40), min_size=5, max_size=5) | st.none())
def test_one_rows_contribution_is_within_the_charged_sensitivity(a, b, level, y, beta):
    assert MODEL is not None
    plan = glm_noise.plan(MODEL, FIELDS, 1.0, rounds=10)
    x = np.array([[1.0, a, b, float(level == 1), float(level == 2)]])
    r = site_round(x, np.array([float(y)]), None if beta is None else np.array(beta), "binomial")
    released = np.concatenate([r.xtwx[np.triu_indices(5)], r.xtwz, [1.0]])
    assert float(np.abs(released).sum()) <= plan.sensitivity * (1 + 1e-12)


def test_the_charge_is_the_accountants_and_covers_every_round():
    assert MODEL is not None
    plan = glm_noise.plan(MODEL, FIELDS, 2.0, rounds=10)
    sums, n = plan.round_epsilons
    assert plan.epsilon == pytest.approx(2.0, rel=1e-6) and plan.epsilon <= 2.0 + 1e-9
    assert plan.rounds * sums + n == pytest.approx(plan.epsilon)
    assert n == pytest.approx(0.2, rel=1e-6)  # N_SHARE of ε, spent once


def test_noised_rounds_keep_their_shape_and_report_round_one_n_again():
    assert MODEL is not None
    plan = glm_noise.plan(MODEL, FIELDS, 5.0, rounds=10)
    p = Partial("m", "glm_round", (), 400, {"xtwx": np.eye(5) * 100, "xtwz": np.ones(5),
                                            "sums": np.arange(6.0)}, {"terms": list("abcde")})
    q, report = glm_noise.noised(p, plan, NoiseMechanism())
    assert np.allclose(q.stats["xtwx"], q.stats["xtwx"].T) and q.stats["sums"].tolist() == [0] * 6
    assert q.meta["dp"] is True and report.epsilon == plan.epsilon
    again, _ = glm_noise.noised(p, plan, NoiseMechanism(), n_released=q.n)
    assert again.n == q.n


@pytest.mark.parametrize("sql", ["SELECT glm('y ~ a', 'poisson') FROM c",
                                 "SELECT glm('y ~ a', 'gaussian') FROM c",
                                 "SELECT meta(glm('y ~ a', 'binomial')) FROM c"])
def test_models_without_a_bounded_mechanism_are_refused(sql):
    model = parse_sql(sql).model
    assert model is not None
    with pytest.raises(QueryError, match="only glm\\(..., 'binomial'\\)"):
        glm_noise.plan(model, FIELDS, 1.0, rounds=10)


def test_a_predictor_without_bounds_is_refused():
    fields = {**FIELDS, "a": FieldMeta("a", "t", "numeric")}
    model = parse_sql("SELECT glm('y ~ a', 'binomial') FROM c").model
    assert model is not None
    with pytest.raises(QueryError, match="needs declared bounds on 'a'"):
        glm_noise.plan(model, fields, 1.0, rounds=10)
