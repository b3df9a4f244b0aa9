"""The linear statistics exact auditing sees for an aggregate (stimnetd/query/linear.py)."""

from __future__ import annotations

import numpy as np
import pandas as pd

from stimnet.query.sql import parse_sql
from stimnetd.query.engine import compute
from tests.unit.fakes import FakeCatalog, numeric

FIELDS = {"b": numeric("b", 0, 1), "y": numeric("y", -10, 10), "z": numeric("z", 0, 10)}


def cohorts(sql: str, **cols) -> set[tuple[str, tuple[int, ...]]]:
    cat = FakeCatalog(pd.DataFrame(cols), FIELDS)
    result = compute(parse_sql(sql), cat, audit=True, clamp=False)
    return {(lc.quantity, tuple(int(p) for p in lc.positions)) for lc in result.linear}


def test_a_sum_of_a_two_valued_field_is_also_the_count_at_its_higher_value() -> None:
    """Σ b over a cohort, with its count, is the number of subjects with b = 1: audited
    as that count too (and Σ b² likewise)."""
    got = cohorts("SELECT avg(b) FROM t", b=[1.0, 0.0, 1.0, np.nan, 0.0])
    assert got == {("1", (0, 1, 2, 4)), ("sum:b", (0, 1, 2, 4)), ("sum:b*b", (0, 1, 2, 4)),
                   ("1", (0, 2)), ("sum:b", (0, 2))}


def test_a_cross_product_with_a_two_valued_predictor_is_the_other_sum_over_its_group() -> None:
    """Σ b·y in a regression on a 0/1 b is Σ y over the subjects with b = 1."""
    got = cohorts("SELECT regress(y, b) FROM t", b=[1.0, 0.0, 1.0, 0.0], y=[1.0, 2.0, 3.0, 4.0])
    assert ("sum:y", (0, 2)) in got and ("sum:y*y", (0, 1, 2, 3)) in got
    assert ("1", (0, 2)) in got
    assert not any(q == "sum:y" and pos == (1, 3) for q, pos in got)


def test_fields_with_more_than_two_values_add_nothing() -> None:
    """z takes three values: its sums are audited as they are."""
    got = cohorts("SELECT avg(z) FROM t", z=[1.0, 2.0, 3.0])
    assert got == {("1", (0, 1, 2)), ("sum:z", (0, 1, 2)), ("sum:z*z", (0, 1, 2))}
