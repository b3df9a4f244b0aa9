"""Hostile and malformed SQL and specs: every input is a QuerySpec or a QueryError.

The researcher's text reaches sqlglot and then our translator, at the entry and (as a
spec) at every site. Anything else escaping (an AttributeError on an unexpected node, a
RecursionError, a TypeError from a JSON value of the wrong type) would surface as an
internal error instead of naming what is wrong with the query.
"""

from __future__ import annotations

import json

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from stimnet.errors import QueryError
from stimnet.query.spec import QuerySpec, validate
from stimnet.query.sql import parse_sql
from tests.unit.test_query_sql import FIELDS

# Pieces of valid queries, of SQL we refuse, and of neither; joined at random.
TOKENS = [
    "SELECT", "FROM", "WHERE", "GROUP BY", "ORDER BY", "LIMIT 5", "HAVING", "AS", "DISTINCT",
    "AND", "OR", "NOT", "IN", "BETWEEN", "IS", "NULL", "LIKE", "JOIN", "ON", "UNION", "WITH",
    "OVER ()", "FILTER (WHERE age > 1)", "CASE WHEN age > 1 THEN 1 END",
    "count(*)", "count(age)", "avg(age)", "sum(", "var(age)", "sd(updrs_change)",
    "histogram(age, 0, 10, 20)", "quantile(age, 0.5)", "median(age)", "corr(age, updrs_change)",
    "contingency(target, target)", "lm('updrs_change ~ age')", "lm('~')", "lm(age)",
    "count_map(vta)", "mean_map(vta, updrs_change)", "roi_overlap(vta)", "regress(",
    "dbs", "other.dbs", "dbs d", "(SELECT 1)", "target", "age", "updrs_change", "vta",
    "nope", "d.age", "*", ",", "(", ")", "=", "<", ">=", "<>", "!=", "+", "-", "/", "||",
    "0", "1", "-3", "1e308", "1e999", "0.5", "'STN'", "'GPi'", "''", "'\\'", "\"age\"",
    ";", "--", "/*", "*/", "$1", "?", ":x", "@@version", "\x00", "é", "TRUE", "FALSE",
]


@st.composite
def sqlish(draw: st.DrawFn) -> str:
    head = draw(st.sampled_from(["", "SELECT count(*) FROM dbs", "SELECT"]))
    body = draw(st.lists(st.sampled_from(TOKENS), max_size=14))
    return " ".join([head, *body])


def _accepts_or_names_the_problem(sql: str) -> None:
    try:
        spec = parse_sql(sql)
    except QueryError as exc:
        assert isinstance(exc.args[0], str) and exc.args[0] != "", sql
        return
    # What parses must survive the JSON the sites receive, and validate or be refused.
    again = QuerySpec.from_dict(json.loads(json.dumps(spec.to_dict())))
    assert again == spec, sql
    try:
        validate(spec, FIELDS)
    except QueryError as exc:
        assert isinstance(exc.args[0], str) and exc.args[0] != "", sql


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(sqlish())
def test_token_soup_is_parsed_or_refused_by_name(sql: str) -> None:
    """Any sequence of SQL-ish tokens parses (and survives the sites' JSON) or raises a
    QueryError with a message."""
    _accepts_or_names_the_problem(sql)


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=80))
def test_arbitrary_text_is_parsed_or_refused_by_name(sql: str) -> None:
    """Any short text parses or raises a QueryError with a message, never another exception."""
    _accepts_or_names_the_problem(sql)


def test_deep_nesting_is_refused_not_a_recursion_error() -> None:
    """Filters nested or chained thousands deep are refused as QueryErrors, not
    RecursionErrors."""
    for sql in ("SELECT count(*) FROM dbs WHERE " + "(" * 5000 + "age > 1" + ")" * 5000,
                "SELECT count(*) FROM dbs WHERE " + " AND ".join(["age > 1"] * 5000),
                "SELECT count(*) FROM dbs WHERE " + "NOT " * 5000 + "age > 1"):
        _accepts_or_names_the_problem(sql)


JSONISH = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(
        st.sampled_from(["catalog", "aggregates", "where", "group_by", "func", "fields",
                         "name", "params", "op", "field", "value", "args", "values", "lo",
                         "hi", "edges", "q", "formula", "x"]), inner, max_size=5),
    max_leaves=20)


@st.composite
def specish(draw: st.DrawFn) -> object:
    """Mostly spec-shaped documents with a wrong part or two, sometimes anything at all."""
    if draw(st.booleans()):
        return draw(JSONISH)
    agg = {"func": draw(st.sampled_from(["count", "mean", "histogram", "lm", "nope"]) | JSONISH),
           "fields": draw(st.sampled_from([["age"], [], ["age", "x"]]) | JSONISH),
           "name": draw(st.sampled_from(["n", ""]) | JSONISH)}
    if draw(st.booleans()):
        agg["params"] = draw(JSONISH)
    doc = {"catalog": draw(st.sampled_from(["dbs"]) | JSONISH), "aggregates": [agg]}
    if draw(st.booleans()):
        doc["where"] = draw(JSONISH)
    if draw(st.booleans()):
        doc["group_by"] = draw(st.sampled_from([["target"], ["age"]]) | JSONISH)
    return doc


@settings(max_examples=400, deadline=None)
@given(specish())
def test_spec_documents_are_read_or_refused_by_name(doc: object) -> None:
    """A site reads the spec from a signed job: a hostile researcher controls every byte."""
    try:
        spec = QuerySpec.from_dict(doc)
    except QueryError as exc:
        assert isinstance(exc.args[0], str) and exc.args[0] != ""
        return
    try:
        validate(spec, FIELDS)
    except QueryError as exc:
        assert isinstance(exc.args[0], str) and exc.args[0] != ""
