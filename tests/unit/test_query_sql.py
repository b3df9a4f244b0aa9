"""The query front end: restricted SQL → QuerySpec, JSON round trips, and validation."""

from __future__ import annotations

import json

import pytest

from stimnet.errors import QueryError
from stimnet.query.fields import FieldMeta
from stimnet.query.spec import (
    AggSpec,
    And,
    Between,
    Comparison,
    InList,
    IsNull,
    Not,
    Or,
    QuerySpec,
    validate,
)
from stimnet.query.sql import parse_sql
from tests.unit.fakes import categorical, image, numeric

FIELDS: dict[str, FieldMeta] = {
    "target": categorical("target", ("STN", "GPi")),
    "age": numeric("age", 18, 90),
    "updrs_change": numeric("updrs_change", -100, 100),
    "vta": image("vta"),
    "sid": FieldMeta("sid", "t", "id"),
    "unbounded": FieldMeta("unbounded", "t", "numeric"),
}


def test_design_example_parses():
    """The example query from the design brief becomes a grouped count and mean."""
    spec = parse_sql(
        "SELECT target, count(*), avg(updrs_change) FROM dbs_outcomes "
        "WHERE age > 50 GROUP BY target"
    )
    assert spec == QuerySpec(
        catalog="dbs_outcomes",
        where=Comparison(">", "age", 50),
        group_by=("target",),
        aggregates=(
            AggSpec("count", (), "count(*)"),
            AggSpec("mean", ("updrs_change",), "avg(updrs_change)"),
        ),
    )


def test_aliases_become_output_names():
    """`AS name` names the output column; unaliased outputs keep their SQL spelling."""
    spec = parse_sql("SELECT var_samp(age) AS v, STDDEV(age) FROM t")
    assert [(a.func, a.name) for a in spec.aggregates] == [("var", "v"), ("sd", "stddev(age)")]


@pytest.mark.parametrize(
    ("sql", "agg"),
    [
        ("count(age)", AggSpec("count", ("age",), "count(age)")),
        ("sum(age)", AggSpec("sum", ("age",), "sum(age)")),
        ("mean(age)", AggSpec("mean", ("age",), "mean(age)")),
        ("variance(age)", AggSpec("var", ("age",), "variance(age)")),
        ("sd(age)", AggSpec("sd", ("age",), "sd(age)")),
        (
            "histogram(age, 0, 50, 100)",
            AggSpec("histogram", ("age",), "histogram(age, 0, 50, 100)", (0, 50, 100)),
        ),
        (
            "quantile(age, 0.25, 0.75)",
            AggSpec("quantiles", ("age",), "quantile(age, 0.25, 0.75)", (0.25, 0.75)),
        ),
        ("median(age)", AggSpec("quantiles", ("age",), "median(age)", (0.5,))),
        (
            "corr(age, updrs_change)",
            AggSpec("corr", ("age", "updrs_change"), "corr(age, updrs_change)"),
        ),
        ("contingency(a, b)", AggSpec("contingency", ("a", "b"), "contingency(a, b)")),
        ("regress(y, x1, x2)", AggSpec("regression", ("y", "x1", "x2"), "regress(y, x1, x2)")),
        ("lm('y ~ x1 + x2')", AggSpec("regression", ("y", "x1", "x2"), "lm('y ~ x1 + x2')")),
        ("count_map(vta)", AggSpec("count_map", ("vta",), "count_map(vta)")),
        ("mean_map(vta, w)", AggSpec("mean_map", ("vta", "w"), "mean_map(vta, w)")),
        ("mean_map(vta)", AggSpec("mean_map", ("vta",), "mean_map(vta)")),
        ("roi_overlap(vta)", AggSpec("roi_overlap", ("vta",), "roi_overlap(vta)")),
    ],
)
def test_each_sql_function_maps_to_its_aggregate(sql, agg):
    """Every supported SQL function spelling maps to one AggSpec with its default name."""
    assert parse_sql(f"SELECT {sql} FROM t").aggregates == (agg,)


def test_where_tree_covers_every_operator():
    """Comparisons, IN, BETWEEN, IS [NOT] NULL, NOT, AND/OR become the filter tree, with
    a literal on the left flipped and negations folded into IN/BETWEEN."""
    spec = parse_sql(
        "SELECT count(*) FROM t WHERE 50 < age AND x IS NOT NULL AND y IN ('a', 'b') "
        "AND z NOT BETWEEN -1 AND 2.5 AND NOT (q = 'a' OR r <> 3)"
    )
    assert spec.where == And(
        (
            Comparison(">", "age", 50),
            IsNull("x", negated=True),
            InList("y", ("a", "b")),
            Between("z", -1, 2.5, negated=True),
            Not(Or((Comparison("=", "q", "a"), Comparison("!=", "r", 3)))),
        )
    )


def test_columns_qualified_with_the_catalog_are_accepted():
    """`t.age` in a query over `t` means the field `age`."""
    assert parse_sql("SELECT avg(t.age) FROM t").aggregates[0].fields == ("age",)


@pytest.mark.parametrize(
    ("sql", "message"),
    [
        ("SELECT target FROM t GROUP BY target", "no aggregate"),
        ("SELECT target, count(*) FROM t", "column 'target' in SELECT must appear in GROUP BY"),
        ("SELECT * FROM t", "SELECT * is not supported"),
        ("SELECT count(*) FROM a JOIN b ON a.x = b.x", "JOIN is not supported"),
        ("SELECT count(*) FROM (SELECT * FROM t) s", "subqueries are not supported"),
        ("SELECT count(*) FROM t WHERE x IN (SELECT y FROM u)", "subqueries are not supported"),
        ("WITH a AS (SELECT 1) SELECT count(*) FROM a", "WITH (common table expressions)"),
        ("SELECT count(*) FROM t UNION SELECT count(*) FROM u", "UNION is not supported"),
        ("SELECT count(*) FROM t ORDER BY 1", "ORDER BY is not supported (and not needed"),
        ("SELECT count(*) FROM t LIMIT 5", "LIMIT is not supported (and not needed"),
        ("SELECT avg(age) OVER () FROM t", "window functions (OVER) are not supported"),
        ("SELECT count(*) FROM t; SELECT count(*) FROM t", "exactly one SELECT statement, got 2"),
        ("DROP TABLE t", "only SELECT queries are accepted, not DROP"),
        ("INSERT INTO t VALUES (1)", "only SELECT queries are accepted, not INSERT"),
        ("SELECT frobnicate(age) FROM t", "unknown function 'frobnicate'"),
        ("SELECT max(age) FROM t", "unknown function 'max'"),
        (
            "SELECT count(*) FROM t WHERE abs(age) > 3",
            "functions are not allowed in WHERE ('ABS(age)'",
        ),
        ("SELECT count(*) FROM t WHERE age = NULL", "use IS NULL"),
        ("SELECT count(*) FROM t WHERE age > weight", "compared with a number or a string"),
        ("SELECT count(DISTINCT age) FROM t", "DISTINCT inside aggregates is not supported"),
        ("SELECT DISTINCT count(*) FROM t", "SELECT DISTINCT is not supported"),
        ("SELECT avg(age + 1) FROM t", "arguments must be plain field names, got 'age + 1'"),
        ("SELECT count(*) FROM t HAVING count(*) > 5", "HAVING is not supported"),
        ("SELECT count(*) FROM t GROUP BY 1", "GROUP BY accepts only field names, got '1'"),
        ("SELECT lm('y ~ x1 * x2') FROM t", "formula must be 'y ~ x1 + x2 + ...'"),
        ("SELECT histogram(age) FROM t", "histogram edges must be at least two"),
        ("SELECT quantile(age, 1.5) FROM t", "quantile probabilities must be in [0, 1]"),
        ("SELECT corr(age) FROM t", "corr takes exactly 2 fields, got 1"),
        ("SELECT count(*) FROM s.t", "without a schema prefix"),
        ("SELECT count(*) FROM t WHERE age IS TRUE", "only IS NULL / IS NOT NULL"),
        ("SELECT count(*) AS a, sum(age) AS a FROM t", "duplicate output names ['a']"),
        ("SELECT count(* FROM t", "could not parse SQL"),
        ("SELECT regress(y) FROM t", "regression takes at least 2 fields, got 1"),
    ],
)
def test_refusals_name_the_problem(sql, message):
    """Anything outside SELECT-aggregates-FROM-WHERE-GROUP BY is refused with a message
    naming the offending part."""
    with pytest.raises(QueryError) as err:
        parse_sql(sql)
    assert message in str(err.value)


def test_spec_round_trips_through_json():
    """to_dict → JSON → from_dict gives back an equal spec, filter tree included."""
    spec = parse_sql(
        "SELECT target, quantile(age, 0.1, 0.9), histogram(age, 0, 50, 100), "
        "lm('updrs_change ~ age') FROM t WHERE NOT (age BETWEEN 20 AND 30 OR target IN ('STN')) "
        "AND vta IS NULL GROUP BY target"
    )
    assert QuerySpec.from_dict(json.loads(json.dumps(spec.to_dict()))) == spec


@pytest.mark.parametrize(
    ("patch", "message"),
    [
        ({"extra": 1}, "unknown keys in query: ['extra']"),
        ({"where": {"op": "~", "field": "age", "value": 1}}, "unknown filter operator '~'"),
        ({"where": {"op": "=", "field": "age", "value": 1, "x": 2}}, "unknown keys in '=' filter"),
        (
            {"where": {"op": "=", "field": "age", "value": True}},
            "filter value must be a finite number",
        ),
        ({"where": {"op": "and", "args": [{"op": "is_null", "field": "a"}]}}, "at least two"),
        (
            {"aggregates": [{"func": "mode", "fields": ["age"], "name": "m"}]},
            "unknown aggregate function 'mode'",
        ),
        (
            {"aggregates": [{"func": "sum", "fields": ["age"], "name": "s", "weights": []}]},
            "unknown keys in aggregate: ['weights']",
        ),
        ({"aggregates": []}, "at least one aggregate"),
    ],
)
def test_from_dict_is_strict(patch, message):
    """from_dict refuses unknown keys, operators, functions and ill-typed values."""
    d = parse_sql("SELECT count(*) FROM t").to_dict() | patch
    with pytest.raises(QueryError) as err:
        QuerySpec.from_dict(d)
    assert message in str(err.value)


@pytest.mark.parametrize(
    ("sql", "message"),
    [
        ("SELECT avg(weight) FROM t", "unknown field 'weight' in avg(weight)"),
        ("SELECT count(*) FROM t WHERE bmi > 3", "unknown field 'bmi' in WHERE"),
        ("SELECT avg(target) FROM t", "mean needs numeric fields; 'target' is categorical"),
        ("SELECT age, count(*) FROM t GROUP BY age", "cannot GROUP BY 'age'"),
        ("SELECT count(*) FROM t WHERE age = 'old'", "comparison type mismatch, 'age' is numeric"),
        ("SELECT count(*) FROM t WHERE target > 'STN'", "ordering comparison '>'"),
        ("SELECT count(*) FROM t WHERE target BETWEEN 1 AND 2", "BETWEEN needs a numeric field"),
        ("SELECT count(*) FROM t WHERE sid = 'p01'", "id fields only support IS [NOT] NULL"),
        ("SELECT count(*) FROM t WHERE vta = 'a.nii'", "image fields only support IS [NOT] NULL"),
        ("SELECT median(unbounded) FROM t", "quantiles need declared bounds on 'unbounded'"),
        ("SELECT count_map(age) FROM t", "count_map needs an image field; 'age' is numeric"),
        ("SELECT mean_map(vta, target) FROM t", "weight must be numeric; 'target' is categorical"),
        ("SELECT contingency(target, age) FROM t", "contingency needs categorical fields"),
    ],
)
def test_validate_names_field_and_rule(sql, message):
    """validate() refuses a spec that does not fit the catalog, naming field and rule."""
    with pytest.raises(QueryError) as err:
        validate(parse_sql(sql), FIELDS)
    assert message in str(err.value)


def test_validate_accepts_a_fitting_query():
    """A query that respects every field's type passes validation."""
    validate(
        parse_sql(
            "SELECT target, count(*), avg(age), median(age), mean_map(vta, age) FROM t "
            "WHERE target IN ('STN', 1) AND age BETWEEN 40 AND 70 AND vta IS NOT NULL "
            "GROUP BY target"
        ),
        FIELDS,
    )


@pytest.mark.parametrize("where, problem", [
    ("NOT " * 64 + "age = 1", "filter nests more than 64 levels deep"),
    ("NOT " * 3000 + "age = 1", "could not parse SQL: it nests too deeply"),
    ("(" * 3000 + "age = 1" + ")" * 3000, "could not parse SQL: it nests too deeply"),
])
def test_deeply_nested_filters_are_refused_by_name(where: str, problem: str) -> None:
    """Every layer of a filter is a recursion when it is parsed, checked and evaluated: a
    filter deeper than MAX_FILTER_DEPTH is refused saying so, never a RecursionError — from
    SQL, from a spec (what a site reads from a signed job), or a signed payload itself."""
    from stimnet.errors import InvalidRequest
    from stimnet.query.spec import MAX_FILTER_DEPTH
    from stimnet.signing import JobRequest

    with pytest.raises(QueryError, match=problem):
        parse_sql(f"SELECT count(*) FROM c WHERE {where}")
    ok = parse_sql("SELECT count(*) FROM c WHERE " + "NOT " * (MAX_FILTER_DEPTH - 1) + "age = 1")
    deep = ok.to_dict()
    deep["where"] = {"op": "not", "arg": deep["where"]}
    with pytest.raises(QueryError, match="filter nests more than 64 levels deep"):
        QuerySpec.from_dict(deep)
    with pytest.raises(InvalidRequest, match="signed job payload nests too deeply to read"):
        JobRequest.from_payload(b"[" * 100_000 + b"]" * 100_000)


def test_what_one_query_may_ask_for_is_bounded() -> None:
    """A signed job of 256 KiB could otherwise ask a site for thousands of aggregates, a
    regression on thousands of fields, millions of histogram bins or of declared-level
    group cells (all of which are computed, and with DP noised); each limit is named."""
    from stimnet.query.spec import (
        MAX_AGGREGATE_FIELDS,
        MAX_AGGREGATES,
        MAX_GROUP_CELLS,
        MAX_GROUP_FIELDS,
        MAX_PARAMS,
        validate,
    )

    many = ", ".join(f"sum(x) AS s{i}" for i in range(MAX_AGGREGATES + 1))
    with pytest.raises(QueryError, match=f"at most {MAX_AGGREGATES} aggregates"):
        parse_sql(f"SELECT {many} FROM t")
    xs = ", ".join(f"x{i}" for i in range(MAX_AGGREGATE_FIELDS))
    with pytest.raises(QueryError, match=f"at most {MAX_AGGREGATE_FIELDS} fields per aggregate"):
        parse_sql(f"SELECT regress(y, {xs}) FROM t")
    edges = ", ".join(str(i) for i in range(MAX_PARAMS + 1))
    with pytest.raises(QueryError, match=f"at most {MAX_PARAMS} histogram edges"):
        parse_sql(f"SELECT histogram(x, {edges}) FROM t")
    groups = ", ".join(f"g{i}" for i in range(MAX_GROUP_FIELDS + 1))
    with pytest.raises(QueryError, match=f"GROUP BY takes at most {MAX_GROUP_FIELDS} fields"):
        parse_sql(f"SELECT {groups}, count(*) FROM t GROUP BY {groups}")
    # Declared levels: every combination is computed, so their product is what counts.
    levels = tuple(f"l{i}" for i in range(101))
    fields = {g: categorical(g, levels=levels) for g in ("a", "b")}
    spec = parse_sql("SELECT a, b, count(*) FROM t GROUP BY a, b")
    with pytest.raises(QueryError, match=f"makes 10201 groups of declared levels; at most "
                                         f"{MAX_GROUP_CELLS}"):
        validate(spec, fields)
    validate(parse_sql("SELECT a, count(*) FROM t GROUP BY a"), fields)
