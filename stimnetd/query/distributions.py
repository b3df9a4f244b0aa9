"""Tail probabilities of the normal, Student t and chi-squared distributions, for the p
values of GLM coefficients and of the heterogeneity Q.

scipy is a test-only dependency (the daemon does not ship it), so the regularized
incomplete beta and gamma functions are computed here with the continued fractions and
series of Numerical Recipes (Press et al., 3rd ed., 6.2 and 6.4), in double precision.
tests/unit/test_distributions.py checks them against scipy.
"""

from __future__ import annotations

import math
import sys
from statistics import NormalDist

# Relative accuracy a continued fraction or series stops at, and the floor that keeps
# Lentz's method from dividing by zero.
_EPS = sys.float_info.epsilon
_TINY = 1e-300
# Continued fractions for I_x(a, b) converge in O(sqrt(max(a, b))) terms, and the t
# distribution's a is half its degrees of freedom (half the number of rows).
_MAX_TERMS = 1_000_000


def normal_sf(z: float) -> float:
    """P(Z > z) for a standard normal Z, accurate far into the tail (no 1 - cdf)."""
    return 0.5 * math.erfc(z / math.sqrt(2.0))


def normal_quantile(p: float) -> float:
    """The z with P(Z <= z) = p."""
    return NormalDist().inv_cdf(p)


def t_sf(t: float, df: float) -> float:
    """P(T > t) for Student's t with `df` degrees of freedom."""
    if df <= 0:
        raise ValueError("degrees of freedom must be positive")
    if math.isinf(t):
        return 0.0 if t > 0 else 1.0
    t2 = t * t
    # x = df / (df + t²) and 1 - x, each formed without cancellation.
    tail = 0.5 * _betainc(df / 2.0, 0.5, df / (df + t2), t2 / (df + t2))
    return tail if t >= 0 else 1.0 - tail


def chi2_sf(x: float, df: float) -> float:
    """P(X > x) for a chi-squared X with `df` degrees of freedom."""
    if df <= 0:
        raise ValueError("degrees of freedom must be positive")
    if x <= 0:
        return 1.0
    if math.isinf(x):
        return 0.0
    return _gammaincc(df / 2.0, x / 2.0)


def _betainc(a: float, b: float, x: float, y: float) -> float:
    """I_x(a, b), the regularized incomplete beta function, given x and y = 1 - x."""
    if x <= 0.0:
        return 0.0
    if y <= 0.0:
        return 1.0
    log_x = math.log1p(-y) if y < 0.5 else math.log(x)
    log_y = math.log1p(-x) if x < 0.5 else math.log(y)
    log_front = _log_gamma_ratio(a, b) - math.lgamma(b) + a * log_x + b * log_y
    front = math.exp(log_front)
    # The fraction converges fast on the side of the mean; the other side by symmetry.
    if x < (a + 1.0) / (a + b + 2.0):
        return front * _beta_fraction(a, b, x) / a
    return 1.0 - front * _beta_fraction(b, a, y) / b


def _log_gamma_ratio(a: float, b: float) -> float:
    """log Γ(a + b) - log Γ(a). For a large the two log-gammas are huge and nearly equal,
    so their difference is formed from Stirling's series instead (error below 1e-17 for
    a >= 100), which keeps t tails accurate for hundreds of thousands of rows."""
    if a < 100.0:
        return math.lgamma(a + b) - math.lgamma(a)
    c = a + b
    return ((a - 0.5) * math.log1p(b / a) + b * math.log(c) - b
            + _stirling_tail(c) - _stirling_tail(a))


def _stirling_tail(z: float) -> float:
    """log Γ(z) - [(z - 1/2) log z - z + log(2π)/2], the first terms of its series."""
    z2 = z * z
    return (1.0 / 12.0 - (1.0 / 360.0 - (1.0 / 1260.0) / z2) / z2) / z


def _beta_fraction(a: float, b: float, x: float) -> float:
    """The continued fraction of I_x(a, b), by the modified Lentz method (NR 6.4)."""
    qab, qap, qam = a + b, a + 1.0, a - 1.0
    c = 1.0
    d = _nonzero(1.0 - qab * x / qap)
    d = 1.0 / d
    h = d
    for m in range(1, _MAX_TERMS):
        m2 = 2 * m
        even = m * (b - m) * x / ((qam + m2) * (a + m2))
        d = 1.0 / _nonzero(1.0 + even * d)
        c = _nonzero(1.0 + even / c)
        h *= d * c
        odd = -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))
        d = 1.0 / _nonzero(1.0 + odd * d)
        c = _nonzero(1.0 + odd / c)
        step = d * c
        h *= step
        if abs(step - 1.0) <= _EPS:
            return h
    raise ArithmeticError(f"incomplete beta did not converge for a={a}, b={b}")


def _gammaincc(a: float, x: float) -> float:
    """Q(a, x) = Γ(a, x) / Γ(a), the regularized upper incomplete gamma function."""
    log_front = -x + a * math.log(x) - math.lgamma(a)
    if x < a + 1.0:
        # The series for P(a, x) converges here; Q is its complement.
        term = total = 1.0 / a
        ap = a
        for _ in range(_MAX_TERMS):
            ap += 1.0
            term *= x / ap
            total += term
            if abs(term) < abs(total) * _EPS:
                return 1.0 - total * math.exp(log_front)
        raise ArithmeticError(f"incomplete gamma series did not converge for a={a}")
    # Continued fraction for Q(a, x) (NR 6.2), modified Lentz.
    b = x + 1.0 - a
    c = 1.0 / _TINY
    d = 1.0 / b
    h = d
    for i in range(1, _MAX_TERMS):
        an = -i * (i - a)
        b += 2.0
        d = 1.0 / _nonzero(an * d + b)
        c = _nonzero(b + an / c)
        step = d * c
        h *= step
        if abs(step - 1.0) <= _EPS:
            return math.exp(log_front) * h
    raise ArithmeticError(f"incomplete gamma fraction did not converge for a={a}")


def _nonzero(v: float) -> float:
    return v if abs(v) >= _TINY else _TINY
