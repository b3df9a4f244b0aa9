"""Model formulas and design matrices for the GLM: `'responder ~ amplitude_ma + target'`.

A formula names plain fields (no interactions, transforms or intercept terms, like the
`lm` of the restricted SQL); the model always has an intercept. A term is categorical
when the catalog declares levels for it: it is expanded by treatment coding against its
first declared level (the reference), one 0/1 column per other level named
`term[T.level]` as patsy and formulaic name them. Declared levels, not the levels a site
happens to observe, fix the columns, so every site builds the same design.

Rows with a missing value in the response, a term or the offset are dropped (complete
cases, statsmodels' `missing="drop"`).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final

import numpy as np
import pandas as pd

from stimnet.errors import QueryError

INTERCEPT: Final = "Intercept"
_IDENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


@dataclass(frozen=True)
class Formula:
    """`response ~ term + term …`."""

    response: str
    terms: tuple[str, ...]

    @property
    def fields(self) -> tuple[str, ...]:
        return (self.response, *self.terms)


def parse_formula(text: str) -> Formula:
    """The formula in `text`; QueryError if it is not `y ~ x1 + x2 …` with distinct plain
    field names."""
    lhs, sep, rhs = text.partition("~")
    names = [lhs.strip()] + [t.strip() for t in rhs.split("+")]
    if not sep or not all(_IDENT.match(t) for t in names):
        raise QueryError("a GLM formula must be 'y ~ x1 + x2 + ...' with plain field names "
                         "(no interactions, transforms or intercept terms)")
    if len(set(names)) != len(names):
        raise QueryError("a GLM formula names a field twice")
    return Formula(names[0], tuple(names[1:]))


@dataclass(frozen=True, eq=False)
class Design:
    """The complete rows of a table as a design matrix `x` (intercept first, then each
    term's columns in formula order), the response `y`, and the offset if one was named.
    `dropped` counts the rows left out for a missing value."""

    x: np.ndarray
    y: np.ndarray
    columns: tuple[str, ...]
    offset: np.ndarray | None
    dropped: int


def columns(formula: Formula, levels: Mapping[str, Sequence[str]]) -> tuple[str, ...]:
    """The design's column names, known before any data is read (the entry can name the
    coefficients without a site's help)."""
    names = [INTERCEPT]
    for term in formula.terms:
        if term in levels:
            names += [f"{term}[T.{lv}]" for lv in _checked_levels(term, levels[term])[1:]]
        else:
            names.append(term)
    return tuple(names)


def design(frame: Mapping[str, Any], formula: Formula, levels: Mapping[str, Sequence[str]],
           offset: str | None = None) -> Design:
    """Build the design of `formula` from `frame` (a DataFrame, or columns by name).
    `levels` declares each categorical field's levels, reference first. A categorical
    response must have two levels: the first is 0, the second 1 (R's rule for a factor
    response). QueryError for an unknown field, a non-numeric value in a numeric field,
    or a value outside a field's declared levels; messages name fields, never values."""
    needed = [*formula.fields] + ([offset] if offset is not None else [])
    raw = {name: _column(frame, name) for name in needed}
    n = len(raw[formula.response])
    missing = np.zeros(n, dtype=bool)
    for values in raw.values():
        missing |= np.asarray(pd.isna(values), dtype=bool)
    keep = ~missing
    blocks = [np.ones((int(keep.sum()), 1))]
    for term in formula.terms:
        if term in levels:
            blocks.append(_treatment(term, raw[term][keep], levels[term]))
        else:
            blocks.append(_numeric(term, raw[term][keep])[:, None])
    y = _response(formula.response, raw[formula.response][keep], levels)
    off = _numeric(offset, raw[offset][keep]) if offset is not None else None
    return Design(x=np.hstack(blocks), y=y, columns=columns(formula, levels), offset=off,
                  dropped=int(missing.sum()))


def _column(frame: Mapping[str, Any], name: str) -> np.ndarray:
    try:
        col = frame[name]
    except KeyError:
        raise QueryError(f"unknown field {name!r}") from None
    return np.asarray(col, dtype=object)


def _numeric(name: str, values: np.ndarray) -> np.ndarray:
    try:
        out = np.asarray(values, dtype=np.float64)
    except (TypeError, ValueError):
        raise QueryError(f"field {name!r} is not numeric") from None
    if not np.all(np.isfinite(out)):
        raise QueryError(f"field {name!r} has infinite values")
    return out


def _checked_levels(name: str, declared: Sequence[str]) -> list[str]:
    out = [str(lv) for lv in declared]
    if not out or len(set(out)) != len(out):
        raise QueryError(f"field {name!r} needs distinct declared levels, its reference first")
    return out


def _codes(name: str, values: np.ndarray, declared: Sequence[str]) -> np.ndarray:
    """Each value's index among the declared levels (compared as stripped strings, as
    the catalog loader stores categories)."""
    index = {lv: i for i, lv in enumerate(_checked_levels(name, declared))}
    codes = np.array([index.get(str(v).strip(), -1) for v in values.tolist()], dtype=np.int64)
    if np.any(codes < 0):
        # An undeclared value is itself data, so it is not echoed.
        raise QueryError(f"field {name!r} has values outside its declared levels")
    return codes


def _treatment(name: str, values: np.ndarray, declared: Sequence[str]) -> np.ndarray:
    """Treatment coding: a 0/1 column for each declared level after the reference."""
    codes = _codes(name, values, declared)
    k = len(declared)
    return (codes[:, None] == np.arange(1, k)[None, :]).astype(np.float64)


def _response(name: str, values: np.ndarray, levels: Mapping[str, Sequence[str]]) -> np.ndarray:
    if name not in levels:
        return _numeric(name, values)
    if len(levels[name]) != 2:
        raise QueryError(f"a categorical response needs two levels; {name!r} declares "
                         f"{len(levels[name])}")
    return _codes(name, values, levels[name]).astype(np.float64)
