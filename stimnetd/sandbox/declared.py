"""Holds a script's parsed result to the outputs its job declared.

What a script emits (its outputs' names, kinds, fields, histogram edges, and which
groups) would otherwise be chosen by the script at run time and leave the site even
where the values are withheld: a channel past k_min and DP. So a script job declares its
outputs in the signed request, and the site releases only a result that is exactly that
declaration: every declared output, nothing else, each with its declared function,
fields and edges, and for a grouped one every combination of the group fields' declared
levels (empty groups included, so which groups exist says nothing).

`stimnetd.jobs.scripts.declared_spec` checks the declaration itself before the script
runs; `parse_result` (in `result`) has already checked the result's values.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping
from typing import Any

from stimnet.query.fields import FieldMeta
from stimnet.query.spec import AggSpec, QuerySpec
from stimnetd.query.aggregate import GroupKey, Partial
from stimnetd.sandbox.result import ResultRejected


def check_declared(partials: list[Partial], spec: QuerySpec,
                   fields: Mapping[str, FieldMeta]) -> None:
    """Refuse (ResultRejected) a script result that is not exactly what its job declared.

    As parse_result's, these messages reach the researcher and quote nothing the script
    chose (a name it made up, its edges, which groups it emitted or how many): only the
    declaration and the rule."""
    wanted = {a.name: a for a in spec.aggregates}
    cells = set(itertools.product(*[[(f, lv) for lv in (fields[f].levels or ())]
                                    for f in sorted(spec.group_by)]))
    seen: dict[str, set[GroupKey]] = {}
    for p in partials:
        declared = wanted.get(p.name)
        if declared is None:
            raise ResultRejected(f"the script emitted an output its job did not declare (it "
                                 f"declared {', '.join(repr(n) for n in wanted)})")
        got = agg_spec(p)
        if got is None or (got.func, got.fields, _edges(got.params)) != \
                (declared.func, declared.fields, _edges(declared.params)):
            raise ResultRejected(f"output {p.name!r}: the script emitted something other than "
                                 f"the declared {_show(declared)}")
        if p.group not in cells:
            raise ResultRejected(f"output {p.name!r}: the script emitted a group other than "
                                 "those of the declared GROUP BY "
                                 f"{', '.join(spec.group_by) or '(none)'}")
        seen.setdefault(p.name, set()).add(p.group)
    for name in wanted:
        if seen.get(name, set()) != cells:
            raise ResultRejected(f"output {name!r}: not every one of its {len(cells)} declared "
                                 "group(s) emitted (a grouped output covers every level "
                                 "combination, empty ones included)" if spec.group_by else
                                 f"output {name!r}: declared by the job but not emitted")


def agg_spec(p: Partial) -> AggSpec | None:
    """The query aggregate a script's partial corresponds to; None for a kind no query
    aggregate presents (parse_result admits none such)."""
    m: dict[str, Any] = p.meta
    func = m.get("func", p.kind)
    if p.kind == "count":
        return AggSpec("count", (), p.name)
    if p.kind == "moments":
        return AggSpec(func, (m["field"],), p.name)
    if p.kind == "histogram":
        return AggSpec("histogram", (m["field"],), p.name, tuple(m["edges"]))
    if p.kind == "crossprod":
        names = tuple(m["fields"])
        if func == "regression":
            return AggSpec("regression", (names[-1], *names[:-1]), p.name)
        return AggSpec("corr", names, p.name)
    if p.kind == "contingency":
        return AggSpec("contingency", tuple(m["fields"]), p.name)
    if p.kind == "voxel_map":
        fields = (m["column"],) + ((m["weight"],) if m.get("weight") else ())
        return AggSpec(func, fields, p.name)
    return None


def _edges(params: tuple[float, ...]) -> tuple[float, ...]:
    return tuple(float(v) for v in params)


def _show(agg: AggSpec) -> str:
    edges = f" edges {list(_edges(agg.params))}" if agg.params else ""
    return f"{agg.func}({', '.join(agg.fields) or '*'}){edges}"
