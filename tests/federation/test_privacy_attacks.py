"""An attacker with one ordinary researcher certificate, on real daemons, under dp = "required".

The DP bound, as a hypothesis test: for an ε-DP release any attacker's test of "the target
is a PD patient" has power at most e^ε times its false-alarm rate, plus δ. The attack is
run on two catalogs that differ only in the target's diagnosis, many times each; the test
fails if the attacker's measured power beats the bound beyond what sampling allows at a
false-alarm rate of FAMILY_ALPHA (Clopper-Pearson bounds on both rates).
"""

from __future__ import annotations

import math
from pathlib import Path

import pandas as pd
from scipy import stats

FAMILY_ALPHA = 1e-3
EPS = 0.5
RUNS = 150


def catalog(root: Path, name: str, target_pd: bool) -> dict:
    root.mkdir(parents=True, exist_ok=True)
    n = 120
    diag = ["PD" if i < 100 else "ET" for i in range(n)]
    ages = [float(20 + i % 50) for i in range(n)]
    ages[-1], diag[-1] = 77.5, "PD" if target_pd else "ET"  # the target: a known, unique age
    pd.DataFrame({"sid": [f"p{i:03d}" for i in range(n)], "age": ages,
                  "diagnosis": diag}).to_csv(root / "s.csv", index=False)
    return {"name": name, "root": str(root), "subject_key": "sid", "tables": {"s": "s.csv"},
            "fields": {"sid": {"table": "s", "type": "id"},
                       "age": {"table": "s", "type": "numeric", "bounds": [0, 100]},
                       "diagnosis": {"table": "s", "type": "categorical",
                                     "levels": ["PD", "ET", "dystonia"]}}}


def bounds(k: int, n: int) -> tuple[float, float]:
    a = FAMILY_ALPHA / 2
    lo = 0.0 if k == 0 else float(stats.beta.ppf(a / 2, k, n - k + 1))
    hi = 1.0 if k == n else float(stats.beta.ppf(1 - a / 2, k + 1, n - k))
    return lo, hi


SQL = ("SELECT count(*) FROM {} WHERE diagnosis = 'PD' AND age != 77.5 "
       "OR age = 77.5 AND diagnosis = 'PD'")


async def attack(federation, tmp_path: Path, privacy: dict) -> dict[str, int]:  # type: ignore[no-untyped-def]
    """How often the attacker says "PD" in each world: when the count exceeds the 100
    known PD patients."""
    cats = [catalog(tmp_path / "a", "world_pd", True), catalog(tmp_path / "b", "world_et", False)]
    guesses = {}
    async with federation([cats], privacy=privacy) as fed, fed.client() as c:
        for world in ("world_pd", "world_et"):
            said_pd = 0
            for _ in range(RUNS):
                count = (await c.query(SQL.format(world))).rows[0][0]
                said_pd += count is not None and count > 100
            guesses[world] = said_pd
    return guesses


def within_dp_bound(guesses: dict[str, int]) -> bool:
    power_lo, _ = bounds(guesses["world_pd"], RUNS)
    _, false_alarm_hi = bounds(guesses["world_et"], RUNS)
    return power_lo <= math.exp(EPS) * false_alarm_hi + 1e-6


async def test_differencing_count_is_no_better_than_the_dp_bound(federation, tmp_path: Path) -> None:
    """count(PD patients OR the target) under required: the attacker's power is within
    e^ε × its false-alarm rate + δ, and the count does carry the noised signal."""
    guesses = await attack(federation, tmp_path, {
        "dp": "required", "default_epsilon": EPS, "budget_epsilon": 1e6, "budget_delta": 0.5,
        "delta": 1e-6})
    assert within_dp_bound(guesses), guesses
    assert 0 < guesses["world_et"] < guesses["world_pd"] < RUNS, guesses


async def test_the_same_test_catches_exact_answers(federation, tmp_path: Path) -> None:
    """The bound test has teeth: without noise (and without auditing, which would refuse
    the repeat) the same attack beats it."""
    guesses = await attack(federation, tmp_path, {"dp": "off", "overlap_guard": False})
    assert guesses == {"world_pd": RUNS, "world_et": 0}
    assert not within_dp_bound(guesses)
