"""GLM families: gaussian (identity link), binomial (logit) and poisson (log), with the
link, inverse link, variance, deviance residuals and starting means of R's `glm`
(`family.R`, `glm.fit`), so a fit here takes the same path R's does.

The log-likelihoods follow statsmodels' families, and so does the null model: a constant
mean over all rows. Binomial responses are 0/1, one trial per row.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from typing import Final, Literal

import numpy as np

from stimnet.errors import QueryError

FamilyName = Literal["gaussian", "binomial", "poisson"]

# R's `.Machine$double.eps`. Its logit inverse link stops at |eta| = 30 and its log
# inverse link at eps, so weights stay positive and working responses finite even while
# coefficients diverge (separation); a fitted mean within 10 eps of a bound is what R
# reports as "fitted probabilities numerically 0 or 1 occurred".
_DBL_EPS: Final = float(np.finfo(np.float64).eps)
_LOGIT_THRESH: Final = 30.0
BOUNDARY_EPS: Final = 10 * _DBL_EPS


class Family(ABC):
    """One exponential family with its link, as the IRLS and the inference need it."""

    name: FamilyName
    # Whether the dispersion is estimated (gaussian) or fixed at 1 (binomial, poisson);
    # it decides t versus z statistics too.
    estimates_dispersion: bool = False
    # Whether one weighted least-squares solve reaches the maximum (identity link,
    # constant weights), so the fit needs no second solve to confirm it.
    exact_in_one_step: bool = False

    @abstractmethod
    def link(self, mu: np.ndarray) -> np.ndarray: ...

    @abstractmethod
    def inverse(self, eta: np.ndarray) -> np.ndarray: ...

    @abstractmethod
    def mu_eta(self, eta: np.ndarray) -> np.ndarray:
        """dμ/dη at η."""

    @abstractmethod
    def variance(self, mu: np.ndarray) -> np.ndarray: ...

    @abstractmethod
    def deviance_residuals(self, y: np.ndarray, mu: np.ndarray) -> np.ndarray: ...

    @abstractmethod
    def loglik(self, y: np.ndarray, mu: np.ndarray) -> float:
        """Σ log-likelihood at dispersion 1 (unused for gaussian, whose likelihood is
        profiled over the dispersion from the pooled deviance)."""

    @abstractmethod
    def start(self, y: np.ndarray) -> np.ndarray:
        """R's `mustart`: each row's starting mean, from its own response only."""

    @abstractmethod
    def check_response(self, y: np.ndarray) -> None:
        """QueryError unless every response is in the family's support. The message
        names the rule, never a value or how many rows break it."""

    def boundary(self, mu: np.ndarray) -> int:
        """How many fitted means sit numerically on the edge of the parameter space."""
        return 0

    def null_deviance(self, n: float, y_sum: float, y_sq_sum: float, y_log_y_sum: float) -> float:
        """The deviance of the constant-mean model (mean Σy / n) from the response sums."""
        raise NotImplementedError


class Gaussian(Family):
    name: FamilyName = "gaussian"
    estimates_dispersion = True
    exact_in_one_step = True

    def link(self, mu: np.ndarray) -> np.ndarray:
        return mu

    def inverse(self, eta: np.ndarray) -> np.ndarray:
        return eta

    def mu_eta(self, eta: np.ndarray) -> np.ndarray:
        return np.ones_like(eta)

    def variance(self, mu: np.ndarray) -> np.ndarray:
        return np.ones_like(mu)

    def deviance_residuals(self, y: np.ndarray, mu: np.ndarray) -> np.ndarray:
        return (y - mu) ** 2

    def loglik(self, y: np.ndarray, mu: np.ndarray) -> float:
        return float(-0.5 * np.sum((y - mu) ** 2) - 0.5 * y.size * math.log(2 * math.pi))

    def start(self, y: np.ndarray) -> np.ndarray:
        return y.copy()

    def check_response(self, y: np.ndarray) -> None:
        if not np.all(np.isfinite(y)):
            raise QueryError("a gaussian GLM needs a finite numeric response")

    def null_deviance(self, n: float, y_sum: float, y_sq_sum: float, y_log_y_sum: float) -> float:
        return max(y_sq_sum - y_sum * y_sum / n, 0.0)


class Binomial(Family):
    name: FamilyName = "binomial"

    def link(self, mu: np.ndarray) -> np.ndarray:
        return np.log(mu / (1.0 - mu))

    def inverse(self, eta: np.ndarray) -> np.ndarray:
        e = np.exp(np.clip(eta, -_LOGIT_THRESH, _LOGIT_THRESH))
        e = np.where(eta < -_LOGIT_THRESH, _DBL_EPS, np.where(eta > _LOGIT_THRESH, 1 / _DBL_EPS, e))
        return e / (1.0 + e)

    def mu_eta(self, eta: np.ndarray) -> np.ndarray:
        e = np.exp(np.clip(eta, -_LOGIT_THRESH, _LOGIT_THRESH))
        return np.where(np.abs(eta) > _LOGIT_THRESH, _DBL_EPS, e / (1.0 + e) ** 2)

    def variance(self, mu: np.ndarray) -> np.ndarray:
        return mu * (1.0 - mu)

    def deviance_residuals(self, y: np.ndarray, mu: np.ndarray) -> np.ndarray:
        return -2.0 * np.where(y > 0, np.log(mu), np.log1p(-mu))

    def loglik(self, y: np.ndarray, mu: np.ndarray) -> float:
        return float(np.sum(np.where(y > 0, np.log(mu), np.log1p(-mu))))

    def start(self, y: np.ndarray) -> np.ndarray:
        return (y + 0.5) / 2.0

    def check_response(self, y: np.ndarray) -> None:
        if not np.all((y == 0) | (y == 1)):
            raise QueryError("a binomial GLM needs a 0/1 response")

    def boundary(self, mu: np.ndarray) -> int:
        return int(np.count_nonzero((mu < BOUNDARY_EPS) | (mu > 1.0 - BOUNDARY_EPS)))

    def null_deviance(self, n: float, y_sum: float, y_sq_sum: float, y_log_y_sum: float) -> float:
        ybar = y_sum / n
        ones = y_sum * math.log(ybar) if y_sum > 0 else 0.0
        zeros = (n - y_sum) * math.log1p(-ybar) if y_sum < n else 0.0
        return -2.0 * (ones + zeros)


class Poisson(Family):
    name: FamilyName = "poisson"

    def link(self, mu: np.ndarray) -> np.ndarray:
        return np.log(mu)

    def inverse(self, eta: np.ndarray) -> np.ndarray:
        return np.maximum(np.exp(eta), _DBL_EPS)

    def mu_eta(self, eta: np.ndarray) -> np.ndarray:
        return np.maximum(np.exp(eta), _DBL_EPS)

    def variance(self, mu: np.ndarray) -> np.ndarray:
        return mu

    def deviance_residuals(self, y: np.ndarray, mu: np.ndarray) -> np.ndarray:
        return 2.0 * (_y_log_y_over(y, mu) - (y - mu))

    def loglik(self, y: np.ndarray, mu: np.ndarray) -> float:
        log_fact = np.array([math.lgamma(v + 1.0) for v in y.tolist()])
        return float(np.sum(_y_log(y, mu) - mu - log_fact))

    def start(self, y: np.ndarray) -> np.ndarray:
        return y + 0.1

    def check_response(self, y: np.ndarray) -> None:
        if not np.all(np.isfinite(y) & (y >= 0)):
            raise QueryError("a poisson GLM needs a non-negative count response")

    def boundary(self, mu: np.ndarray) -> int:
        return int(np.count_nonzero(mu < BOUNDARY_EPS))

    def null_deviance(self, n: float, y_sum: float, y_sq_sum: float, y_log_y_sum: float) -> float:
        # Σ 2[y log(y/ȳ) - (y - ȳ)]: the second part sums to zero at ȳ = Σy / n.
        if y_sum <= 0:
            return 0.0
        return 2.0 * (y_log_y_sum - y_sum * math.log(y_sum / n))


def _y_log(y: np.ndarray, mu: np.ndarray) -> np.ndarray:
    """y log μ with 0 log μ = 0."""
    return np.where(y > 0, y * np.log(mu), 0.0)


def _y_log_y_over(y: np.ndarray, mu: np.ndarray) -> np.ndarray:
    """y log(y / μ) with 0 log 0 = 0."""
    safe = np.where(y > 0, y, 1.0)
    return np.where(y > 0, y * np.log(safe / mu), 0.0)


def y_log_y(y: np.ndarray) -> float:
    """Σ y log y with 0 log 0 = 0: what the poisson null deviance needs from each site."""
    safe = np.where(y > 0, y, 1.0)
    return float(np.sum(np.where(y > 0, y * np.log(safe), 0.0)))


FAMILIES: Final[dict[str, Family]] = {f.name: f for f in (Gaussian(), Binomial(), Poisson())}


def family(name: str) -> Family:
    """The family called `name`; QueryError naming the known ones otherwise."""
    try:
        return FAMILIES[name]
    except KeyError:
        raise QueryError(f"unknown GLM family {name!r}: expected one of "
                         f"{', '.join(sorted(FAMILIES))}") from None
