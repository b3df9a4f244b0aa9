"""The normal, t and chi-squared tails used for p values equal scipy's."""

from __future__ import annotations

import math

import pytest
from scipy import stats

from stimnetd.query.distributions import chi2_sf, normal_quantile, normal_sf, t_sf

T_VALUES = [-30.0, -2.5, -0.1, 0.0, 1e-6, 0.5, 1.0, 1.96, 3.0, 5.0, 10.0, 40.0]
DFS = [1, 2, 3, 4.5, 10, 30, 99, 100, 101, 1000, 7500, 100_000]


@pytest.mark.parametrize("df", DFS)
def test_t_tail_equals_scipy(df: float):
    """P(T > t) equals scipy's to 1e-10 relative, from the centre into the far tails."""
    for t in T_VALUES:
        assert t_sf(t, df) == pytest.approx(stats.t.sf(t, df), rel=1e-10, abs=1e-300)


@pytest.mark.parametrize("df", [1, 2, 3, 4, 7, 12, 50, 200])
def test_chi2_tail_equals_scipy(df: int):
    """P(X > x) equals scipy's to 1e-12 relative on both sides of the mean."""
    for x in [1e-4, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 100.0, 500.0]:
        assert chi2_sf(x, df) == pytest.approx(stats.chi2.sf(x, df), rel=1e-12, abs=1e-300)


def test_normal_tail_and_quantile_equal_scipy():
    """The normal tail keeps its relative accuracy far out (no 1 - cdf), and the
    quantile inverts the cdf."""
    for z in [-5.0, -1.0, 0.0, 1.0, 1.959963984540054, 8.0, 20.0, 37.0]:
        assert normal_sf(z) == pytest.approx(stats.norm.sf(z), rel=1e-13, abs=1e-300)
    for p in [0.001, 0.025, 0.5, 0.975, 0.999]:
        assert normal_quantile(p) == pytest.approx(stats.norm.ppf(p), rel=1e-12)


def test_edges_of_the_tails():
    """Infinite statistics and non-positive chi-squared values give exact 0 and 1;
    non-positive degrees of freedom are refused."""
    assert (t_sf(math.inf, 5), t_sf(-math.inf, 5), chi2_sf(0.0, 3), chi2_sf(math.inf, 3)) == (0.0, 1.0, 1.0, 0.0)
    with pytest.raises(ValueError):
        t_sf(1.0, 0)
    with pytest.raises(ValueError):
        chi2_sf(1.0, -1)
