"""Accuracy of the noised federated logistic regression (privacy/glm_noise.py) on CNSIM.

The three CNSIM cohorts as three sites, each round computed and noised exactly as a site
does (query/models.py, privacy/glm_noise.py with OpenDP's samplers), driven by the entry's
noised IRLS (query/glm_noisy.py), in-process (no network: the noise, not the transport, is
measured). For ε = 1, 5, 10 (the whole fit's ε at each site), over --trials fits: how many
converged, failed as singular or did not settle, and for the converged ones the median
absolute error of each coefficient against the exact pooled fit, in units of its exact
standard error. Bounds are the catalog's: their widths drive the noise.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from collections import Counter

import numpy as np
from _common import ROOT  # type: ignore[import-not-found]

sys.path.insert(0, str(ROOT))
from stimnet.query.fields import FieldMeta  # noqa: E402
from stimnet.query.sql import parse_sql  # noqa: E402
from stimnetd.privacy import glm_noise  # noqa: E402
from stimnetd.privacy.noise import NoiseMechanism  # noqa: E402
from stimnetd.query import glm_noisy  # noqa: E402
from stimnetd.query.aggregate import Partial  # noqa: E402
from stimnetd.query.design import Formula, design  # noqa: E402
from stimnetd.query.glm import IrlsState, combine, fit, site_round, start  # noqa: E402
from stimnetd.query.models import round_of  # noqa: E402
from stimnetd.testing import shared_data  # noqa: E402

FORMULA = Formula("DIS_DIAB", ("PM_BMI_CONTINUOUS", "LAB_TSC"))


def _fields(bmi: tuple[float, float], tsc: tuple[float, float]) -> dict[str, FieldMeta]:
    return {"DIS_DIAB": FieldMeta("DIS_DIAB", "lab", "integer", bounds=(0, 1)),
            "PM_BMI_CONTINUOUS": FieldMeta("PM_BMI_CONTINUOUS", "lab", "numeric", bounds=bmi),
            "LAB_TSC": FieldMeta("LAB_TSC", "lab", "numeric", bounds=tsc)}


def _sites(fields: dict[str, FieldMeta]) -> list[tuple[np.ndarray, np.ndarray]]:
    import pandas as pd

    out = []
    for i in (1, 2, 3):
        df = pd.read_csv(shared_data("cnsim", f"CNSIM{i}.csv"))
        df.columns = [c.strip() for c in df.columns]
        for f in FORMULA.terms:
            lo, hi = fields[f].bounds or (-np.inf, np.inf)
            df[f] = df[f].clip(lo, hi)
        d = design(df, FORMULA, {})
        out.append((d.x, d.y))
    return out


def _noised_fit(sites, model, fields, epsilon, noise) -> tuple[str, np.ndarray | None]:  # type: ignore[no-untyped-def]
    plan = glm_noise.plan(model, fields, epsilon, rounds=26)
    state = start("binomial", 3, terms=("Intercept", *FORMULA.terms))
    ns: list[int | None] = [None] * len(sites)
    while isinstance(state, IrlsState):
        rounds = []
        for i, (x, y) in enumerate(sites):
            r = site_round(x, y, state.beta, "binomial")
            p = Partial("glm", "glm_round", (), r.n, {"xtwx": r.xtwx, "xtwz": r.xtwz,
                                                      "sums": np.zeros(6)}, {})
            q, _ = glm_noise.noised(p, plan, noise, ns[i])
            ns[i] = q.n
            rounds.append(round_of(q))
        state = glm_noisy.advance(state, combine(rounds))
    return state.kind, None if state.fit is None else np.array(state.fit.coefficients)


def main(trials: int) -> None:
    noise = NoiseMechanism()
    model = parse_sql("SELECT glm('DIS_DIAB ~ PM_BMI_CONTINUOUS + LAB_TSC', 'binomial') "
                      "FROM cnsim").model
    assert model is not None
    for label, bmi, tsc in (("test catalog bounds BMI [0, 100], TSC [0, 20]", (0, 100), (0, 20)),
                            ("tight bounds BMI [10, 60], TSC [1, 12]", (10, 60), (1, 12))):
        fields = _fields(bmi, tsc)
        sites = _sites(fields)
        exact = fit([lambda b, x=x, y=y: site_round(x, y, b, "binomial") for x, y in sites], 3,
                    "binomial")
        assert exact.fit is not None
        beta, se = np.array(exact.fit.coefficients), np.array(exact.fit.std_errors)
        print(f"CNSIM, 3 sites, n = {exact.n}, {label}; exact β = {np.round(beta, 4).tolist()}")
        for epsilon in (1.0, 5.0, 10.0):
            kinds: Counter[str] = Counter()
            errors: list[np.ndarray] = []
            for _ in range(trials):
                kind, b = _noised_fit(sites, model, fields, epsilon, noise)
                kinds[kind] += 1
                if b is not None:
                    errors.append(np.abs(b - beta) / se)
            med = [round(statistics.median(e[j] for e in errors), 2) for j in range(3)] \
                if errors else None
            print(f"  ε = {epsilon:4g}: {dict(kinds)} of {trials}; median |error| / SE per "
                  f"coefficient (converged fits): {med}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=20)
    main(parser.parse_args().trials)
