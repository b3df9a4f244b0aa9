"""Federated GLM by iteratively reweighted least squares (IRLS), as R's `glm.fit` runs it.

Each round, every site evaluates its rows at the entry's current β and sends a
`GlmRound`: XᵀWX, XᵀWz, its deviance and log-likelihood contributions, and response sums.
Every field is a sum over rows, so the sum of the sites' rounds (`combine`) is the round
of the pooled rows, and the fit equals the pooled fit up to float summation order.

The entry drives the rounds with a pure state machine, so a network driver is a loop:

    state = start("binomial", p)
    while isinstance(state, IrlsState):
        rounds = [await site.round(state.beta) for site in sites]   # beta None: first round
        state = advance(state, combine(rounds))
    outcome = state                                                  # a GlmOutcome

`fit` is that loop in-process. Convergence is R's `glm.control`: stop when
|dev - dev_old| / (|dev| + 0.1) < epsilon (1e-8), after at most maxit (25) solves. The
first round uses R's starting means (`mustart`) rather than a β, so it carries no β.
A fit takes at most `GlmControl.max_rounds` rounds; a non-finite deviance halves the step
back towards the last good β (as R does), and that extra round counts against the same
bound, so the number of rounds a signed job may run is known before it starts.

Gaussian (identity link) is exact after one solve: its fit stops at the second round
(R would confirm with a third and report 2 iterations; here it reports 1).

Separation, non-convergence and singular systems are outcomes (`GlmOutcome.kind`) with
no coefficients, never numbers that look like estimates. Separation is R's symptom
(fitted means within 10 eps of 0 or 1) or collapsed information (SEPARATION_RATIO); a
separated level with few rows in a very large fit can still stop early enough to pass
both, and is then reported, as by R and statsmodels, with an enormous standard error.

The null deviance is statsmodels' (the constant-mean model over all rows) and costs no
round: every round carries n, Σy, Σy² and Σy log y, from which each family's null
deviance follows. With an offset the null model needs its own fit (`fit(null_sites=…)`,
or `infer(null_deviance=…)`); without one it is None.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any, Final, Literal

import numpy as np

from stimnet.errors import IncompatiblePartials
from stimnetd.query.distributions import normal_sf, t_sf
from stimnetd.query.glm_family import FamilyName, family, y_log_y

OutcomeKind = Literal["converged", "separation", "not_converged", "singular"]

# Smallest eigenvalue, relative to the largest, that XᵀWX scaled to unit diagonal may
# have. Below it the coefficients are not identifiable (collinear or constant
# predictors, an empty level), and the inverse would have fewer than ~6 good digits.
SINGULAR_TOL: Final = 1e-10

# Quasi-complete separation (a level, or a side of a threshold, with one outcome only)
# sends coefficients off to infinity while the deviance settles, so R's criterion
# declares convergence before any fitted mean is within 10 eps of 0 or 1 and R reports
# the diverged estimate with a huge standard error. The signature is that the information
# along some direction of β collapses: the rows that determine it are fitted with
# near-certainty. A fit is called separated when the smallest eigenvalue of XᵀWX at the
# estimate, relative to XᵀWX at the starting means, falls below this ratio (for a binomial
# it means every such row has μ(1 - μ) a hundred thousand times below its start, 0.1875).
SEPARATION_RATIO: Final = 1e-5


@dataclass(frozen=True, eq=False)
class GlmRound:
    """One site's (or, summed, all sites') contribution at one β. Every field is additive
    over rows. `boundary` counts rows whose fitted mean is numerically 0 or 1 (binomial)
    or 0 (poisson); `offset` says an offset entered, so the null deviance cannot come
    from the response sums."""

    xtwx: np.ndarray
    xtwz: np.ndarray
    deviance: float
    loglik: float
    n: int
    y_sum: float
    y_sq_sum: float
    y_log_y_sum: float
    boundary: int
    offset: bool = False

    def to_doc(self) -> dict[str, Any]:
        """A JSON-ready dict (what a site sends back for one round)."""
        return {"xtwx": self.xtwx.tolist(), "xtwz": self.xtwz.tolist(), "deviance": self.deviance,
                "loglik": self.loglik, "n": self.n, "y_sum": self.y_sum,
                "y_sq_sum": self.y_sq_sum, "y_log_y_sum": self.y_log_y_sum,
                "boundary": self.boundary, "offset": self.offset}

    @classmethod
    def from_doc(cls, doc: dict[str, Any], p: int) -> GlmRound:
        """The round in `doc`, checked to be for `p` coefficients (IncompatiblePartials
        otherwise: a site answered a different model)."""
        xtwx = np.asarray(doc["xtwx"], dtype=np.float64)
        xtwz = np.asarray(doc["xtwz"], dtype=np.float64)
        if xtwx.shape != (p, p) or xtwz.shape != (p,):
            raise IncompatiblePartials(f"a GLM round is not for {p} coefficients")
        return cls(xtwx, xtwz, float(doc["deviance"]), float(doc["loglik"]), int(doc["n"]),
                   float(doc["y_sum"]), float(doc["y_sq_sum"]), float(doc["y_log_y_sum"]),
                   int(doc["boundary"]), bool(doc["offset"]))


def site_round(x: np.ndarray, y: np.ndarray, beta: np.ndarray | None, family_name: FamilyName,
               offset: np.ndarray | None = None) -> GlmRound:
    """A site's round on its complete rows: design `x` (n × p), response `y`, at `beta`
    (None: the first round, from the family's starting means). QueryError if a response
    is outside the family's support."""
    fam = family(family_name)
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    off = np.zeros(y.shape) if offset is None else np.asarray(offset, dtype=np.float64)
    if x.ndim != 2 or y.shape != (x.shape[0],) or off.shape != y.shape:
        raise ValueError("x must be n × p, and y and the offset have n rows")
    fam.check_response(y)
    # Overflow while coefficients diverge is expected: it surfaces as a non-finite
    # deviance (step halving) or as boundary rows (separation), not as a warning.
    with np.errstate(all="ignore"):
        if beta is None:
            eta = fam.link(fam.start(y))
        else:
            eta = x @ np.asarray(beta, dtype=np.float64) + off
        mu = fam.inverse(eta)
        d = fam.mu_eta(eta)
        w = d * d / fam.variance(mu)
        z = (eta - off) + (y - mu) / d
        return GlmRound(
            xtwx=x.T @ (x * w[:, None]), xtwz=x.T @ (w * z),
            deviance=float(np.sum(fam.deviance_residuals(y, mu))), loglik=fam.loglik(y, mu),
            n=int(y.size), y_sum=float(np.sum(y)), y_sq_sum=float(np.sum(y * y)),
            y_log_y_sum=y_log_y(y), boundary=fam.boundary(mu), offset=offset is not None,
        )


def combine(rounds: Sequence[GlmRound]) -> GlmRound:
    """The sum of the sites' rounds: the round of their pooled rows."""
    if not rounds:
        raise ValueError("no rounds to combine")
    shape = rounds[0].xtwx.shape
    if any(r.xtwx.shape != shape or r.xtwz.shape != shape[:1] for r in rounds):
        raise IncompatiblePartials("sites sent GLM rounds for different numbers of coefficients")
    return GlmRound(
        xtwx=np.sum([r.xtwx for r in rounds], axis=0), xtwz=np.sum([r.xtwz for r in rounds], axis=0),
        deviance=math.fsum(r.deviance for r in rounds), loglik=math.fsum(r.loglik for r in rounds),
        n=sum(r.n for r in rounds), y_sum=math.fsum(r.y_sum for r in rounds),
        y_sq_sum=math.fsum(r.y_sq_sum for r in rounds),
        y_log_y_sum=math.fsum(r.y_log_y_sum for r in rounds),
        boundary=sum(r.boundary for r in rounds), offset=any(r.offset for r in rounds),
    )


def irls_step(summed: GlmRound) -> np.ndarray | None:
    """The next β, (XᵀWX)⁻¹ XᵀWz, or None if XᵀWX is singular. The current β enters
    through the working response z, which the sites formed at it."""
    inverse = _inverse(summed.xtwx)
    return None if inverse is None else inverse @ summed.xtwz


def _inverse(a: np.ndarray) -> np.ndarray | None:
    """a⁻¹ for a symmetric positive definite `a`, or None when it is (numerically)
    singular. Scaling to unit diagonal first makes the test independent of the
    predictors' units."""
    diag = np.diag(a)
    if not np.all(np.isfinite(a)) or np.any(diag <= 0):
        return None
    s = 1.0 / np.sqrt(diag)
    values, vectors = np.linalg.eigh(a * np.outer(s, s))
    if values[0] <= SINGULAR_TOL * values[-1]:
        return None
    return np.outer(s, s) * ((vectors / values) @ vectors.T)


@dataclass(frozen=True)
class GlmControl:
    """R's `glm.control`: relative deviance tolerance and the most solves."""

    epsilon: float = 1e-8
    maxit: int = 25

    @property
    def max_rounds(self) -> int:
        """The most rounds a fit takes: one per solve, plus the first."""
        return self.maxit + 1


@dataclass(frozen=True)
class GlmFit:
    """A converged fit. `statistic` is "t" (gaussian: dispersion estimated from
    deviance / df_residual, p values from t with df_residual) or "z" (dispersion 1).
    `aic` is statsmodels': -2 loglik + 2p (R adds 2 more for a gaussian's dispersion);
    a gaussian's loglik is profiled over the dispersion, at deviance / n."""

    terms: tuple[str, ...]
    coefficients: tuple[float, ...]
    std_errors: tuple[float, ...]
    statistics: tuple[float, ...]
    p_values: tuple[float, ...]
    statistic: Literal["z", "t"]
    covariance: tuple[tuple[float, ...], ...]
    dispersion: float
    deviance: float
    null_deviance: float | None
    df_residual: int
    df_null: int
    loglik: float
    aic: float
    iterations: int
    n: int


@dataclass(frozen=True)
class GlmOutcome:
    """How a fit ended. `fit` is set only when `kind` is "converged"; `deviances` holds
    the deviance of each accepted round (the progress a client was shown)."""

    kind: OutcomeKind
    family: FamilyName
    iterations: int
    rounds: int
    n: int
    detail: str = ""
    fit: GlmFit | None = None
    deviances: tuple[float, ...] = ()


@dataclass(frozen=True, eq=False)
class IrlsState:
    """Where a fit stands between rounds: the next round is evaluated at `beta` (None:
    the starting means). `deviance` and `accepted` are the deviance and β of the last
    round with a finite deviance, which a step halving falls back towards; `information`
    is XᵀWX of the first round, which the separation check compares against. `n` is the
    rows of the first round: every later round must cover the same rows."""

    family: FamilyName
    terms: tuple[str, ...]
    control: GlmControl
    beta: np.ndarray | None = None
    iteration: int = 0
    rounds: int = 0
    deviance: float | None = None
    accepted: np.ndarray | None = None
    information: np.ndarray | None = None
    n: int | None = None
    deviances: tuple[float, ...] = ()

    @property
    def p(self) -> int:
        return len(self.terms)


def start(family_name: FamilyName, p: int, control: GlmControl | None = None,
          terms: Sequence[str] | None = None) -> IrlsState:
    """A fit of `p` coefficients before its first round. `terms` name the coefficients
    (x0, x1, … by default). ValueError if they are not `p` names."""
    family(family_name)
    names = tuple(terms) if terms is not None else tuple(f"x{i}" for i in range(p))
    if len(names) != p or p < 1:
        raise ValueError(f"a GLM needs at least one coefficient and one name for each of {p}")
    return IrlsState(family=family_name, terms=names, control=control or GlmControl())


def advance(state: IrlsState, summed: GlmRound) -> IrlsState | GlmOutcome:
    """Take in the summed round at `state.beta`: the state for the next round, or how
    the fit ended. IncompatiblePartials if the round is for another number of
    coefficients or other rows than the first round (a site changed its data or left)."""
    if summed.xtwz.shape != (state.p,):
        raise IncompatiblePartials(f"a GLM round is not for {state.p} coefficients")
    if state.n is not None and summed.n != state.n:
        raise IncompatiblePartials("a GLM round covers other rows than the fit's first round")
    rounds = state.rounds + 1
    if not _finite(summed):
        return _halve(state, rounds, summed.n)
    if summed.n <= state.p:
        return _ended(state, "singular", rounds, summed, "no more rows than coefficients")
    dev = summed.deviance
    seen = state.deviances + (dev,)
    if state.deviance is not None and (family(state.family).exact_in_one_step or
                                       abs(dev - state.deviance) / (abs(dev) + 0.1)
                                       < state.control.epsilon):
        return _finish(replace(state, rounds=rounds, deviances=seen), summed)
    if rounds >= state.control.max_rounds:
        return _ended(replace(state, deviances=seen), "not_converged", rounds, summed,
                      f"no convergence in {state.iteration} iterations")
    beta = irls_step(summed)
    if beta is None:
        return _ended(replace(state, deviances=seen), "singular", rounds, summed,
                      "XᵀWX is singular: collinear or constant predictors, or an empty level")
    first = state.information if state.information is not None else summed.xtwx
    return replace(state, beta=beta, iteration=state.iteration + 1, rounds=rounds, deviance=dev,
                   accepted=state.beta, information=first, n=summed.n, deviances=seen)


def _finite(summed: GlmRound) -> bool:
    return bool(math.isfinite(summed.deviance) and np.all(np.isfinite(summed.xtwx))
                and np.all(np.isfinite(summed.xtwz)))


def _halve(state: IrlsState, rounds: int, n: int) -> IrlsState | GlmOutcome:
    """R's step halving when the deviance is not finite: back halfway to the last β
    whose deviance was."""
    if state.beta is None or state.accepted is None or rounds >= state.control.max_rounds:
        return GlmOutcome("not_converged", state.family, state.iteration, rounds, n,
                          "the deviance is not finite and no step halving is left",
                          deviances=state.deviances)
    return replace(state, beta=(state.beta + state.accepted) / 2.0, rounds=rounds)


def _ended(state: IrlsState, kind: OutcomeKind, rounds: int, summed: GlmRound,
           detail: str) -> GlmOutcome:
    """A fit that stopped without estimates; separation explains a failure to converge
    (the coefficients were diverging), so it is reported instead."""
    reason = _separation(state, summed) if kind == "not_converged" else None
    if reason is not None:
        kind, detail = "separation", reason
    return GlmOutcome(kind, state.family, state.iteration, rounds, summed.n, detail,
                      deviances=state.deviances)


def _separation(state: IrlsState, summed: GlmRound) -> str | None:
    """Why the fit is separated, or None: fitted means on the boundary (R's rule), or
    collapsed information (see SEPARATION_RATIO)."""
    if summed.boundary:
        what = "probabilities numerically 0 or 1" if state.family == "binomial" else "means numerically 0"
        return f"fitted {what} occurred: (quasi-)complete separation, the estimates diverge"
    if state.information is None or family(state.family).exact_in_one_step:
        return None
    if information_ratio(state.information, summed.xtwx) < SEPARATION_RATIO:
        return ("the information on some combination of coefficients vanished as they "
                "diverged: (quasi-)complete separation, an outcome fitted with certainty "
                "in a level or beyond a threshold")
    return None


def information_ratio(start: np.ndarray, now: np.ndarray) -> float:
    """min over directions d of dᵀ now d / dᵀ start d: the smallest generalized eigenvalue,
    formed after scaling both to the start's unit diagonal (it is invariant under that)."""
    s = 1.0 / np.sqrt(np.diag(start))
    lower = np.linalg.cholesky(start * np.outer(s, s))
    inv = np.linalg.inv(lower)
    return float(np.linalg.eigvalsh(inv @ (now * np.outer(s, s)) @ inv.T)[0])


def _finish(state: IrlsState, summed: GlmRound) -> GlmOutcome:
    reason = _separation(state, summed)
    if reason is not None:
        return GlmOutcome("separation", state.family, state.iteration, state.rounds, summed.n,
                          reason, deviances=state.deviances)
    assert state.beta is not None  # a converged state has taken at least one step
    result = infer(summed, state.beta, state.family, iterations=state.iteration, terms=state.terms)
    if isinstance(result, str):
        return GlmOutcome("singular", state.family, state.iteration, state.rounds, summed.n,
                          result, deviances=state.deviances)
    return GlmOutcome("converged", state.family, state.iteration, state.rounds, summed.n,
                      fit=result, deviances=state.deviances)


def infer(summed: GlmRound, beta: np.ndarray, family_name: FamilyName, *, iterations: int,
          terms: Sequence[str], null_deviance: float | None = None) -> GlmFit | str:
    """Coefficients, standard errors, tests and fit statistics at the final β from the
    round evaluated there; a reason string if no inference is possible. The null deviance
    is the constant-mean model's, from the response sums, unless given (the sums cannot
    give it when an offset entered: fit the intercept-only model and pass its deviance)."""
    fam = family(family_name)
    p, n = beta.size, summed.n
    inverse = _inverse(summed.xtwx)
    if inverse is None:
        return "XᵀWX is singular at the estimate"
    df_resid = n - p
    dispersion = summed.deviance / df_resid if fam.estimates_dispersion else 1.0
    if dispersion <= 0:
        return "the fit is perfect (zero residual deviance): no standard errors"
    cov = inverse * dispersion
    se = np.sqrt(np.diag(cov))
    stats = beta / se
    if fam.estimates_dispersion:
        pvals = [2.0 * t_sf(abs(t), df_resid) for t in stats.tolist()]
        loglik = -0.5 * n * (math.log(2.0 * math.pi * summed.deviance / n) + 1.0)
    else:
        pvals = [2.0 * normal_sf(abs(z)) for z in stats.tolist()]
        loglik = summed.loglik
    if null_deviance is None and not summed.offset:
        null_deviance = fam.null_deviance(n, summed.y_sum, summed.y_sq_sum, summed.y_log_y_sum)
    return GlmFit(
        terms=tuple(terms), coefficients=tuple(beta.tolist()), std_errors=tuple(se.tolist()),
        statistics=tuple(stats.tolist()), p_values=tuple(pvals),
        statistic="t" if fam.estimates_dispersion else "z",
        covariance=tuple(tuple(row) for row in cov.tolist()), dispersion=dispersion,
        deviance=summed.deviance, null_deviance=null_deviance, df_residual=df_resid,
        df_null=n - 1, loglik=loglik, aic=-2.0 * loglik + 2.0 * p, iterations=iterations, n=n,
    )


SiteRound = Callable[[np.ndarray | None], GlmRound]


def fit(sites: Sequence[SiteRound], p: int, family_name: FamilyName, *,
        control: GlmControl | None = None, terms: Sequence[str] | None = None,
        null_sites: Sequence[SiteRound] | None = None,
        on_round: Callable[[IrlsState], None] | None = None) -> GlmOutcome:
    """Run the rounds in-process: each site is a callable from β (None on the first
    round) to its round. `null_sites` (an intercept-only design with the same offset)
    give the null deviance of a model with an offset; without them it is None there.
    `on_round` sees the state after each round that did not end the fit."""
    state: IrlsState | GlmOutcome = start(family_name, p, control, terms)
    while isinstance(state, IrlsState):
        beta = state.beta
        nxt = advance(state, combine([site(beta) for site in sites]))
        if on_round is not None and isinstance(nxt, IrlsState):
            on_round(nxt)
        state = nxt
    outcome = state
    if outcome.fit is not None and outcome.fit.null_deviance is None and null_sites:
        null = fit(null_sites, 1, family_name, control=control, terms=("Intercept",))
        if null.fit is not None:
            outcome = replace(outcome, fit=replace(outcome.fit, null_deviance=null.fit.deviance))
    return outcome
