"""The entry's side of a model query: drive a federated GLM's rounds, or pool the sites'
own estimates (meta-analysis); the answer with its manifest.

A GLM's first round is the job's ordinary fan-out (every site admits, verifies and
releases it as any query, under its k_min). The sites that answered it are the fit's
sites: every later round goes to exactly these, and a site that drops out (refuses,
fails, times out) ends the job, with the manifest naming it and the round. A fit is
never finished over a different set of sites than it started with.
"""

from __future__ import annotations

import math
from collections.abc import Awaitable, Callable
from dataclasses import replace
from typing import Any

from stimnet import codec
from stimnet.errors import IncompatiblePartials
from stimnet.query.spec import AggSpec
from stimnet.signing import VerifiedJob
from stimnetd.federation.fanout import FanoutResult
from stimnetd.jobs.answer import Answer
from stimnetd.query import glm_noisy
from stimnetd.query.glm import GlmOutcome, IrlsState, advance, combine, start
from stimnetd.query.meta import MetaAnalysis, Pooled, meta_analysis
from stimnetd.query.models import control_of, family_of, round_of
from stimnetd.site import SiteOutcome

# Runs round `r` at β on the named sites; their outcomes in the same order.
RoundRunner = Callable[[int, list[float], list[str]], Awaitable[list[SiteOutcome]]]
Progress = Callable[[str], Awaitable[None]]

GLM_COLUMNS = ["term", "estimate", "std_error", "statistic", "p_value"]
META_COLUMNS = ["term", "method", "estimate", "std_error", "ci_low", "ci_high", "z",
                "p_value", "tau2", "i2"]


def _failed_sites(fan: FanoutResult) -> str:
    return "; ".join(f"{o.site}: {o.state}{' (' + o.detail + ')' if o.detail else ''}"
                     for o in fan.outcomes if o.state != "done")


def _too_few(job: VerifiedJob, fan: FanoutResult) -> Answer | None:
    n = len(fan.contributors)
    if n >= job.request.min_sites:
        return None
    why = _failed_sites(fan) or (f"no site this node knows of holds catalog "
                                 f"{job.request.catalog!r}")
    return Answer("failed", f"only {n} site(s) contributed, min_sites is "
                  f"{job.request.min_sites} — {why}")


def _pack(job: VerifiedJob, fan: FanoutResult, result: dict[str, Any], detail: str) -> Answer:
    req = job.request
    privacy = [{"site": o.site, "epsilon": o.epsilon, "mechanism": o.mechanism}
               for o in fan.contributors]
    doc = {"result": result, "manifest": fan.manifest(), "privacy": privacy,
           "query": req.spec, "scope": req.scope, "kind": req.kind, "script_sha256": None}
    return Answer("succeeded", detail, codec.pack(doc, {}))


async def fit_glm(job: VerifiedJob, model: AggSpec, fan: FanoutResult, rounds: RoundRunner,
                  progress: Progress,
                  dropped_out: Callable[[SiteOutcome], Awaitable[None]]) -> Answer:
    """Drive the IRLS from the sites' first rounds in `fan` to an answer. `progress` is
    told each iteration's deviance; `dropped_out` each site that left mid-fit (its row
    in the job's manifest)."""
    refused = _too_few(job, fan)
    if refused is not None:
        return refused
    sites = [o.site for o in fan.contributors]
    parts = [o.partials[0] for o in fan.contributors]
    terms: list[str] = parts[0].meta.get("terms") or []
    if any(p.kind != "glm_round" or p.meta.get("terms") != terms for p in parts):
        return Answer("failed", "sites returned incompatible results: their GLM rounds are "
                      "for different coefficients (their catalogs declare other levels)")
    state: IrlsState | GlmOutcome = start(family_of(model), len(terms), control_of(model),
                                          terms)
    # Noised rounds (any site's policy): stop on β, no deviance (query/glm_noisy.py).
    noisy = any(p.meta.get("dp") for p in parts)
    step = glm_noisy.advance if noisy else advance
    outcomes = fan.contributors
    round_no, shown = 1, 0
    try:
        while True:
            assert isinstance(state, IrlsState)
            state = step(state, combine([round_of(o.partials[0]) for o in outcomes]))
            if not isinstance(state, IrlsState):
                break
            if state.iteration > shown and (noisy or state.deviance is not None):
                shown = state.iteration
                await progress(f"iteration {shown}: " + (
                    "noised round" if noisy else f"deviance {state.deviance:.10g}"))
            round_no += 1
            assert state.beta is not None
            outcomes = await rounds(round_no, [float(b) for b in state.beta], sites)
            dropped = [o for o in outcomes if o.state != "done"]
            for o in dropped:
                await dropped_out(replace(o, detail=f"round {round_no}: {o.detail}"))
            if dropped:
                names = ", ".join(f"{o.site} ({o.state}: {o.detail})" for o in dropped)
                return Answer("failed", f"site(s) dropped out at round {round_no}: {names}; "
                              "the fit is not finished over fewer sites than it started "
                              "with")
    except IncompatiblePartials as exc:
        return Answer("failed", f"sites returned incompatible results: {exc}")
    return _glm_answer(job, fan, state)


def _glm_answer(job: VerifiedJob, fan: FanoutResult, out: GlmOutcome) -> Answer:
    if out.fit is None:
        what = {"separation": "perfect or quasi-complete separation",
                "not_converged": "the fit did not converge",
                "singular": "the model is not identifiable"}[out.kind]
        return Answer("failed", f"GLM {out.kind}: {what} ({out.detail}); no estimates are "
                      f"reported ({out.iterations} iterations, {out.rounds} rounds, n = {out.n})")
    f = out.fit

    def num(v: float | None) -> float | None:  # not released under noise: NaN
        return None if v is None or not math.isfinite(v) else v
    rows = [[t, c, s, z, p] for t, c, s, z, p in
            zip(f.terms, f.coefficients, f.std_errors, f.statistics, f.p_values, strict=True)]
    glm = {"family": out.family, "outcome": out.kind, "statistic": f.statistic,
           "terms": list(f.terms), "coefficients": list(f.coefficients),
           "std_errors": list(f.std_errors), "statistics": list(f.statistics),
           "p_values": list(f.p_values), "covariance": [list(r) for r in f.covariance],
           "deviance": num(f.deviance), "null_deviance": num(f.null_deviance),
           "df_residual": f.df_residual, "df_null": f.df_null, "dispersion": f.dispersion,
           "loglik": num(f.loglik), "aic": num(f.aic), "iterations": f.iterations, "rounds": out.rounds,
           "n": f.n, "deviances": list(out.deviances)}
    noised = any(o.epsilon for o in fan.contributors)
    notes = [f"{out.family} GLM by IRLS over {len(fan.contributors)} site(s): converged in "
             f"{f.iterations} iterations ({out.rounds} rounds), n = {f.n}" + (
                 ", under differential privacy (noised rounds; n is noised; no deviance)"
                 if noised else
                 f", deviance {f.deviance:.6g}, null deviance "
                 f"{'n/a' if f.null_deviance is None else format(f.null_deviance, '.6g')}, "
                 f"AIC {f.aic:.6g}")]
    result = {"columns": GLM_COLUMNS, "rows": rows, "glm": glm, "notes": notes}
    return _pack(job, fan, result, f"{len(fan.contributors)} site(s) contributed")


def pool_estimates(job: VerifiedJob, model: AggSpec, fan: FanoutResult) -> Answer:
    """meta(...): each contributing site's own estimates, pooled per coefficient."""
    refused = _too_few(job, fan)
    if refused is not None:
        return refused
    contributors = fan.contributors
    parts = [o.partials[0] for o in contributors]
    terms: list[str] = parts[0].meta.get("terms") or []
    if any(p.kind != "estimate" or p.meta.get("terms") != terms for p in parts):
        return Answer("failed", "sites returned incompatible results: their estimates are "
                      "for different coefficients")
    sites = [o.site for o in contributors]
    rows: list[list[Any]] = []
    per_term: list[dict[str, Any]] = []
    try:
        for i, term in enumerate(terms):
            ma = meta_analysis(sites, [float(p.stats["est"][i]) for p in parts],
                               [float(p.stats["se"][i]) for p in parts])
            rows += [[term, m, *_pooled_row(ma.pooled(m))] for m in ("fixed", "dl", "reml")]
            per_term.append({"term": term, **_meta_doc(ma, [p.n for p in parts])})
    except ValueError as exc:
        return Answer("failed", f"sites returned unusable estimates: {exc}")
    notes = [f"meta-analysis of {model.name} over {len(sites)} site(s): fixed effect, "
             "DerSimonian-Laird and REML random effects"]
    result = {"columns": META_COLUMNS, "rows": rows, "meta": per_term, "notes": notes}
    return _pack(job, fan, result, f"{len(sites)} site(s) contributed")


def _pooled_row(p: Pooled) -> list[float]:
    return [p.estimate, p.std_error, p.ci_low, p.ci_high, p.z, p.p_value, p.tau2, p.i2]


def _pooled_doc(p: Pooled) -> dict[str, Any]:
    return {"estimate": p.estimate, "std_error": p.std_error, "ci_low": p.ci_low,
            "ci_high": p.ci_high, "z": p.z, "p_value": p.p_value, "tau2": p.tau2, "i2": p.i2,
            "converged": p.converged}


def _meta_doc(ma: MetaAnalysis, ns: list[int]) -> dict[str, Any]:
    h = ma.heterogeneity
    return {
        "k": ma.k, "fixed": _pooled_doc(ma.fixed), "dl": _pooled_doc(ma.dl),
        "reml": _pooled_doc(ma.reml),
        "heterogeneity": {"q": h.q, "df": h.df, "p_value": h.p_value, "i2": h.i2},
        "sites": [{"site": r.site, "n": n, "estimate": r.estimate, "std_error": r.std_error,
                   "ci_low": r.ci_low, "ci_high": r.ci_high, "weight_fixed": r.weight_fixed,
                   "weight_dl": r.weight_dl, "weight_reml": r.weight_reml}
                  for r, n in zip(ma.sites, ns, strict=True)],
        "leave_one_out": [{"omitted": lo.omitted, "fixed": _pooled_doc(lo.fixed),
                           "dl": _pooled_doc(lo.dl), "reml": _pooled_doc(lo.reml),
                           "i2": lo.heterogeneity.i2, "q": lo.heterogeneity.q}
                          for lo in ma.leave_one_out],
    }

