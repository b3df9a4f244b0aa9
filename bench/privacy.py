"""Accuracy of DP releases at epsilon 1: measured error next to the analytic expectation and
the even-split baseline, on the demo cohort (one site) and on CNSIM1.

For each statistic the site's real path is run: the engine's exact partials, then
privacy/noise.add_noise with the planned split (per output, parallel over groups, a sum
and a count for avg), `TRIALS` times with OpenDP's samplers, and finalised. Relative RMSE
is printed next to

* the analytic expectation for the mechanism (delta method on every noised element, the
  derivatives taken through add_noise itself so centring and its rebuild are included,
  with the discrete/float Laplace variances 2α/(1−α)² and 2b²), goal: measured within 1.2×;
* the even split this replaced (every array of every partial, including an average's
  unused sum of squares, one share each), measured the same way; goal: ≥ 2× smaller error.

Cases: count, mean and variance of a field, a regression's slope (from the noised cross-
products) and a voxel count map (relative to the mean count of the voxels covered).
"""

from __future__ import annotations

import dataclasses
import math
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from stimnet.query.sql import parse_sql
from stimnetd.catalog.loader import load_catalog
from stimnetd.config import load_config
from stimnetd.privacy.noise import NoiseMechanism, add_noise
from stimnetd.query.engine import compute
from stimnetd.query.result import finalize, fit_regression
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
                        "LAB_HDL": {"table": "lab", "type": "numeric", "bounds": [0, 5]},
                        "GENDER": {"table": "lab", "type": "categorical",
                                   "levels": ["0", "1"]}}}
    pki = CertFactory(tmp / "pki")
    cfg = load_config(write_node_config(tmp / "node", pki.issue("n", "node"), "n",
                                        catalogs=[demo, cnsim]))
    return {c.name: load_catalog(c) for c in cfg.catalogs}


def _noise_var(mechanism: str, scale: float) -> float:
    if mechanism == "laplace":
        return 2 * scale * scale
    a = math.exp(-1 / scale)
    return 2 * a / (1 - a) ** 2


class Bump:
    """No noise, except `delta` added to element `index` of sampler call number `call`: the
    finite differences of a finalised value against each noised element."""

    def __init__(self, call: int = -1, index: int = 0, delta: float = 0.0) -> None:
        self.call, self.index, self.delta, self.k = call, index, delta, 0

    def _out(self, values: np.ndarray, dtype: type) -> np.ndarray:
        out = np.asarray(values, dtype=np.float64).copy()
        if self.k == self.call:
            out.flat[self.index] += self.delta
        self.k += 1
        return out.astype(dtype)

    def laplace(self, values: np.ndarray, scale: float) -> np.ndarray:
        return self._out(values, np.float64)

    def discrete_laplace(self, values: np.ndarray, scale: float) -> np.ndarray:
        return self._out(np.rint(values), np.int64)


def expected_rmse(case: Case, inputs: list, fields, report) -> float:  # type: ignore[no-untyped-def]
    """Delta method on the finalised value: Σ (∂f/∂e)² Var(e) over every noised element e
    of the case's output, the derivatives by finite differences through add_noise (so the
    centring and its rebuild are included), Var from each array's mechanism and scale."""
    base = case.value(add_noise(inputs, fields, EPS, Bump(), partitioned=True)[0])
    total = 0.0
    for call, a in enumerate(report.arrays):
        if a.output != case.output:
            continue
        size = SIZES[(a.output, a.stat)]
        if size > 64:  # a voxel map's count: the finalised value is the array itself
            total += _noise_var(a.mechanism, a.scale)
            continue
        step = 1.0 if a.mechanism != "laplace" else max(a.scale * 1e-3, 1e-6)
        for i in range(size):
            bumped = case.value(add_noise(inputs, fields, EPS, Bump(call, i, step),
                                          partitioned=True)[0])
            total += ((bumped - base) / step) ** 2 * _noise_var(a.mechanism, a.scale)
    return math.sqrt(total)


# Elements each array hands its sampler (crossprod: the upper triangle), filled per case.
SIZES: dict[tuple[str, str], int] = {}


@dataclass(frozen=True)
class Case:
    label: str
    catalog: str
    sql: str
    output: str
    read: str  # "n", "scalar:<column>", "slope", "map"
    column: int = 0

    def value(self, partials: list) -> float:
        p = next(q for q in partials if q.name == self.output)
        if self.read == "map":
            return float(np.asarray(p.stats["count"], dtype=np.float64).ravel()[MAP_PROBE[0]])
        if self.read == "slope":
            fit = fit_regression(p.stats["m"], lambda _msg: None)
            return float((fit.get("coefficients") or [math.nan, math.nan])[1])
        return float(finalize(parse_sql(self.sql), partials).rows[0][self.column])


# The voxel the map's expectation is taken at (its error is the same at every voxel).
MAP_PROBE = [0]

CASES = [
    Case("count", "dbs_outcomes", "SELECT count(*), avg(age) FROM dbs_outcomes", "count(*)",
         "scalar", 0),
    Case("mean", "dbs_outcomes", "SELECT count(*), avg(age) FROM dbs_outcomes", "avg(age)",
         "scalar", 1),
    Case("var", "dbs_outcomes", "SELECT count(*), variance(age) FROM dbs_outcomes",
         "variance(age)", "scalar", 1),
    Case("regress", "dbs_outcomes", "SELECT regress(updrs_change, updrs_off) FROM dbs_outcomes",
         "regress(updrs_change, updrs_off)", "slope"),
    Case("count_map", "dbs_outcomes", "SELECT count_map(vta_path) FROM dbs_outcomes",
         "count_map(vta_path)", "map"),
    Case("count", "cnsim", "SELECT count(LAB_TSC), avg(LAB_TSC) FROM cnsim", "count(LAB_TSC)",
         "scalar", 0),
    Case("mean", "cnsim", "SELECT count(LAB_TSC), avg(LAB_TSC) FROM cnsim", "avg(LAB_TSC)",
         "scalar", 1),
    Case("var", "cnsim", "SELECT count(LAB_TSC), variance(LAB_TSC) FROM cnsim",
         "variance(LAB_TSC)", "scalar", 1),
    Case("regress", "cnsim", "SELECT regress(LAB_HDL, LAB_TSC) FROM cnsim",
         "regress(LAB_HDL, LAB_TSC)", "slope"),
]


def main() -> int:
    with tempfile.TemporaryDirectory() as tmp:
        cats = catalogs(Path(tmp))
        print(f"relative RMSE at epsilon {EPS}, {TRIALS} trials each (planned split vs "
              "analytic expectation vs even split; a map over the voxels its subjects cover)")
        for case in CASES:
            planned, expect, truth = measure(cats[case.catalog], case, even=False)
            even, _, _ = measure(cats[case.catalog], case, even=True)
            print(f"{case.catalog:13s} {case.label:9s} true {truth:10.4g}  measured "
                  f"{planned:8.3%}  expected {expect:8.3%} (ratio {planned / expect:4.2f}, "
                  f"goal <= 1.2)  even split {even:8.3%} (x{even / planned:4.2f} better, "
                  "goal >= 2)")
    return 0


def measure(catalog, case: Case, even: bool) -> tuple[float, float, float]:  # type: ignore[no-untyped-def]
    """Relative RMSE over TRIALS releases with OpenDP's samplers, the analytic expectation
    (planned split only) and the true value. `even`: the split this replaced (every array
    one share, uncentred: the partials' func is hidden from the planner)."""
    spec = parse_sql(case.sql)
    exact = compute(spec, catalog).partials
    mech = NoiseMechanism()
    inputs = [dataclasses.replace(p, meta={k: v for k, v in p.meta.items() if k != "func"})
              for p in exact] if even else exact
    target = next(p for p in exact if p.name == case.output)
    if case.read == "map":
        covered = np.asarray(target.stats["count"]).ravel() > 0
        truth_map = np.asarray(target.stats["count"], dtype=np.float64).ravel()[covered]
        MAP_PROBE[0] = int(np.flatnonzero(covered)[0])
    true_value = case.value(exact)
    errors, expect = [], 0.0
    failed = 0
    for _ in range(TRIALS if case.read != "map" else TRIALS // 80):
        noised, report = add_noise(inputs, catalog.fields, EPS, mech, partitioned=not even)
        noised = [dataclasses.replace(q, meta=p.meta) for q, p in zip(noised, exact, strict=True)]
        if case.read == "map":
            got = np.asarray(next(q for q in noised if q.name == case.output).stats["count"],
                             dtype=np.float64).ravel()[covered]
            errors.append(float(np.mean((got - truth_map) ** 2)))
        elif math.isfinite(value := case.value(noised)):
            errors.append((value - true_value) ** 2)
        else:
            failed += 1  # a fit whose noised XᵀX is singular reports no coefficients
        if not expect and not even:
            SIZES.update({(a.output, a.stat): _size(exact, a) for a in report.arrays})
            expect = expected_rmse(case, inputs, catalog.fields, report)
    scale = float(np.mean(truth_map)) if case.read == "map" else abs(true_value)
    if failed:
        print(f"  ({case.catalog} {case.label}, {'even' if even else 'planned'} split: "
              f"{failed} of {failed + len(errors)} fits reported no coefficients)")
    rmse = math.sqrt(float(np.mean(errors))) if errors else math.nan
    return rmse / scale, expect / scale, \
        (float(np.mean(truth_map)) if case.read == "map" else true_value)


def _size(partials: list, a) -> int:  # type: ignore[no-untyped-def]
    p = next(q for q in partials if q.name == a.output and q.group == a.group)
    if a.stat == "<n>":
        return 1
    arr = np.asarray(p.stats[a.stat])
    return arr.shape[0] * (arr.shape[0] + 1) // 2 if p.kind == "crossprod" else arr.size


if __name__ == "__main__":
    sys.exit(main())
