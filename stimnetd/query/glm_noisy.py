"""IRLS on noised rounds (privacy/glm_noise.py): the sites release XᵀWX, XᵀWz and n with
Laplace noise and no deviance, so the entry stops on the change in β instead of R's
deviance criterion: when max |Δβ| / (max |β| + 0.1) < DP_TOLERANCE. Noise moves β every
round by about its own standard error, so at a small ε the fit may never settle within
the rounds that were paid for: it then ends "not_converged", saying so, with no estimates.
Standard errors come from the noised XᵀWX at the last β; no deviance, AIC or
log-likelihood is reported (they were not released).
"""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Final

import numpy as np

from stimnet.errors import IncompatiblePartials
from stimnetd.query.distributions import normal_sf
from stimnetd.query.glm import GlmFit, GlmOutcome, GlmRound, IrlsState, _inverse, irls_step

DP_TOLERANCE: Final = 1e-3


def advance(state: IrlsState, summed: GlmRound) -> IrlsState | GlmOutcome:
    """As glm.advance, for noised rounds."""
    if summed.xtwz.shape != (state.p,):
        raise IncompatiblePartials(f"a GLM round is not for {state.p} coefficients")
    if state.n is not None and summed.n != state.n:
        raise IncompatiblePartials("a GLM round covers other rows than the fit's first round")
    rounds = state.rounds + 1
    beta = irls_step(summed)
    if beta is None or not np.all(np.isfinite(beta)):
        return GlmOutcome("singular", state.family, state.iteration, rounds, summed.n,
                          "the noised XᵀWX is not positive definite (the noise swamps the "
                          "information: ask for a larger ε, a larger cohort or fewer terms)")
    if state.beta is not None:
        step = float(np.max(np.abs(beta - state.beta)) / (np.max(np.abs(state.beta)) + 0.1))
        if step < DP_TOLERANCE:
            return _finish(state, summed, beta, rounds)
    if rounds >= state.control.max_rounds:
        return GlmOutcome("not_converged", state.family, state.iteration, rounds, summed.n,
                          f"the noised IRLS did not settle (relative step below "
                          f"{DP_TOLERANCE:g}) within the {state.control.max_rounds} rounds paid "
                          "for: the noise moves β more than that; ask for a larger ε")
    return replace(state, beta=beta, iteration=state.iteration + 1, rounds=rounds,
                   n=summed.n, accepted=state.beta)


def _finish(state: IrlsState, summed: GlmRound, beta: np.ndarray, rounds: int) -> GlmOutcome:
    inverse = _inverse(summed.xtwx)
    if inverse is None:
        return GlmOutcome("singular", state.family, state.iteration, rounds, summed.n,
                          "the noised XᵀWX is singular at the estimate")
    se = np.sqrt(np.diag(inverse))
    stats = beta / se
    nan = math.nan
    fit = GlmFit(terms=state.terms, coefficients=tuple(beta.tolist()),
                 std_errors=tuple(se.tolist()), statistics=tuple(stats.tolist()),
                 p_values=tuple(2.0 * normal_sf(abs(z)) for z in stats.tolist()),
                 statistic="z", covariance=tuple(tuple(r) for r in inverse.tolist()),
                 dispersion=1.0, deviance=nan, null_deviance=None,
                 df_residual=summed.n - state.p, df_null=summed.n - 1, loglik=nan, aic=nan,
                 iterations=state.iteration + 1, n=summed.n)
    return GlmOutcome("converged", state.family, state.iteration + 1, rounds, summed.n, fit=fit)
