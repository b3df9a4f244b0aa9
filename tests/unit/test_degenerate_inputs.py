"""Degenerate inputs (an epsilon that rounds to 0, a literal beyond float) are refused saying why."""

from __future__ import annotations

import pytest

from stimnetd.privacy.policy import MIN_EPSILON, PrivacyPolicy, PrivacyRefusal, decide_epsilon


@pytest.mark.parametrize("eps", [5e-324, 1e-300, MIN_EPSILON / 2])
def test_a_degenerate_epsilon_is_refused_naming_the_minimum(eps: float) -> None:
    """A subnormal or tiny epsilon (5e-324 split over two arrays is 0) is refused as a
    privacy refusal naming the smallest accepted, not a ZeroDivisionError at the site."""
    with pytest.raises(PrivacyRefusal, match="below 1e-06"):
        decide_epsilon(PrivacyPolicy(dp="optional"), eps)


def test_the_minimum_itself_is_accepted() -> None:
    """MIN_EPSILON is a valid request."""
    assert decide_epsilon(PrivacyPolicy(dp="optional"), MIN_EPSILON) == MIN_EPSILON


def test_a_400_digit_literal_is_a_one_line_query_error() -> None:
    """A SQL literal beyond float's range is a QueryError naming the value's role, not an
    OverflowError traceback in stimctl."""
    from stimnet.query.sql import QueryError, parse_sql

    with pytest.raises(QueryError, match="filter value must be a finite number"):
        parse_sql("SELECT count(*) FROM c WHERE age > " + "9" * 400)
