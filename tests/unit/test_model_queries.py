"""glm() and meta() in the restricted SQL and the JSON spec."""

from __future__ import annotations

import pytest

from stimnet.errors import QueryError
from stimnet.query.spec import QuerySpec
from stimnet.query.sql import parse_sql


@pytest.mark.parametrize(("sql", "func", "fields", "params"), [
    ("SELECT glm('responder ~ amplitude_ma + age', 'binomial') FROM d", "glm_binomial",
     ("responder", "amplitude_ma", "age"), ()),
    ("SELECT glm('events ~ age', 'Poisson', 40) FROM d WHERE age > 50", "glm_poisson",
     ("events", "age"), (40,)),
    ("SELECT meta(avg(updrs_change)) FROM d", "meta_mean", ("updrs_change",), ()),
    ("SELECT meta(regress(y, x1, x2)) FROM d", "meta_regression", ("y", "x1", "x2"), ()),
    ("SELECT meta(lm('y ~ x')) FROM d", "meta_regression", ("y", "x"), ()),
    ("SELECT meta(glm('y ~ x', 'gaussian')) FROM d", "meta_glm_gaussian", ("y", "x"), ()),
])
def test_models_parse_to_one_model_output_that_round_trips_as_json(sql, func, fields, params):
    spec = parse_sql(sql)
    assert spec.model is not None
    assert (spec.model.func, spec.model.fields, spec.model.params) == (func, fields, params)
    assert QuerySpec.from_dict(spec.to_dict()) == spec


@pytest.mark.parametrize(("sql", "rule"), [
    ("SELECT glm('y ~ x', 'gamma') FROM d", "unknown GLM family 'gamma'"),
    ("SELECT glm('y ~ x') FROM d", "glm takes a formula and a family"),
    ("SELECT glm('y ~ x * z', 'binomial') FROM d", "formula must be 'y ~ x1 + x2 + ...'"),
    ("SELECT glm('y ~ x', 'binomial', 0) FROM d", "whole number from 1 to 100"),
    ("SELECT glm('y ~ x', 'binomial', 2.5) FROM d", "whole number from 1 to 100"),
    ("SELECT glm('y ~ x', 'binomial'), count(*) FROM d", "is the only output of its query"),
    ("SELECT g, meta(avg(x)) FROM d GROUP BY g", "is the only output of its query"),
    ("SELECT meta(count(*)) FROM d", "meta() pools avg, regress/lm or glm, not count"),
    ("SELECT meta(avg(x), avg(y)) FROM d", "meta takes one aggregate"),
])
def test_malformed_models_are_refused_naming_the_rule(sql: str, rule: str) -> None:
    with pytest.raises(QueryError, match=rule.replace("(", r"\(").replace(")", r"\)")
                       .replace("*", r"\*").replace("+", r"\+").replace(".", r"\.")):
        parse_sql(sql)
