"""A site's share of a model query: one IRLS round of a federated GLM, or this site's own
estimates for a meta-analysis.

`glm_*` queries run over several rounds (jobs/models.py drives them): each round a site
evaluates its complete rows at the entry's current β and returns a `glm_round` partial,
every entry of which is a sum over rows (query/glm.py), so the sum over sites is the
round of the pooled rows. `meta_*` queries take one round: each site fits its own model
and returns an `estimate` partial (estimates and standard errors, not additive), which the
entry pools with query/meta.py.

Numeric fields are clamped to their declared bounds, as every other aggregate's are, so
the privacy layer can rely on them; categorical fields are expanded by treatment coding
against their declared levels (query/design.py), so every site builds the same columns.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Final

import numpy as np

from stimnet.errors import QueryError
from stimnet.query.fields import FieldMeta
from stimnet.query.spec import AggSpec
from stimnetd.catalog.columns import Rows
from stimnetd.query.aggregate import Partial
from stimnetd.query.design import Design, Formula, design
from stimnetd.query.glm import GlmControl, GlmRound, fit, site_round
from stimnetd.query.glm_family import FamilyName

# GlmRound's scalar fields in the order of a glm_round partial's `sums` array.
SUMS: Final = ("deviance", "loglik", "y_sum", "y_sq_sum", "y_log_y_sum", "boundary")


def family_of(a: AggSpec) -> FamilyName:
    """The GLM family a glm_* or meta_glm_* output names (meta_mean and meta_regression
    are gaussian fits: a mean is the intercept-only model)."""
    tail = a.func.rsplit("_", 1)[-1]
    return tail if tail in ("binomial", "poisson") else "gaussian"  # type: ignore[return-value]


def control_of(a: AggSpec) -> GlmControl:
    """R's glm.control with the query's most iterations (25 unless it names another)."""
    return GlmControl(maxit=int(a.params[0])) if a.params else GlmControl()


def is_multi_round(a: AggSpec | None) -> bool:
    return a is not None and (a.func.startswith("glm_") or a.func == "quantiles_bisect")


def _design(a: AggSpec, rows: Rows, fields: Mapping[str, FieldMeta]) -> Design:
    formula = Formula(a.fields[0], tuple(a.fields[1:]))
    levels = {f: fields[f].levels for f in a.fields
              if fields[f].type == "categorical" and fields[f].levels}
    frame: dict[str, Any] = {}
    for f in a.fields:
        if f in levels:
            frame[f] = rows.labels(f)
        else:
            x = rows.numbers(f)
            bounds = fields[f].bounds
            frame[f] = x if bounds is None else np.clip(x, bounds[0], bounds[1])
    return design(frame, formula, levels)  # type: ignore[arg-type]


def _mean_design(a: AggSpec, rows: Rows, fields: Mapping[str, FieldMeta]) -> Design:
    """meta_mean: the intercept-only gaussian model of the field."""
    x = rows.numbers(a.fields[0])
    bounds = fields[a.fields[0]].bounds
    x = x if bounds is None else np.clip(x, bounds[0], bounds[1])
    x = x[~np.isnan(x)]
    return Design(x=np.ones((x.size, 1)), y=x, columns=("Intercept",), offset=None,
                  dropped=0)


# Rounds of a quantile bisection: the bracket of each order statistic halves every
# round from [lo, hi], so after them it is (hi - lo) / 2^BISECT_ROUNDS wide.
BISECT_ROUNDS: Final = 11


def rounds_of(a: AggSpec) -> int:
    """The most rounds the signed model `a` may take."""
    return BISECT_ROUNDS if a.func == "quantiles_bisect" else control_of(a).max_rounds


def threshold_partial(a: AggSpec, rows: Rows, fields: Mapping[str, FieldMeta],
                      thresholds: np.ndarray | None) -> Partial:
    """Counts of x <= t for each threshold (round 1: at the bounds' midpoint), and n, the
    non-missing values. `side` is filled in by the privacy layer (privacy/tails.py)."""
    x = rows.numbers(a.fields[0])
    x = x[~np.isnan(x)]
    lo, hi = fields[a.fields[0]].bounds or (0.0, 0.0)
    k = 2 * len(a.params)
    t = np.full(k, (float(lo) + float(hi)) / 2.0) if thresholds is None else thresholds
    if t.shape != (k,):
        raise QueryError(f"a round's thresholds are {t.size} values; this bisection has {k}")
    le = np.searchsorted(np.sort(x), t, side="right").astype(np.float64)
    return Partial(a.name, "threshold_counts", (), int(x.size),
                   {"le": le, "side": np.zeros(k)},
                   {"func": a.func, "terms": [f"t{i}" for i in range(k)],
                    "lo": float(lo), "hi": float(hi)})


def model_partial(a: AggSpec, rows: Rows, fields: Mapping[str, FieldMeta],
                  beta: np.ndarray | None) -> Partial:
    """This site's partial for the model output `a` over `rows` (the filtered cohort)."""
    if a.func == "quantiles_bisect":
        return threshold_partial(a, rows, fields, beta)
    d = _mean_design(a, rows, fields) if a.func == "meta_mean" else _design(a, rows, fields)
    meta: dict[str, Any] = {"func": a.func, "terms": list(d.columns)}
    if a.func.startswith("glm_"):
        if beta is not None and beta.shape != (d.x.shape[1],):
            raise QueryError(f"a round's parameter vector has {beta.size} values; the model "
                             f"has {d.x.shape[1]} coefficients")
        r = site_round(d.x, d.y, beta, family_of(a))
        sums = np.array([getattr(r, k) for k in SUMS], dtype=np.float64)
        return Partial(a.name, "glm_round", (), r.n,
                       {"xtwx": r.xtwx, "xtwz": r.xtwz, "sums": sums},
                       {**meta, "family": family_of(a)})
    return _estimate(a, d, meta)


def _estimate(a: AggSpec, d: Design, meta: dict[str, Any]) -> Partial:
    """This site's own fit (meta-analysis); QueryError when it has no estimates."""
    n = int(d.y.size)
    out = fit([lambda b: site_round(d.x, d.y, b, family_of(a))], d.x.shape[1], family_of(a),
              control=control_of(a), terms=d.columns)
    if out.fit is None:
        raise QueryError(f"{a.name}: this site's own fit has no estimates ({out.kind}: "
                         f"{out.detail})")
    # meta_mean's intercept-only fit: the mean, and s/√n with s² = deviance / (n - 1).
    est = np.array(out.fit.coefficients)
    se = np.array(out.fit.std_errors)
    return Partial(a.name, "estimate", (), n, {"est": est, "se": se}, meta)


def round_of(p: Partial) -> GlmRound:
    """The GlmRound a glm_round partial carries."""
    s = [float(v) for v in p.stats["sums"]]
    return GlmRound(xtwx=np.asarray(p.stats["xtwx"], dtype=np.float64),
                    xtwz=np.asarray(p.stats["xtwz"], dtype=np.float64), deviance=s[0],
                    loglik=s[1], n=int(p.n), y_sum=s[2], y_sq_sum=s[3], y_log_y_sum=s[4],
                    boundary=int(round(s[5])))
