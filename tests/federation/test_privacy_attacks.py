"""An attacker with an ordinary researcher certificate, on real daemons, under dp = "required".

The DP bound, as a hypothesis test: for an (ε, δ)-DP release any attacker's test of "we are
in world one" has power at most e^ε times its false-alarm rate, plus δ. Each attack is
played on two catalogs that differ only in the target's value, RUNS times in each; ε and δ
are what the ledger charged one run (read back from it, not assumed). The test fails if
the attacker's measured power beats the bound beyond what sampling allows, at a false-alarm
rate of FAMILY_ALPHA (Clopper-Pearson bounds on both rates). Every attack is also played
without noise and without auditing, where it must win every time: the test has teeth.

STIMNET_ATTACK_RUNS sets RUNS (150 by default; more for a longer run, whose tests are then
sharper: the sampling slack shrinks as 1/√RUNS).
"""

from __future__ import annotations

import math
import os
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from stimctl.client import AsyncClient, JobFailed
from stimnetd.privacy.threshold import threshold
from tests.federation.attack_catalog import TARGET_AGE, ward
from tests.federation.test_exact_attacks import crossproducts

FAMILY_ALPHA = 1e-3
EPS = 0.5
DELTA = 1e-6
RUNS = int(os.environ.get("STIMNET_ATTACK_RUNS", "150"))
TEETH_RUNS = 3
REQUIRED = {"dp": "required", "default_epsilon": EPS, "budget_epsilon": 1e6,
            "budget_delta": 0.5, "delta": DELTA}
EXACT = {"dp": "off", "overlap_guard": False}

# The attacker's test: given a client and a catalog name, "is this world one?"
Guess = Callable[[AsyncClient, str], Awaitable[bool]]


@dataclass(frozen=True)
class Played:
    said_one: dict[str, int]  # per world, how often the attacker said "world one"
    runs: int
    epsilon: float  # charged per run
    delta: float


def bounds(k: int, n: int) -> tuple[float, float]:
    a = FAMILY_ALPHA / 2
    lo = 0.0 if k == 0 else float(stats.beta.ppf(a / 2, k, n - k + 1))
    hi = 1.0 if k == n else float(stats.beta.ppf(1 - a / 2, k + 1, n - k))
    return lo, hi


def within_dp_bound(p: Played) -> bool:
    power_lo, _ = bounds(p.said_one["one"], p.runs)
    _, false_alarm_hi = bounds(p.said_one["two"], p.runs)
    return power_lo <= math.exp(p.epsilon) * false_alarm_hi + p.delta + 1e-9


async def play(federation, worlds: tuple[dict, dict], privacy: dict, guess: Guess,  # type: ignore[no-untyped-def]
               runs: int) -> Played:
    """`worlds`: catalog entries named "one" and "two"."""
    said = {}
    async with federation([list(worlds)], privacy=privacy) as fed, fed.client() as c:
        for world in ("one", "two"):
            said[world] = 0
            for _ in range(runs):
                said[world] += bool(await guess(c, world))
        store = fed.daemons[0].store
        eps = [await store.spent("alice", w) / runs for w in ("one", "two")]
        dlt = [await store.spent_delta("alice", w) / runs for w in ("one", "two")]
    assert eps[0] == pytest.approx(eps[1]) and dlt[0] == pytest.approx(dlt[1])
    return Played(said, runs, eps[0], dlt[0])


async def check(federation, tmp_path: Path, make: Callable[[Path, str, bool], dict],  # type: ignore[no-untyped-def]
                guess: Guess, mode: str, runs: int = RUNS) -> None:
    """Under required the attacker is within the DP bound (and the run was charged);
    exact and unaudited, the same attacker is always right."""
    worlds = (make(tmp_path / "one", "one", True), make(tmp_path / "two", "two", False))
    if mode == "required":
        played = await play(federation, worlds, REQUIRED, guess, runs)
        assert 0 < played.epsilon <= 2 * EPS + 1e-9, played
        assert within_dp_bound(played), played
    else:
        played = await play(federation, worlds, EXACT, guess, TEETH_RUNS)
        assert played.said_one == {"one": TEETH_RUNS, "two": 0}


async def rows(c: AsyncClient, sql: str, epsilon: float | None = None) -> list | None:  # type: ignore[type-arg]
    """The answer's rows, or None when every output was withheld."""
    try:
        return (await c.query(sql, epsilon=epsilon)).rows
    except JobFailed as failed:
        if "withheld" in str(failed):
            return None
        raise


MODES = ["required", "exact"]


# --- differencing count: "PD patients, or the target if PD" (the original attack) ---

def by_diagnosis(root: Path, name: str, one: bool) -> dict:
    return ward(root, name, n=120, target_pd=one)


OTHER_PD = sum(i % 4 != 3 for i in range(119))  # PD patients but the target, at n = 120


async def count_guess(c: AsyncClient, world: str) -> bool:
    got = await rows(c, f"SELECT count(*) FROM {world} WHERE diagnosis = 'PD' AND age != "
                        f"{TARGET_AGE} OR age = {TARGET_AGE} AND diagnosis = 'PD'")
    return got is not None and got[0][0] is not None and got[0][0] > OTHER_PD


@pytest.mark.parametrize("mode", MODES)
async def test_differencing_count(federation, tmp_path: Path, mode: str) -> None:
    """count(PD patients OR the target) against the others, known: within the bound."""
    await check(federation, tmp_path, by_diagnosis, count_guess, mode)


# --- grouped NULL padding: two GROUP BY sex means whose used sets differ by the target ---

def by_updrs(root: Path, name: str, one: bool) -> dict:
    return ward(root, name, n=192, target_updrs=-5.0 if one else -40.0)


def group_sum(got: list | None, label: str) -> float | None:  # type: ignore[type-arg]
    row = next((r for r in got or [] if r[0] == label), None)
    return None if row is None or None in row else row[1] * row[2]


async def padding_guess(c: AsyncClient, world: str) -> bool:
    q = f"SELECT sex, count(updrs), avg(updrs) FROM {world} WHERE {{}} GROUP BY sex"
    with_t = group_sum(await rows(c, q.format("diagnosis = 'PD'")), "F")
    without = group_sum(await rows(c, q.format(f"age != {TARGET_AGE}")), "F")
    return with_t is not None and without is not None and with_t - without > -22.5


@pytest.mark.parametrize("mode", MODES)
async def test_grouped_null_padding(federation, tmp_path: Path, mode: str) -> None:
    """The target's updrs (-5 or -40) from two padded GROUP BY means: within the bound."""
    await check(federation, tmp_path, by_updrs, padding_guess, mode)


# --- edge-shifted histograms in one query ---

def by_diagnosis_large(root: Path, name: str, one: bool) -> dict:
    return ward(root, name, n=192, target_pd=one)


async def histogram_guess(c: AsyncClient, world: str) -> bool:
    try:
        ans = await c.query(f"SELECT histogram(age, 0, 77.4, 100) AS a, "
                            f"histogram(age, 0, 77.6, 100) AS b FROM {world} "
                            "WHERE diagnosis = 'PD'")
    except JobFailed:
        return False
    h = {r["name"]: r["counts"][0] for r in ans.result["histograms"]}
    return None not in h.values() and h["b"] - h["a"] > 0.5


@pytest.mark.parametrize("mode", MODES)
async def test_edge_shifted_histograms(federation, tmp_path: Path, mode: str) -> None:
    """Whether the target is a PD patient from two histograms' first bins: within the bound."""
    await check(federation, tmp_path, by_diagnosis_large, histogram_guess, mode)


# --- regression moment recovery with padding: Σ duration over the PD patients ---

def by_duration(root: Path, name: str, one: bool) -> dict:
    cat = ward(root, name, n=192)
    frame = pd.read_csv(Path(cat["root"]) / "s.csv")
    frame.loc[len(frame) - 1, "duration"] = 38.0 if one else 2.0
    frame.to_csv(Path(cat["root"]) / "s.csv", index=False)
    return cat


async def regression_guess(c: AsyncClient, world: str) -> bool:
    # Both queries are always asked, so every run is charged the same.
    try:
        reg = (await c.query(f"SELECT regress(updrs, duration) FROM {world}"))\
            .result["regressions"][0]
    except JobFailed:
        reg = None
    got = await rows(c, f"SELECT count(*), avg(duration) FROM {world} "
                        f"WHERE diagnosis = 'PD' AND age != {TARGET_AGE}")
    try:
        _, sx, _ = crossproducts(reg)  # type: ignore[arg-type]
    except (TypeError, ValueError, ZeroDivisionError):
        return False  # withheld, or noise made the published output inconsistent
    if got is None or None in got[0]:
        return False
    return sx - got[0][0] * got[0][1] > 20


@pytest.mark.parametrize("mode", MODES)
async def test_regression_moment_recovery(federation, tmp_path: Path, mode: str) -> None:
    """The target's duration (38 or 2) from a regression's published output and a padded
    mean: within the bound."""
    await check(federation, tmp_path, by_duration, regression_guess, mode)


# --- unions of more than 6 groups ---

def by_duration_grouped(root: Path, name: str, one: bool) -> dict:
    cat = ward(root, name, n=12 * 80)
    frame = pd.read_csv(Path(cat["root"]) / "s.csv")
    frame.loc[len(frame) - 1, "duration"] = 38.0 if one else 2.0
    frame.to_csv(Path(cat["root"]) / "s.csv", index=False)
    return cat


async def union_guess(c: AsyncClient, world: str) -> bool:
    groups = await rows(c, f"SELECT grp, count(*), avg(duration) FROM {world} GROUP BY grp")
    union = await rows(c, f"SELECT count(*), avg(duration) FROM {world} "
                          f"WHERE grp != 'g11' OR age = {TARGET_AGE}")
    parts = [group_sum(groups, f"g{i:02d}") for i in range(11)]
    if union is None or None in union[0] or None in parts:
        return False
    return union[0][0] * union[0][1] - sum(parts) > 20  # type: ignore[arg-type]


@pytest.mark.parametrize("mode", MODES)
async def test_union_of_eleven_groups(federation, tmp_path: Path, mode: str) -> None:
    """The target's duration from 11 of 12 groups and their union with the target: within
    the bound."""
    await check(federation, tmp_path, by_duration_grouped, union_guess, mode)


# --- mean_map weight differencing ---

def by_updrs_imaged(root: Path, name: str, one: bool) -> dict:
    return ward(root, name, n=96, target_updrs=-5.0 if one else -40.0, with_images=True)


async def mean_map_guess(c: AsyncClient, world: str) -> bool:
    totals = []
    for where in ("diagnosis = 'PD'", f"age != {TARGET_AGE}"):
        try:
            ans = await c.query(f"SELECT mean_map(vta, updrs) AS m FROM {world} WHERE {where}")
            totals.append(float(ans.map_array("m", "count")[0, 0, 0]
                                * ans.map_array("m", "mean")[0, 0, 0]))
        except JobFailed:
            totals.append(math.nan)
    return bool(np.isfinite(totals).all()) and totals[0] - totals[1] > -22.5


@pytest.mark.parametrize("mode", MODES)
async def test_mean_map_weight_differencing(federation, tmp_path: Path, mode: str) -> None:
    """The target's updrs from two weighted maps whose used sets differ by them: within the
    bound (a third of RUNS: each query reads every subject's image)."""
    await check(federation, tmp_path, by_updrs_imaged, mean_map_guess, mode, runs=RUNS // 3)


# --- a suppression oracle driven by binary search ---

ORACLE_STEPS = 5


def oracle_guess(g_size: int, epsilon: float | None) -> Guess:
    """Binary search for the target's updrs in [-60, 20] by whether
    count(G OR (target AND updrs <= v)) is released, G the `g_size` youngest subjects
    (one short of the release threshold); "world one" if the search ends above -22.5."""
    g_top = 40.0 + 0.25 * g_size  # ages are 40, 40.25, ... at n = 192

    async def guess(c: AsyncClient, world: str) -> bool:
        lo, hi = -60.0, 20.0
        for _ in range(ORACLE_STEPS):
            v = (lo + hi) / 2
            got = await rows(c, f"SELECT count(*) FROM {world} WHERE age < {g_top} OR "
                                f"age = {TARGET_AGE} AND updrs <= {v}", epsilon)
            released = got is not None and got[0][0] is not None
            lo, hi = (lo, v) if released else (v, hi)
        return (lo + hi) / 2 > -22.5
    return guess


@pytest.mark.parametrize("mode", MODES)
async def test_suppression_oracle_by_binary_search(federation, tmp_path: Path,
                                                   mode: str) -> None:
    """The release decision as an oracle, over 5 queries at ε 0.1 each, with G sized one
    below the noisy threshold (which is public): within the bound. Without noise, G of
    k_min - 1 subjects, the search finds the target's updrs."""
    step = EPS / ORACLE_STEPS
    g_size = threshold(5, 1 / step, DELTA) - 1 if mode == "required" else 4
    await check(federation, tmp_path, by_updrs,
                oracle_guess(g_size, step if mode == "required" else None), mode)
