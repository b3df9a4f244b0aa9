"""The declarative query: a cohort filter, an optional group-by, and aggregates.

Every site receives the same `QuerySpec` (from SQL via `sql.parse_sql`, or as JSON) and
re-validates it against its own catalog metadata with `validate`, because a site must
not trust the entry node to have checked it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from stimnet.errors import QueryError
from stimnet.numbers import finite_number
from stimnet.query.fields import FieldMeta
from stimnet.query.functions import FUNCS, IMAGE_FUNCS, MODEL_PREFIXES
from stimnet.query.voxeltests import check_options, options_from_dict

LiteralValue = int | float | str

COMPARISON_OPS = ("=", "!=", "<", "<=", ">", ">=")
NUMERIC_TYPES = ("numeric", "integer")


@dataclass(frozen=True)
class Comparison:
    op: str
    field: str
    value: LiteralValue


@dataclass(frozen=True)
class InList:
    field: str
    values: tuple[LiteralValue, ...]
    negated: bool = False


@dataclass(frozen=True)
class Between:
    field: str
    low: int | float
    high: int | float
    negated: bool = False


@dataclass(frozen=True)
class IsNull:
    field: str
    negated: bool = False


@dataclass(frozen=True)
class And:
    args: tuple[Expr, ...]


@dataclass(frozen=True)
class Or:
    args: tuple[Expr, ...]


@dataclass(frozen=True)
class Not:
    arg: Expr


Expr = Comparison | InList | Between | IsNull | And | Or | Not


@dataclass(frozen=True)
class AggSpec:
    """One output column. `fields` are positional per `func` (see FUNCS); `params` are
    histogram edges or quantile probabilities; `options` named settings (sorted (name,
    value) pairs, checked by voxeltests.check_options); `condition` prop_map's filter;
    `range` (SQL ``clamp(agg, lo, hi)``) a script output's, for sample-and-aggregate."""

    func: str
    fields: tuple[str, ...]
    name: str
    params: tuple[float, ...] = ()
    options: tuple[tuple[str, float | str], ...] = ()
    condition: Expr | None = None
    range: tuple[float, ...] | None = None

    def __post_init__(self) -> None:
        if self.range is not None and not (len(self.range) == 2 and self.range[0] < self.range[1]):
            raise QueryError(f"{self.name}: a declared range is two numbers, the lower first "
                             f"(clamp(agg, lo, hi) with lo < hi), got {list(self.range)}")
        shape = FUNCS.get(self.func)
        if shape is None:
            raise QueryError(f"unknown aggregate function {self.func!r}; known: {sorted(FUNCS)}")
        k = len(self.fields)
        if k > MAX_AGGREGATE_FIELDS:
            raise QueryError(f"{self.name}: at most {MAX_AGGREGATE_FIELDS} fields per aggregate "
                             f"(got {k})")
        if len(self.params) > MAX_PARAMS:
            raise QueryError(f"{self.name}: at most {MAX_PARAMS} histogram edges or quantile "
                             f"probabilities (got {len(self.params)})")
        if k < shape.min_fields or (shape.max_fields is not None and k > shape.max_fields):
            if shape.max_fields == shape.min_fields:
                want = f"exactly {shape.min_fields}"
            elif shape.max_fields is None:
                want = f"at least {shape.min_fields}"
            else:
                want = f"{shape.min_fields} to {shape.max_fields}"
            raise QueryError(f"{self.name}: {self.func} takes {want} fields, got {k}")
        if shape.params is None and self.params:
            raise QueryError(f"{self.name}: {self.func} takes no parameters")
        check_options(self.name, self.func, self.options, shape.options)
        if (self.condition is None) != (self.func != "prop_map"):
            raise QueryError(f"{self.name}: only prop_map takes a condition, and it needs one "
                             "(e.g. prop_map(vta, improvement_pct > 50))")
        if shape.params == "edges":
            e = self.params
            if len(e) < 2 or any(b <= a for a, b in zip(e, e[1:], strict=False)):
                raise QueryError(
                    f"{self.name}: histogram edges must be at least two strictly increasing numbers"
                )
        if shape.params == "maxit" and (
            len(self.params) > 1 or any(p != int(p) or not 1 <= p <= MAX_GLM_ITERATIONS
                                        for p in self.params)
        ):
            raise QueryError(f"{self.name}: the most IRLS iterations must be one whole number "
                             f"from 1 to {MAX_GLM_ITERATIONS}")
        if shape.params == "probs" and (
            not self.params or any(not 0 <= p <= 1 for p in self.params)
        ):
            raise QueryError(f"{self.name}: quantile probabilities must be in [0, 1]")


@dataclass(frozen=True)
class QuerySpec:
    catalog: str
    where: Expr | None
    group_by: tuple[str, ...]
    aggregates: tuple[AggSpec, ...]

    def __post_init__(self) -> None:
        _check_shape(self)

    @property
    def model(self) -> AggSpec | None:
        """The query's glm() or meta() output, or None for a query of aggregates."""
        a = self.aggregates[0]
        return a if a.func.startswith(MODEL_PREFIXES) else None

    def reads_images(self) -> bool:
        """Voxel maps and ROI statistics load NIfTI files: slow work, unlike table sums."""
        return any(a.func in IMAGE_FUNCS for a in self.aggregates)

    def to_dict(self) -> dict[str, Any]:
        return {
            "catalog": self.catalog,
            "where": None if self.where is None else expr_to_dict(self.where),
            "group_by": list(self.group_by),
            "aggregates": [_agg_to_dict(a) for a in self.aggregates],
        }

    @classmethod
    def from_dict(cls, d: Any) -> QuerySpec:
        _keys(d, "query", required={"catalog", "aggregates"}, optional={"where", "group_by"})
        catalog = _str(d["catalog"], "catalog")
        where = d.get("where")
        group_by = tuple(_str(g, "group_by item") for g in _list(d.get("group_by", []), "group_by"))
        aggs = []
        for a in _list(d["aggregates"], "aggregates"):
            _keys(a, "aggregate", required={"func", "fields", "name"},
                  optional={"params", "options", "condition", "range"})
            cond, b = a.get("condition"), a.get("range")
            aggs.append(
                AggSpec(
                    func=_str(a["func"], "func"),
                    fields=tuple(_str(f, "aggregate field") for f in _list(a["fields"], "fields")),
                    name=_str(a["name"], "name"),
                    params=tuple(_num(p, "param") for p in _list(a.get("params", []), "params")),
                    options=options_from_dict(a.get("options", {})),
                    condition=None if cond is None else expr_from_dict(cond),
                    range=None if b is None else tuple(_num(x, "range") for x in _list(b, "range")),
                )
            )
        return cls(catalog, None if where is None else expr_from_dict(where), group_by, tuple(aggs))


def _agg_to_dict(a: AggSpec) -> dict[str, Any]:
    d: dict[str, Any] = {"func": a.func, "fields": list(a.fields), "name": a.name,
                         "params": list(a.params)}
    if a.options:  # absent unless used, so specs without them keep their old form
        d["options"] = dict(a.options)
    if a.condition is not None:
        d["condition"] = expr_to_dict(a.condition)
    if a.range is not None:
        d["range"] = list(a.range)
    return d


def expr_to_dict(e: Expr) -> dict[str, Any]:
    if isinstance(e, Comparison):
        return {"op": e.op, "field": e.field, "value": e.value}
    if isinstance(e, InList):
        return {"op": "in", "field": e.field, "values": list(e.values), "negated": e.negated}
    if isinstance(e, Between):
        return {
            "op": "between",
            "field": e.field,
            "low": e.low,
            "high": e.high,
            "negated": e.negated,
        }
    if isinstance(e, IsNull):
        return {"op": "is_null", "field": e.field, "negated": e.negated}
    if isinstance(e, And | Or):
        return {
            "op": "and" if isinstance(e, And) else "or",
            "args": [expr_to_dict(a) for a in e.args],
        }
    return {"op": "not", "arg": expr_to_dict(e.arg)}


# Filters nest (AND/OR/NOT) at most this deep: every layer is a recursion in parsing,
# validation and evaluation, and a signed payload of 256 KiB could nest thousands deep.
MAX_FILTER_DEPTH = 64


def expr_from_dict(d: Any, depth: int = 1) -> Expr:
    if depth > MAX_FILTER_DEPTH:
        raise QueryError(f"filter nests more than {MAX_FILTER_DEPTH} levels deep")
    if not isinstance(d, Mapping) or "op" not in d:
        raise QueryError("filter expression must be an object with an 'op' key")
    op = d["op"]
    if op in COMPARISON_OPS:
        _keys(d, f"'{op}' filter", required={"op", "field", "value"})
        return Comparison(op, _str(d["field"], "field"), _literal(d["value"]))
    if op == "in":
        _keys(d, "'in' filter", required={"op", "field", "values"}, optional={"negated"})
        values = tuple(_literal(v) for v in _list(d["values"], "values"))
        if not values:
            raise QueryError("'in' filter needs at least one value")
        return InList(_str(d["field"], "field"), values, _bool(d.get("negated", False)))
    if op == "between":
        _keys(d, "'between' filter", required={"op", "field", "low", "high"}, optional={"negated"})
        return Between(
            _str(d["field"], "field"),
            _num(d["low"], "low"),
            _num(d["high"], "high"),
            _bool(d.get("negated", False)),
        )
    if op == "is_null":
        _keys(d, "'is_null' filter", required={"op", "field"}, optional={"negated"})
        return IsNull(_str(d["field"], "field"), _bool(d.get("negated", False)))
    if op in ("and", "or"):
        _keys(d, f"'{op}' filter", required={"op", "args"})
        args = tuple(expr_from_dict(a, depth + 1) for a in _list(d["args"], "args"))
        if len(args) < 2:
            raise QueryError(f"'{op}' filter needs at least two arguments")
        return And(args) if op == "and" else Or(args)
    if op == "not":
        _keys(d, "'not' filter", required={"op", "arg"})
        return Not(expr_from_dict(d["arg"], depth + 1))
    raise QueryError(f"unknown filter operator {op!r}")


def filter_fields(e: Expr | None) -> list[tuple[str, Expr]]:
    """Every (field, leaf) the filter touches, in order."""
    if e is None:
        return []
    if isinstance(e, And | Or):
        return [pair for a in e.args for pair in filter_fields(a)]
    if isinstance(e, Not):
        return filter_fields(e.arg)
    return [(e.field, e)]


# Which field types each aggregate accepts, per positional field.
_NUMERIC_FUNCS = {"sum", "mean", "var", "sd", "histogram", "quantiles", "corr", "regression",
                  "meta_mean", "meta_regression", "quantiles_bisect"}


def validate(spec: QuerySpec, fields: Mapping[str, FieldMeta]) -> None:
    """Raise QueryError naming the field and the rule if `spec` is wrong for `fields`."""

    def meta(name: str, where: str) -> FieldMeta:
        if name not in fields:
            raise QueryError(f"unknown field {name!r} in {where}")
        return fields[name]

    for g in spec.group_by:
        m = meta(g, "GROUP BY")
        if m.type != "categorical":
            raise QueryError(
                f"cannot GROUP BY {g!r}: only categorical fields can be grouped ({g!r} is {m.type})"
            )
    levels = [len(fields[g].levels or ()) for g in spec.group_by]
    if spec.group_by and all(levels) and math.prod(levels) > MAX_GROUP_CELLS:
        # Every declared combination is computed and sent (empty ones too: engine._groups).
        raise QueryError(f"GROUP BY {', '.join(spec.group_by)} makes {math.prod(levels)} "
                         f"groups of declared levels; at most {MAX_GROUP_CELLS}")
    for name, leaf in filter_fields(spec.where):
        _validate_leaf(meta(name, "WHERE"), leaf)
    for a in spec.aggregates:
        metas = [meta(f, a.name) for f in a.fields]
        _validate_agg(a, metas)
        for name, leaf in filter_fields(a.condition):
            _validate_leaf(meta(name, f"{a.name}'s condition"), leaf)


def _validate_leaf(m: FieldMeta, leaf: Expr) -> None:
    if isinstance(leaf, IsNull):
        return
    if m.type in ("image", "id"):
        # Filtering on identifiers singles out subjects; image paths are not values.
        raise QueryError(f"WHERE on {m.name!r}: {m.type} fields only support IS [NOT] NULL")
    numeric = m.type in NUMERIC_TYPES
    if isinstance(leaf, Comparison):
        values: tuple[LiteralValue, ...] = (leaf.value,)
        if not numeric and leaf.op not in ("=", "!="):
            raise QueryError(
                f"WHERE on {m.name!r}: ordering comparison '{leaf.op}' is not defined "
                "for a categorical field"
            )
    elif isinstance(leaf, InList):
        values = leaf.values
    elif isinstance(leaf, Between):
        if not numeric:
            raise QueryError(f"WHERE on {m.name!r}: BETWEEN needs a numeric field")
        values = (leaf.low, leaf.high)
    else:  # pragma: no cover - filter_fields yields only leaves
        raise QueryError(f"unexpected filter node {leaf!r}")
    if numeric and any(isinstance(v, str) for v in values):
        raise QueryError(
            f"WHERE on {m.name!r}: comparison type mismatch, {m.name!r} is {m.type} "
            "but is compared with a string"
        )


def _validate_agg(a: AggSpec, metas: list[FieldMeta]) -> None:
    def need(m: FieldMeta, types: tuple[str, ...], rule: str) -> None:
        if m.type not in types:
            raise QueryError(f"{a.name}: {rule}; {m.name!r} is {m.type}")

    if a.func in _NUMERIC_FUNCS:
        for m in metas:
            need(m, NUMERIC_TYPES, f"{a.func} needs numeric fields")
        if a.func in ("quantiles", "quantiles_bisect") and metas[0].bounds is None:
            raise QueryError(
                f"{a.name}: quantiles need declared bounds on {metas[0].name!r} "
                "(they are estimated from a fine histogram over those bounds)"
            )
    elif a.func == "contingency":
        for m in metas:
            need(m, ("categorical",), "contingency needs categorical fields")
    elif a.func.startswith(MODEL_PREFIXES) and a.func != "meta_mean" \
            and a.func != "meta_regression":
        for m in metas:
            need(m, (*NUMERIC_TYPES, "categorical"), f"{a.func} needs numeric or categorical "
                 "fields")
            if m.type == "categorical" and not m.levels:
                raise QueryError(f"{a.name}: categorical {m.name!r} needs declared levels "
                                 "(its first is the reference level)")
        if metas[0].type == "categorical" and len(metas[0].levels or ()) != 2:
            raise QueryError(f"{a.name}: a categorical response needs two declared levels; "
                             f"{metas[0].name!r} declares {len(metas[0].levels or ())}")
    elif a.func in IMAGE_FUNCS:
        need(metas[0], ("image",), f"{a.func} needs an image field")
        for m in metas[1:]:
            need(m, NUMERIC_TYPES, f"the {a.func} weight must be numeric")
        if a.func == "corr_map" and not metas[0].continuous:
            raise QueryError(f"{a.name}: corr_map needs a continuous image field (declared "
                             f"continuous, with value bounds); {metas[0].name!r} is a mask")
        if a.func == "mean_map" and metas[0].continuous and len(metas) > 1:
            raise QueryError(f"{a.name}: mean_map of the continuous image {metas[0].name!r} "
                             "is its mean value per voxel and takes no weight (corr_map "
                             "relates it to an outcome)")


# R's glm.control default is 25; a signed job declares its own bound (its rounds).
MAX_GLM_ITERATIONS = 100


# What one query may ask a site to compute (and, with DP, to add noise to): bounded so a
# signed job of 256 KiB cannot ask for millions of cells, a 5,000-field regression or
# thousands of aggregates.
MAX_AGGREGATES = 64
MAX_AGGREGATE_FIELDS = 64
MAX_PARAMS = 10_001
MAX_GROUP_FIELDS = 16
MAX_GROUP_CELLS = 10_000


def _check_shape(spec: QuerySpec) -> None:
    if not spec.aggregates:
        raise QueryError("a query needs at least one aggregate")
    models = [a for a in spec.aggregates if a.func.startswith(MODEL_PREFIXES)]
    if models and (len(spec.aggregates) > 1 or spec.group_by):
        raise QueryError(f"{models[0].name}: a glm() or meta() model is the only output of its "
                         "query, without GROUP BY (filter the cohort with WHERE)")
    if len(spec.aggregates) > MAX_AGGREGATES:
        raise QueryError(f"a query computes at most {MAX_AGGREGATES} aggregates "
                         f"(got {len(spec.aggregates)})")
    if len(spec.group_by) > MAX_GROUP_FIELDS:
        raise QueryError(f"GROUP BY takes at most {MAX_GROUP_FIELDS} fields "
                         f"(got {len(spec.group_by)})")
    names = [a.name for a in spec.aggregates]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise QueryError(f"duplicate output names {dup}; give each aggregate its own alias")
    if len(set(spec.group_by)) != len(spec.group_by):
        raise QueryError("a field appears twice in GROUP BY")


def _keys(
    d: Any, what: str, required: set[str], optional: frozenset[str] | set[str] = frozenset()
) -> None:
    if not isinstance(d, Mapping):
        raise QueryError(f"{what} must be an object")
    unknown = set(d) - required - set(optional)
    if unknown:
        raise QueryError(f"unknown keys in {what}: {sorted(unknown)}")
    missing = required - set(d)
    if missing:
        raise QueryError(f"missing keys in {what}: {sorted(missing)}")


def _list(v: Any, what: str) -> list[Any]:
    if not isinstance(v, list | tuple):
        raise QueryError(f"{what} must be a list")
    return list(v)


def _str(v: Any, what: str) -> str:
    if not isinstance(v, str) or not v:
        raise QueryError(f"{what} must be a non-empty string")
    return v


def _bool(v: Any) -> bool:
    if not isinstance(v, bool):
        raise QueryError("'negated' must be true or false")
    return v


def _num(v: Any, what: str) -> int | float:
    if not finite_number(v):
        raise QueryError(f"{what} must be a finite number, within about ±1.8e308")
    return v


def _literal(v: Any) -> LiteralValue:
    if isinstance(v, str):
        return v
    return _num(v, "filter value")
