"""A script job's declared outputs: what a site accepts as a declaration, and that a
script's result must be exactly what was declared (no Docker: results as the runtime
writes them, through the real parser)."""

from __future__ import annotations

import copy
from types import SimpleNamespace
from typing import Any

import pytest

from stimnet.errors import QueryError
from stimnet.query.sql import parse_sql
from stimnetd.jobs.scripts import declared_spec
from stimnetd.sandbox import ResultRejected, check_declared, parse_result
from tests.sandbox.test_result import FIELDS, ROWS, valid_arrays, valid_doc

CATALOG = SimpleNamespace(name="c", fields=FIELDS)
# One output of each kind, as valid_doc's script emits them.
DECLARED = {"n": "count(*)", "mean_age": "avg(age)", "age_hist": "histogram(age, 18, 35, 60)",
            "reg": "lm('updrs ~ age')", "tab": "contingency(target, side)",
            "vmap": "mean_map(vta, updrs)"}


def _declaring(**changes: str) -> str:
    outputs = {**DECLARED, **changes}
    return f"SELECT {', '.join(f'{d} AS {name}' for name, d in outputs.items())} FROM c"


EVERY_KIND = _declaring()


def _doc(*, drop: tuple[str, ...] = (), **changes: Any) -> dict[str, Any]:
    """valid_doc's ungrouped outputs, one of each kind; `changes` edits an output's meta."""
    doc = valid_doc()
    doc["aggregates"] = [a for a in doc["aggregates"] if not a.get("group")
                         and a["name"] not in drop]
    for agg in doc["aggregates"]:
        agg["meta"] = {**agg.get("meta", {}), **changes.get(agg["name"], {})}
    return doc


def _check(sql: str, doc: dict[str, Any]) -> None:
    spec = declared_spec(parse_sql(sql).to_dict(), CATALOG)  # type: ignore[arg-type]
    check_declared(parse_result(doc, valid_arrays(), FIELDS, ROWS), spec, FIELDS)


def test_a_result_that_is_exactly_the_declaration_passes() -> None:
    """One output of each kind, each as declared, passes check_declared."""
    _check(EVERY_KIND, _doc())


@pytest.mark.parametrize("doc, problem", [
    (_doc(drop=("tab",)), "output 'tab': declared by the job but not emitted"),
    (_doc(age_hist={"edges": [18, 36, 60]}),
     r"output 'age_hist': the script emitted something other than the declared "
     r"histogram\(age\) edges \[18.0, 35.0, 60.0\]$"),
    (_doc(mean_age={"stat": "sd"}), r"output 'mean_age': .* the declared mean\(age\)$"),
    (_doc(reg={"purpose": "corr"}), r"output 'reg': .* the declared regression\(updrs, age\)$"),
])
def test_anything_else_is_refused_naming_the_output(doc: dict[str, Any], problem: str) -> None:
    """The message names the declaration and the rule, never what the script emitted."""
    with pytest.raises(ResultRejected, match=problem) as info:
        _check(EVERY_KIND, doc)
    assert "36" not in str(info.value)
    assert "sd" not in str(info.value)


@pytest.mark.parametrize("name, declared, shown", [
    ("reg", "lm('age ~ updrs')", r"regression\(age, updrs\)"),
    ("vmap", "count_map(vta)", r"count_map\(vta\)"),
    ("age_hist", "histogram(age, 18, 35)", r"histogram\(age\) edges \[18.0, 35.0\]"),
])
def test_a_declaration_differing_in_fields_or_function_is_held_to(name: str, declared: str,
                                                                  shown: str) -> None:
    """A declaration naming other fields, another function or other edges than the result
    refuses that result, showing the declared form."""
    with pytest.raises(ResultRejected, match=f"output '{name}': the script emitted something "
                                             f"other than the declared {shown}$"):
        _check(_declaring(**{name: declared}), _doc())


def test_an_undeclared_output_is_refused() -> None:
    """An output the job did not declare is refused without echoing its name."""
    doc = _doc()
    extra = copy.deepcopy(doc["aggregates"][0])
    extra["name"] = "subject_17"
    doc["aggregates"].append(extra)
    with pytest.raises(ResultRejected, match="the script emitted an output its job did not "
                                             "declare") as info:
        _check(EVERY_KIND, doc)
    assert "subject_17" not in str(info.value)  # a name the script chose: never echoed


def _counts(*levels: str | None) -> dict[str, Any]:
    aggs = []
    for level in levels:
        agg: dict[str, Any] = {"kind": "count", "name": "n", "n": 2, "stats": {"n": [2]}}
        if level is not None:
            agg["group"] = [["target", level]]
        aggs.append(agg)
    return {"version": 1, "aggregates": aggs}


def test_a_grouped_output_covers_every_declared_level_and_nothing_else() -> None:
    """Which groups a script emits would be a bit each: all or nothing."""
    grouped = "SELECT count(*) AS n FROM c GROUP BY target"
    _check(grouped, _counts("STN", "GPi"))
    with pytest.raises(ResultRejected, match=r"output 'n': not every one of its 2 declared "
                                             r"group\(s\) emitted"):
        _check(grouped, _counts("STN"))
    with pytest.raises(ResultRejected, match="output 'n': the script emitted a group other than "
                                             "those of the declared GROUP BY target"):
        _check(grouped, _counts("STN", "GPi", None))
    with pytest.raises(ResultRejected, match=r"GROUP BY \(none\)"):
        _check("SELECT count(*) AS n FROM c", _counts("STN"))


@pytest.mark.parametrize("sql, problem", [
    ("SELECT count(*) AS n FROM c WHERE age > 40", "have no WHERE"),
    ("SELECT median(age) AS m FROM c", "output 'm': a script cannot emit quantiles"),
    ("SELECT count(age) AS n FROM c", r"a script's count is count\(\*\)"),
    ("SELECT count(*) AS n FROM c GROUP BY note", "GROUP BY 'note': a script's groups are its "
                                                  "fields' declared levels"),
    ("SELECT count(*) AS n FROM other", "name catalog 'other', the job 'c'"),
    ("SELECT avg(nope) AS m FROM c", "nope"),
])
def test_unusable_declarations_are_refused_before_the_script_runs(sql: str, problem: str) -> None:
    """A declaration a script could not meet is a QueryError from declared_spec."""
    with pytest.raises(QueryError, match=problem):
        declared_spec(parse_sql(sql).to_dict(), CATALOG)  # type: ignore[arg-type]


def test_a_declaration_that_is_not_a_spec_is_refused() -> None:
    """A declaration that is not a query spec object is refused by name."""
    with pytest.raises(QueryError, match="must be a query spec"):
        declared_spec(["count"], CATALOG)  # type: ignore[arg-type]
