"""Restricted SQL → `QuerySpec`.

Only `SELECT <group fields and aggregates> FROM <catalog> [WHERE ...] [GROUP BY ...]` is
accepted. sqlglot does the tokenising and parsing (hand-written parsing of researcher SQL
is an attack surface); this module walks the tree with an allow-list and refuses
everything else with a message that names the offending part.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable

import sqlglot
from sqlglot import exp
from sqlglot.dialects.postgres import Postgres
from sqlglot.errors import SqlglotError

from stimnet.errors import QueryError
from stimnet.query.spec import (
    AggSpec,
    And,
    Between,
    Comparison,
    Expr,
    InList,
    IsNull,
    LiteralValue,
    Not,
    Or,
    QuerySpec,
    expr_from_dict,
    expr_to_dict,
)
from stimnet.query.voxeltests import VOXEL_TESTS

# SQL spelling → AggSpec.func
SQL_FUNCS: dict[str, str] = {
    "count": "count",
    "sum": "sum",
    "avg": "mean",
    "mean": "mean",
    "variance": "var",
    "var_samp": "var",
    "var": "var",
    "stddev": "sd",
    "stddev_samp": "sd",
    "sd": "sd",
    "histogram": "histogram",
    "quantile": "quantiles",
    "median": "quantiles",
    "corr": "corr",
    "contingency": "contingency",
    "regress": "regression",
    "lm": "regression",
    "count_map": "count_map",
    "mean_map": "mean_map",
    "roi_overlap": "roi_overlap",
    "glm": "glm",
    "meta": "meta",
    "quantile_exact": "quantiles_bisect",
    "tmap": "tmap",
    "tmap2": "tmap2",
    "prop_map": "prop_map",
    "corr_map": "corr_map",
    # clamp(agg, lo, hi): a script output's declared range (AggSpec.range).
    "clamp": "clamp",
}
GLM_FAMILIES = ("binomial", "poisson", "gaussian")
# meta(...) of these: each site's own estimate, pooled across sites (models.py).
_META_OF = {"mean": "meta_mean", "regression": "meta_regression"}


class _Dialect(Postgres):
    # A dialect's Parser is a class attribute subclassed in place: sqlglot's documented
    # extension point, which mypy cannot type.
    class Parser(Postgres.Parser):  # type: ignore[misc,valid-type]
        # Parse our aggregate names as anonymous functions: sqlglot's typed nodes fix the
        # arity (quantile takes one probability) and forget the spelling (var_samp ->
        # VARIANCE), and we need both for validation and default output names.
        FUNCTIONS = {
            k: v for k, v in Postgres.Parser.FUNCTIONS.items() if k.lower() not in SQL_FUNCS
        }


_CLAUSES_ALLOWED = {"expressions", "from", "from_", "where", "group"}
_CLAUSE_REFUSALS = {
    "with": "WITH (common table expressions) is not supported",
    "with_": "WITH (common table expressions) is not supported",
    "joins": "JOIN is not supported: a query reads exactly one catalog",
    "order": "ORDER BY is not supported (and not needed: the result is a small aggregate table)",
    "limit": "LIMIT is not supported (and not needed: the result is a small aggregate table)",
    "offset": "OFFSET is not supported (and not needed: the result is a small aggregate table)",
    "having": "HAVING is not supported; filter rows with WHERE",
    "distinct": "SELECT DISTINCT is not supported; use GROUP BY",
}
_COMPARISONS: dict[type[exp.Expression], str] = {
    exp.EQ: "=",
    exp.NEQ: "!=",
    exp.LT: "<",
    exp.LTE: "<=",
    exp.GT: ">",
    exp.GTE: ">=",
}
_FLIPPED = {"=": "=", "!=": "!=", "<": ">", "<=": ">=", ">": "<", ">=": "<="}
_IDENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def parse_sql(sql: str) -> QuerySpec:
    try:
        statements = [s for s in sqlglot.parse(sql, read=_Dialect) if s is not None]
    except SqlglotError as e:
        raise QueryError(f"could not parse SQL: {str(e).splitlines()[0]}") from None
    except RecursionError:
        raise QueryError("could not parse SQL: it nests too deeply") from None
    if len(statements) != 1:
        raise QueryError(f"expected exactly one SELECT statement, got {len(statements)}")
    stmt = statements[0]
    if isinstance(stmt, exp.Union | exp.Intersect | exp.Except):
        raise QueryError(f"{stmt.key.upper()} is not supported: a query is a single SELECT")
    if not isinstance(stmt, exp.Select):
        raise QueryError(f"only SELECT queries are accepted, not {stmt.key.upper()}")
    for key, value in stmt.args.items():
        if value and key not in _CLAUSES_ALLOWED:
            raise QueryError(
                _CLAUSE_REFUSALS.get(key, f"the {key.upper()} clause is not supported")
            )
    for node in stmt.walk():
        if node is not stmt and isinstance(node, exp.Select | exp.Subquery):
            raise QueryError(f"subqueries are not supported: {node.sql()!r}")
        if isinstance(node, exp.Window):
            raise QueryError(f"window functions (OVER) are not supported: {node.sql()!r}")

    catalog = _catalog(stmt.args.get("from_") or stmt.args.get("from"))
    group = stmt.args.get("group")
    group_by = tuple(_group_field(g, catalog) for g in (group.expressions if group else []))
    aggs = []
    for item in stmt.expressions:
        node, alias = (item.this, item.alias) if isinstance(item, exp.Alias) else (item, None)
        if isinstance(node, exp.Star):
            raise QueryError("SELECT * is not supported: list group fields and aggregates")
        if isinstance(node, exp.Column):
            name = _field(node, catalog)
            if name not in group_by:
                raise QueryError(
                    f"column {name!r} in SELECT must appear in GROUP BY or inside an aggregate"
                )
            continue
        aggs.append(_aggregate(node, alias, catalog))
    if not aggs:
        raise QueryError("no aggregate in SELECT: a query must compute at least one, e.g. count(*)")
    where = stmt.args.get("where")
    try:
        # The same rules as a spec arriving at a site (nesting depth among them).
        where_expr = expr_from_dict(expr_to_dict(_filter(where.this, catalog))) if where else None
    except RecursionError:
        raise QueryError("could not parse SQL: its WHERE clause nests too deeply") from None
    return QuerySpec(
        catalog=catalog,
        where=where_expr,
        group_by=group_by,
        aggregates=tuple(aggs),
    )


def _catalog(from_: exp.Expression | None) -> str:
    if from_ is None:
        raise QueryError("missing FROM <catalog>")
    table = from_.this
    if not isinstance(table, exp.Table) or not isinstance(table.this, exp.Identifier):
        raise QueryError(f"FROM must name one catalog, got {table.sql()!r}")
    if table.args.get("db") or table.args.get("catalog"):
        raise QueryError(f"FROM must name a catalog without a schema prefix, got {table.sql()!r}")
    if table.alias:
        raise QueryError("table aliases are not supported: there is only one catalog")
    return str(table.name)


def _field(col: exp.Column, catalog: str) -> str:
    if col.table and col.table != catalog:
        raise QueryError(f"column {col.sql()!r} refers to a table other than {catalog!r}")
    if col.args.get("db") or col.args.get("catalog"):
        raise QueryError(f"column {col.sql()!r}: only field names are accepted")
    return str(col.name)


def _group_field(node: exp.Expression, catalog: str) -> str:
    if not isinstance(node, exp.Column):
        raise QueryError(f"GROUP BY accepts only field names, got {node.sql()!r}")
    return _field(node, catalog)


def _aggregate(node: exp.Expression, alias: str | None, catalog: str) -> AggSpec:
    if isinstance(node, exp.Filter):
        raise QueryError(f"aggregate FILTER clauses are not supported: {node.sql()!r}")
    if not isinstance(node, exp.Anonymous):
        if isinstance(node, exp.Func):
            fname = node.sql_name().lower()
            raise QueryError(f"unknown function {fname!r}; supported: {sorted(SQL_FUNCS)}")
        raise QueryError(f"unsupported expression in SELECT: {node.sql()!r}")
    written = str(node.this).lower()
    func = SQL_FUNCS.get(written)
    if func is None:
        raise QueryError(f"unknown function {written!r}; supported: {sorted(SQL_FUNCS)}")
    args = list(node.expressions)
    name = alias or f"{written}({', '.join(a.sql() for a in args)})"
    if any(isinstance(a, exp.Distinct) for a in args):
        raise QueryError(f"{name}: DISTINCT inside aggregates is not supported")

    def fields(items: list[exp.Expression]) -> tuple[str, ...]:
        out = []
        for a in items:
            if not isinstance(a, exp.Column):
                raise QueryError(f"{name}: arguments must be plain field names, got {a.sql()!r}")
            out.append(_field(a, catalog))
        return tuple(out)

    if written == "clamp":
        return _clamp(args, alias, catalog)
    if written == "count" and len(args) == 1 and isinstance(args[0], exp.Star):
        return AggSpec("count", (), name)
    if written == "lm":
        if len(args) != 1 or not (isinstance(args[0], exp.Literal) and args[0].is_string):
            raise QueryError(f"{name}: lm takes one formula string, e.g. lm('y ~ x1 + x2')")
        return AggSpec("regression", _formula(str(args[0].this), name), name)
    if written == "glm":
        return _glm(args, name)
    if written == "meta":
        if len(args) != 1:
            raise QueryError(f"{name}: meta takes one aggregate, e.g. meta(avg(x)), "
                             "meta(regress(y, x)) or meta(glm('y ~ x', 'binomial'))")
        inner = _aggregate(args[0], None, catalog)
        func = _META_OF.get(inner.func) or (
            f"meta_{inner.func}" if inner.func.startswith("glm_") else None)
        if func is None:
            raise QueryError(f"{name}: meta() pools avg, regress/lm or glm, not {inner.func}")
        return AggSpec(func, inner.fields, name, inner.params)
    if func in VOXEL_TESTS:
        return _voxel_test(func, args, name, catalog, fields)
    if written == "median":
        return AggSpec("quantiles", fields(args), name, (0.5,))
    if func in ("histogram", "quantiles", "quantiles_bisect"):
        if not args:
            raise QueryError(f"{name}: {written} needs a field")
        params = tuple(_number(a, name) for a in args[1:])
        return AggSpec(func, fields(args[:1]), name, params)
    return AggSpec(func, fields(args), name)


def _clamp(args: list[exp.Expression], alias: str | None, catalog: str) -> AggSpec:
    """clamp(aggregate, lo, hi): the aggregate, declared with the range [lo, hi]."""
    if len(args) != 3:
        raise QueryError("clamp takes an aggregate and its range, e.g. "
                         "clamp(avg(age), 18, 100) AS mean_age")
    inner = _aggregate(args[0], alias, catalog)
    if inner.range is not None:
        raise QueryError(f"{inner.name}: clamp() of a clamp()")
    bounds = (float(_number(args[1], inner.name)), float(_number(args[2], inner.name)))
    return dataclasses.replace(inner, range=bounds)


def _voxel_test(func: str, args: list[exp.Expression], name: str, catalog: str,
                fields: Callable[[list[exp.Expression]], tuple[str, ...]]) -> AggSpec:
    """tmap(img, w, opt => v, ...), tmap2(img, w, ...), prop_map(img, condition, ...)."""
    positional = [a for a in args if not isinstance(a, exp.Kwarg)]
    if any(isinstance(a, exp.Kwarg) for a in args[:len(positional)]):
        raise QueryError(f"{name}: named options (min_n => 10) come after the fields")
    options = []
    for kw in args[len(positional):]:
        value = _literal(kw.expression)
        if value is None:
            raise QueryError(f"{name}: option {kw.this.sql()} must be a number or a string")
        options.append((str(kw.this.name).lower(), value))
    options.sort()
    if func != "prop_map":
        return AggSpec(func, fields(positional), name, options=tuple(options))
    if len(positional) != 2:
        raise QueryError(f"{name}: prop_map takes an image and a condition, e.g. "
                         "prop_map(vta, improvement_pct > 50)")
    try:
        condition = expr_from_dict(expr_to_dict(_filter(positional[1], catalog)))
    except QueryError as exc:
        raise QueryError(f"{name}: its condition: {exc}") from None
    return AggSpec(func, fields(positional[:1]), name, options=tuple(options),
                   condition=condition)


def _glm(args: list[exp.Expression], name: str) -> AggSpec:
    """glm('y ~ x1 + x2', 'family'[, most iterations])."""
    strings = [a for a in args[:2] if isinstance(a, exp.Literal) and a.is_string]
    if len(args) not in (2, 3) or len(strings) != 2:
        raise QueryError(f"{name}: glm takes a formula and a family, e.g. "
                         "glm('responder ~ amplitude_ma + age', 'binomial'), and optionally "
                         "the most IRLS iterations")
    family = str(strings[1].this).lower()
    if family not in GLM_FAMILIES:
        raise QueryError(f"{name}: unknown GLM family {family!r}; expected one of "
                         f"{', '.join(GLM_FAMILIES)}")
    params = (_number(args[2], name),) if len(args) == 3 else ()
    return AggSpec(f"glm_{family}", _formula(str(strings[0].this), name), name, params)


def _formula(text: str, name: str) -> tuple[str, ...]:
    lhs, sep, rhs = text.partition("~")
    terms = [lhs.strip()] + [t.strip() for t in rhs.split("+")]
    if not sep or not all(_IDENT.match(t) for t in terms):
        raise QueryError(
            f"{name}: formula must be 'y ~ x1 + x2 + ...' with plain field names "
            "(no interactions, transforms or intercept terms)"
        )
    return tuple(terms)


def _number(node: exp.Expression, where: str) -> int | float:
    lit = _literal(node)
    if not isinstance(lit, int | float):
        raise QueryError(f"{where}: expected a number, got {node.sql()!r}")
    return lit


def _literal(node: exp.Expression) -> LiteralValue | None:
    """The literal value of `node`, or None if it is not a literal."""
    if isinstance(node, exp.Paren):
        return _literal(node.this)
    if isinstance(node, exp.Neg):
        inner = _literal(node.this)
        return -inner if isinstance(inner, int | float) else None
    if isinstance(node, exp.Literal):
        text = str(node.this)
        if node.is_string:
            return text
        try:
            return int(text)
        except ValueError:
            return float(text)
    return None


def _filter(node: exp.Expression, catalog: str) -> Expr:
    if isinstance(node, exp.Paren):
        return _filter(node.this, catalog)
    if isinstance(node, exp.And | exp.Or):
        return _connective(node, catalog)
    if isinstance(node, exp.Not):
        inner = _filter(node.this, catalog)
        if isinstance(inner, InList | Between | IsNull):
            return type(inner)(**{**inner.__dict__, "negated": not inner.negated})
        return Not(inner)
    if isinstance(node, exp.Is):
        if not isinstance(node.expression, exp.Null):
            raise QueryError(f"WHERE: only IS NULL / IS NOT NULL are supported, got {node.sql()!r}")
        return IsNull(_where_field(node.this, node, catalog), bool(node.args.get("negate")))
    if isinstance(node, exp.In):
        values = []
        for v in node.expressions:
            lit = _literal(v)
            if lit is None:
                raise QueryError(f"WHERE: IN lists accept only literals, got {v.sql()!r}")
            values.append(lit)
        return InList(_where_field(node.this, node, catalog), tuple(values))
    if isinstance(node, exp.Between):
        field = _where_field(node.this, node, catalog)
        return Between(
            field,
            _number(node.args["low"], f"WHERE {node.sql()!r}"),
            _number(node.args["high"], f"WHERE {node.sql()!r}"),
        )
    op = _COMPARISONS.get(type(node))
    if op is not None:
        return _comparison(node, op, catalog)
    if isinstance(node, exp.Func):
        raise QueryError(
            f"functions are not allowed in WHERE ({node.sql()!r}); "
            "only plain comparisons of a field with literals"
        )
    raise QueryError(f"unsupported expression in WHERE: {node.sql()!r}")


def _connective(node: exp.And | exp.Or, catalog: str) -> Expr:
    kind = type(node)
    parts: list[exp.Expression] = []
    stack: list[exp.Expression] = [node]
    while stack:  # flatten a AND b AND c, which sqlglot nests to the left
        cur = stack.pop()
        while isinstance(cur, exp.Paren):
            cur = cur.this
        if type(cur) is kind:
            stack.extend([cur.expression, cur.this])
        else:
            parts.append(cur)
    args = tuple(_filter(p, catalog) for p in parts)
    return And(args) if kind is exp.And else Or(args)


def _comparison(node: exp.Expression, op: str, catalog: str) -> Comparison:
    left, right = node.this, node.expression
    if isinstance(left, exp.Null) or isinstance(right, exp.Null):
        raise QueryError(
            f"WHERE {node.sql()!r}: comparing with NULL is never true; use IS NULL"
        )
    if not isinstance(left, exp.Column) and isinstance(right, exp.Column):
        left, right, op = right, left, _FLIPPED[op]
    field = _where_field(left, node, catalog)
    value = _literal(right)
    if value is None:
        raise QueryError(
            f"WHERE {node.sql()!r}: a field can only be compared with a number or a string"
        )
    return Comparison(op, field, value)


def _where_field(node: exp.Expression, whole: exp.Expression, catalog: str) -> str:
    if isinstance(node, exp.Column):
        return _field(node, catalog)
    if isinstance(node, exp.Func):
        raise QueryError(
            f"functions are not allowed in WHERE ({node.sql()!r} in {whole.sql()!r}); "
            "only plain comparisons of a field with literals"
        )
    raise QueryError(f"WHERE {whole.sql()!r}: the left side must be a field name")
