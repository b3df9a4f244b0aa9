"""Quantiles by bisection on pooled counts of x <= t: `quantile_exact(x, p, ...)`.

Each probability p needs the order statistics x_(r) and x_(r+1) with r = floor((n-1) p)
+ 1 (pandas' linear interpolation: Q = x_(r) + frac * (x_(r+1) - x_(r))). For each, the
entry keeps a bracket (a, b] with count(x <= a) < rank <= count(x <= b), starting from
the declared bounds, and halves it every round by asking every site for its count of
x <= midpoint (sites withhold a count, or its complement, below k_min: privacy/tails.py).
After the rounds (models.BISECT_ROUNDS) each order statistic is known to within
(hi - lo) / 2^rounds, its estimate is the bracket's midpoint, so every quantile is within
(hi - lo) / 2^(rounds + 1) of pooled pandas: the documented bound. A comparison that the
withheld counts leave open stops that bracket where it is, and the note says how wide it
stayed and how many subjects' counts were withheld. Quantiles outside the declared
bounds come back as the bound they lie beyond.
"""

from __future__ import annotations

import math
from collections.abc import Awaitable, Callable

import numpy as np

from stimnet import codec
from stimnet.query.spec import AggSpec
from stimnet.signing import VerifiedJob
from stimnetd.federation.fanout import FanoutResult
from stimnetd.jobs.answer import Answer
from stimnetd.jobs.models import Progress, RoundRunner, _too_few
from stimnetd.query.models import BISECT_ROUNDS
from stimnetd.site import SiteOutcome


def _pooled(outcomes: list[SiteOutcome], k_min_hint: int) -> tuple[np.ndarray, np.ndarray]:
    """Per threshold, the pooled count's lower and upper bounds."""
    lo = np.zeros(len(outcomes[0].partials[0].stats["le"]))
    hi = lo.copy()
    for o in outcomes:
        p = o.partials[0]
        le, side = np.asarray(p.stats["le"]), np.asarray(p.stats["side"])
        k = int(p.meta.get("k_min", k_min_hint))
        lo += np.where(side == 0, le, np.where(side < 0, 0, max(p.n - k + 1, 0)))
        hi += np.where(side == 0, le, np.where(side < 0, k - 1, p.n))
    return lo, hi


async def bisect_quantiles(job: VerifiedJob, model: AggSpec, fan: FanoutResult,
                           rounds: RoundRunner, progress: Progress,
                           dropped_out: Callable[[SiteOutcome], Awaitable[None]],
                           k_min: int) -> Answer:
    refused = _too_few(job, fan)
    if refused is not None:
        return refused
    sites = [o.site for o in fan.contributors]
    first = fan.contributors[0].partials[0]
    if any(o.partials[0].kind != "threshold_counts" for o in fan.contributors):
        return Answer("failed", "sites returned incompatible results for a quantile bisection")
    lo_b, hi_b = float(first.meta["lo"]), float(first.meta["hi"])
    n = sum(o.partials[0].n for o in fan.contributors)
    if n < 1:
        return Answer("failed", "no values to take quantiles of")
    probs = list(model.params)
    ranks = []
    for p in probs:
        r = math.floor((n - 1) * p) + 1
        ranks += [r, min(r + 1, n)]
    rank = np.array(ranks, dtype=np.float64)
    a, b = np.full(rank.size, lo_b), np.full(rank.size, hi_b)
    t = np.full(rank.size, (lo_b + hi_b) / 2.0)
    open_ = np.ones(rank.size, dtype=bool)
    withheld = 0.0
    outcomes = fan.contributors
    for round_no in range(1, BISECT_ROUNDS + 1):
        low, high = _pooled(outcomes, k_min)
        withheld = max(withheld, float(np.max(high - low)))
        left = open_ & (low >= rank)  # count(x <= t) >= rank: x_(rank) <= t
        right = open_ & (high < rank)
        b = np.where(left, t, b)
        a = np.where(right, t, a)
        open_ &= left | right  # an undecided comparison stops its bracket
        await progress(f"bisection round {round_no}: brackets at most "
                       f"{float(np.max(b - a)):.6g} wide")
        if round_no == BISECT_ROUNDS or not open_.any():
            break
        t = np.where(open_, (a + b) / 2.0, t)
        outcomes = await rounds(round_no + 1, [float(v) for v in t], sites)
        dropped = [o for o in outcomes if o.state != "done"]
        for o in dropped:
            await dropped_out(o)
        if dropped:
            return Answer("failed", "site(s) dropped out at round " + str(round_no + 1) + ": "
                          + ", ".join(f"{o.site} ({o.state}: {o.detail})" for o in dropped))
    return _answer(job, model, fan, n, probs, a, b, withheld)


def _answer(job: VerifiedJob, model: AggSpec, fan: FanoutResult, n: int, probs: list[float],
            a: np.ndarray, b: np.ndarray, withheld: float) -> Answer:
    """Each quantile interpolated between its two brackets' midpoints, with the bound."""
    sites = [o.site for o in fan.contributors]
    lo_b, hi_b = (float(fan.contributors[0].partials[0].meta[k]) for k in ("lo", "hi"))
    est = (a + b) / 2.0
    values, rows = [], []
    for i, p in enumerate(probs):
        h = (n - 1) * p
        frac = h - math.floor(h)
        q = est[2 * i] + frac * (est[2 * i + 1] - est[2 * i])
        values.append(q)
        rows.append([p, q])
    width = float(np.max(b - a))
    bound = (hi_b - lo_b) / 2 ** (BISECT_ROUNDS + 1)
    notes = [f"quantiles of {model.fields[0]} by bisection on pooled counts over "
             f"{len(sites)} site(s), n = {n}: within {max(bound, width / 2):.3g} of the pooled "
             f"quantile (linear interpolation) inside the declared bounds "
             f"[{lo_b:g}, {hi_b:g}]"]
    if withheld > 0:
        notes.append(f"withheld mass: some sites reported counts only as '< k_min' or "
                     f"'> n - k_min', leaving up to {withheld:g} subjects' position open in "
                     "a round; " + ("every comparison was still decided" if width <= 2 * bound
                                    else f"a bracket stayed {width:.3g} wide"))
    result = {"columns": ["p", model.name], "rows": rows, "notes": notes,
              "quantiles": {"field": model.fields[0], "probs": probs, "values": values,
                            "n": n, "bound": bound, "withheld": withheld}}
    doc = {"result": result, "manifest": fan.manifest(), "privacy": [],
           "query": job.request.spec, "scope": job.request.scope, "kind": job.request.kind,
           "script_sha256": None}
    return Answer("succeeded", f"{len(sites)} site(s) contributed", codec.pack(doc, {}))
