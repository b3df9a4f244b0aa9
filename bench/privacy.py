"""Accuracy of DP releases at epsilon 1: measured error next to the analytic expectation and
the even-split baseline, on the demo cohort (one site) and on CNSIM1.

For each statistic the site's real path is run: the engine's exact partials, then
privacy/noise.add_noise with the planned split (per output, parallel over groups, a sum
and a count for avg), `TRIALS` times with OpenDP's samplers, and finalised. Relative RMSE
is printed next to

* the analytic expectation for the mechanism (delta method on the noised sums, with the
  discrete/float Laplace variances 2α/(1−α)² and 2b²), goal: measured within 1.2×;
* the even split this replaced (every array of every partial, including an average's
  unused sum of squares, one share each), measured the same way; goal: ≥ 2× smaller error.

Regression and voxel maps are not measured here yet (see the README's limitations).
"""

from __future__ import annotations

import dataclasses
import math
import sys
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd

from stimnet.query.sql import parse_sql
from stimnetd.catalog.loader import load_catalog
from stimnetd.config import load_config
from stimnetd.privacy.noise import NoiseMechanism, add_noise
from stimnetd.query.engine import compute
from stimnetd.query.result import finalize
from stimnetd.testing import CertFactory, shared_data, write_node_config

TRIALS = 400
EPS = 1.0


def catalogs(tmp: Path) -> dict[str, object]:
    from stimctl import demodata

    demo = dict(demodata.generate_federation(tmp / "demo", ["site-a"],
                                             n_subjects=300)["site-a"])
    demo["root"] = str(tmp / "demo" / "site-a")
    root = tmp / "cnsim"
    root.mkdir()
    df = pd.read_csv(shared_data("cnsim", "CNSIM1.csv"))
    df.columns = ["row", *[c.strip() for c in df.columns[1:]]]
    df["row"] = [f"s-{r}" for r in df["row"]]
    df.to_csv(root / "lab.csv", index=False)
    cnsim = {"name": "cnsim", "root": str(root), "subject_key": "row",
             "tables": {"lab": "lab.csv"},
             "fields": {"row": {"table": "lab", "type": "id"},
                        "LAB_TSC": {"table": "lab", "type": "numeric", "bounds": [0, 20]},
                        "GENDER": {"table": "lab", "type": "categorical",
                                   "levels": ["0", "1"]}}}
    pki = CertFactory(tmp / "pki")
    cfg = load_config(write_node_config(tmp / "node", pki.issue("n", "node"), "n",
                                        catalogs=[demo, cnsim]))
    return {c.name: load_catalog(c) for c in cfg.catalogs}


def _discrete_var(b: float) -> float:
    a = math.exp(-1 / b)
    return 2 * a / (1 - a) ** 2


def expected_rmse(func: str, p, share_of) -> float:  # type: ignore[no-untyped-def]
    """Delta-method RMSE of the finalised value, from the noise each array gets."""
    n = float(p.stats["n"][0])
    vn = _discrete_var(1 / share_of("n"))
    if func == "count":
        return math.sqrt(vn)
    s1 = float(p.stats["s1"][0])
    s2 = float(p.stats["s2"][0])
    b = max(abs(x) for x in p.meta["bounds"])
    v1 = 2 * (b / share_of("s1")) ** 2
    if func == "mean":
        return math.sqrt(v1 / n**2 + (s1 / n**2) ** 2 * vn)
    v2 = 2 * (b * b / share_of("s2")) ** 2
    g = (s2 - s1 * s1 / n) / (n - 1)
    d2, d1, dn = 1 / (n - 1), -2 * s1 / (n * (n - 1)), (s1 * s1 / n**2 - g) / (n - 1)
    return math.sqrt(d2**2 * v2 + d1**2 * v1 + dn**2 * vn)


CASES = {
    "dbs_outcomes": [("count", "SELECT count(*), avg(age) FROM dbs_outcomes"),
                     ("mean", "SELECT count(*), avg(age) FROM dbs_outcomes"),
                     ("var", "SELECT count(*), variance(age) FROM dbs_outcomes")],
    "cnsim": [("count", "SELECT count(LAB_TSC), avg(LAB_TSC) FROM cnsim"),
              ("mean", "SELECT count(LAB_TSC), avg(LAB_TSC) FROM cnsim"),
              ("var", "SELECT count(LAB_TSC), variance(LAB_TSC) FROM cnsim")],
}


def main() -> int:
    with tempfile.TemporaryDirectory() as tmp:
        cats = catalogs(Path(tmp))
        print(f"relative RMSE at epsilon {EPS}, {TRIALS} trials each "
              "(planned split vs analytic expectation vs even split)")
        for name, cases in CASES.items():
            for func, sql in cases:
                column = 0 if func == "count" else 1
                planned, expect, truth = measure_column(cats[name], sql, func, column, False)
                even, _, _ = measure_column(cats[name], sql, func, column, True)
                print(f"{name:13s} {func:6s} true {truth:10.4g}  measured {planned:8.3%}  "
                      f"expected {expect:8.3%} (ratio {planned / expect:4.2f}, goal <= 1.2)  "
                      f"even split {even:8.3%} (x{even / planned:4.2f} better, goal >= 2)")
    return 0


def measure_column(catalog, sql: str, func: str, column: int,  # type: ignore[no-untyped-def]
                   even: bool) -> tuple[float, float, float]:
    spec = parse_sql(sql)
    exact = compute(spec, catalog).partials
    mech = NoiseMechanism()
    inputs = [dataclasses.replace(p, meta={k: v for k, v in p.meta.items() if k != "func"})
              for p in exact] if even else exact
    true_value = float(finalize(spec, exact).rows[0][column])
    errors, expect = [], 0.0
    for _ in range(TRIALS):
        noised, report = add_noise(inputs, catalog.fields, EPS, mech, partitioned=not even)
        noised = [dataclasses.replace(q, meta=p.meta) for q, p in zip(noised, exact, strict=True)]
        value = finalize(spec, noised).rows[0][column]
        errors.append(((value if value is not None else 0.0) - true_value) ** 2)
        if not expect:
            p = exact[column]
            shares = {a.stat: a.epsilon for a in report.arrays if a.output == p.name}
            expect = expected_rmse(func, p, lambda s, shares=shares: shares[s])
    return math.sqrt(float(np.mean(errors))) / abs(true_value), expect / abs(true_value), \
        true_value


if __name__ == "__main__":
    sys.exit(main())
