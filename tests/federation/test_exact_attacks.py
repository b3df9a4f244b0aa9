"""An attacker with ordinary researcher certificates against exact releases (dp = "optional").

Each attack is played twice on a real daemon: with the overlap guard off it recovers the
target's exact value (so the attack is real), and with exact auditing on the release that
would complete it is refused, naming the rule and the earlier job(s) and no data.
"""

from __future__ import annotations

import math
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from stimctl.client import AsyncClient, JobFailed
from tests.federation.attack_catalog import TARGET_AGE, ward

OPTIONAL = {"dp": "optional"}
RULE = "refused by exact auditing (rule: no subject's contribution may be derivable)"
PD_NOT_TARGET = f"diagnosis = 'PD' AND age != {TARGET_AGE}"

Attack = Callable[["Asker"], Awaitable[float]]


class Asker:
    """One researcher's client, remembering the jobs it ran (for the refusal's names)."""

    def __init__(self, client: AsyncClient) -> None:
        self.client, self.jobs = client, []

    async def ask(self, sql: str):  # type: ignore[no-untyped-def]
        job = await self.client.submit_query(sql)
        self.jobs.append(job.id)
        return await self.client.run_job(job)


async def play(federation, cat: Callable[[Path], dict], attack: Attack,  # type: ignore[no-untyped-def]
               tmp: Path) -> tuple[Outcome, Outcome]:
    """The attack against a daemon with the overlap guard off (site-a) and one with exact
    auditing on (site-b), each holding its own copy of the catalog."""
    outcomes = []
    async with federation([[cat(tmp / "off")], [cat(tmp / "on")]],
                          per_site=[{"privacy": {**OPTIONAL, "overlap_guard": False}},
                                    {"privacy": OPTIONAL}]) as fed:
        for i in (0, 1):
            async with fed.client(i) as c:
                asker = Asker(c)
                try:
                    outcomes.append(Outcome(await attack(asker), None, asker.jobs))
                except JobFailed as refused:
                    outcomes.append(Outcome(None, refused, asker.jobs))
    return outcomes[0], outcomes[1]


@dataclass(frozen=True)
class Outcome:
    value: float | None
    refused: JobFailed | None
    jobs: list[str]


def assert_refused_helpfully(refused: JobFailed | None, jobs: list[str]) -> None:
    """The site's refusal names the rule, the earlier job(s) it conflicts with (jobs this
    researcher ran) and the way forward, and carries no number: no count, no value."""
    assert refused is not None
    reason = str(refused).split("site-b: refused (", 1)[1]
    assert reason.startswith(RULE), reason
    assert "Ask with differential privacy (--epsilon), or use a coarser grouping" in reason
    named = re.search(r"together with (?:your earlier job\(s\) (.+?)|the other cells or bins "
                      r"of this same query), this release", reason)
    assert named is not None, reason
    earlier = named.group(1).split(", ") if named.group(1) else []
    assert set(earlier) <= set(jobs[:-1]), (earlier, jobs)
    if len(jobs) > 1:
        assert earlier, reason
    for j in earlier:
        reason = reason.replace(j, "")
    assert not re.search(r"\d", reason), reason


async def check(federation, cat: Callable[[Path], dict], attack: Attack, truth: float,  # type: ignore[no-untyped-def]
                tmp: Path, *, abs_tol: float = 1e-6) -> None:
    """Without the guard the attack gives `truth`; with it, the attack is refused."""
    off, on = await play(federation, cat, attack, tmp)
    assert off.refused is None and off.value == pytest.approx(truth, abs=abs_tol)
    assert on.value is None
    assert_refused_helpfully(on.refused, on.jobs)


def imaged(root: Path) -> dict:
    return ward(root, with_images=True)


def sums(ans, value_col: int, n_col: int = 1) -> dict[str, float]:  # type: ignore[no-untyped-def]
    """Per group label, n × mean: the group's sum."""
    return {r[0]: r[n_col] * r[value_col] for r in ans.rows}


async def test_grouped_null_padding_is_refused(federation, tmp_path: Path) -> None:
    """Inside GROUP BY sex: PD patients, then everyone but the target (the ET patients pad
    the WHERE set; their updrs is NULL): the used sets differ by the target only."""
    async def attack(a: Asker) -> float:
        q = "SELECT sex, count(updrs), avg(updrs) FROM ward WHERE {} GROUP BY sex"
        with_t = sums(await a.ask(q.format("diagnosis = 'PD'")), 2)
        without = sums(await a.ask(q.format(f"age != {TARGET_AGE}")), 2)
        return with_t["F"] - without["F"]
    await check(federation, ward, attack, -33.25, tmp_path)


async def test_edge_shifted_histograms_in_one_query_are_refused(federation, tmp_path: Path) -> None:
    """Two histograms of age in one query, first bins ending 0.2 apart around the target's
    age: the bins' difference is whether the target is a PD patient."""
    async def attack(a: Asker) -> float:
        ans = await a.ask("SELECT histogram(age, 0, 77.4, 100) AS a, "
                          "histogram(age, 0, 77.6, 100) AS b FROM ward WHERE diagnosis = 'PD'")
        h = {r["name"]: r["counts"] for r in ans.result["histograms"]}
        return float(h["b"][0] - h["a"][0])
    await check(federation, ward, attack, 1.0, tmp_path)


async def test_unions_of_twelve_groups_are_refused(federation, tmp_path: Path) -> None:
    """avg(duration) by each of 12 groups, then over 11 of them plus the target: the
    difference of the totals is the target's duration (no cap on the number of groups)."""
    async def attack(a: Asker) -> float:
        by_group = sums(await a.ask(
            "SELECT grp, count(*), avg(duration) FROM ward GROUP BY grp"), 2)
        union = (await a.ask("SELECT count(*), avg(duration) FROM ward "
                             f"WHERE grp != 'g11' OR age = {TARGET_AGE}")).rows[0]
        return union[0] * union[1] - sum(v for g, v in by_group.items() if g != "g11")
    await check(federation, ward, attack, 16.0, tmp_path)


def crossproducts(reg: dict) -> tuple[float, float, float]:
    """n, Σx and Σy of a simple regression y ~ x from its published n, coefficients,
    standard errors and RSS (Huth et al. 2023): diag((XᵀX)⁻¹) = SE² · df / RSS."""
    n, (b0, b1), rss, df = reg["n"], reg["coefficients"], reg["rss"], reg["df_residual"]
    d0, d1 = (se * se * df / rss for se in reg["std_errors"])
    det = n / d1
    sxx = d0 * det
    sx = math.sqrt(n * sxx - det)  # x > 0 here, so Σx > 0
    return n, sx, n * b0 + sx * b1


async def test_regression_moments_with_padding_are_refused(federation, tmp_path: Path) -> None:
    """regress(updrs, duration) uses the PD patients only; its output gives Σ duration over
    them, and avg(duration) over the PD patients but the target gives the rest: the
    target's duration, a field with no NULLs."""
    async def attack(a: Asker) -> float:
        reg = (await a.ask("SELECT regress(updrs, duration) FROM ward")).result["regressions"][0]
        _, sx, _ = crossproducts(reg)
        n, mean = (await a.ask(f"SELECT count(*), avg(duration) FROM ward "
                               f"WHERE {PD_NOT_TARGET}")).rows[0]
        return sx - n * mean
    await check(federation, ward, attack, 16.0, tmp_path)


async def test_regression_cross_product_differencing_is_refused(federation, tmp_path: Path) -> None:
    """Two regressions whose complete cases differ by the target (the second's WHERE set is
    padded with ET patients): their Σy differ by the target's updrs."""
    async def attack(a: Asker) -> float:
        q = "SELECT regress(updrs, duration) FROM ward WHERE {}"
        first = crossproducts((await a.ask(q.format("diagnosis = 'PD'"))).result["regressions"][0])
        second = crossproducts((await a.ask(q.format(f"age != {TARGET_AGE}")))
                               .result["regressions"][0])
        return first[2] - second[2]
    await check(federation, ward, attack, -33.25, tmp_path, abs_tol=1e-4)


CORR = "SELECT corr(age, updrs) FROM ward"
MEAN_BUT_TARGET = f"SELECT avg(updrs) FROM ward WHERE age != {TARGET_AGE}"


@pytest.mark.parametrize("order", [(CORR, MEAN_BUT_TARGET), (MEAN_BUT_TARGET, CORR)])
async def test_corr_and_a_mean_one_subject_apart_are_refused(federation, tmp_path: Path,
                                                             order: tuple[str, str]) -> None:
    """corr releases the cross-product matrix to the entry: Σ updrs over the PD patients is
    in it, so avg(updrs) over all but the target is refused after it, and it after that."""
    async def attack(a: Asker) -> float:
        for sql in order:
            await a.ask(sql)
        return 0.0
    off, on = await play(federation, ward, attack, tmp_path)
    assert off.refused is None
    assert_refused_helpfully(on.refused, on.jobs)


async def test_mean_map_weight_differencing_is_refused(federation, tmp_path: Path) -> None:
    """mean_map(vta, updrs) over the PD patients, then over everyone but the target (ET
    patients pad it: no weight): at a voxel every subject covers, n × mean differ by the
    target's updrs."""
    async def attack(a: Asker) -> float:
        q = "SELECT mean_map(vta, updrs) AS m FROM ward WHERE {}"
        totals = []
        for where in ("diagnosis = 'PD'", f"age != {TARGET_AGE}"):
            ans = await a.ask(q.format(where))
            totals.append(float(ans.map_array("m", "count")[0, 0, 0]
                                * ans.map_array("m", "mean")[0, 0, 0]))
        return totals[0] - totals[1]
    await check(federation, imaged, attack, -33.25, tmp_path)


async def test_mean_map_unweighted_then_weighted_is_refused(federation, tmp_path: Path) -> None:
    """An unweighted map over the PD patients, then a map weighted by updrs over all but the
    target: their count arrays differ by the target's image."""
    async def attack(a: Asker) -> float:
        first = await a.ask("SELECT mean_map(vta) AS m FROM ward WHERE diagnosis = 'PD'")
        second = await a.ask(f"SELECT mean_map(vta, updrs) AS m FROM ward "
                             f"WHERE age != {TARGET_AGE}")
        diff = first.map_array("m", "count") - second.map_array("m", "count")
        return float(np.abs(diff).sum())
    off, on = await play(federation, imaged, attack, tmp_path)
    assert off.refused is None and off.value >= 1  # the target covers voxel (0, 0, 0)
    assert_refused_helpfully(on.refused, on.jobs)


def crossproduct_xy(reg: dict) -> float:
    """Σxy of a simple regression y ~ x from its published output (as `crossproducts`)."""
    n, sx, _ = crossproducts(reg)
    (b0, b1), df, rss = reg["coefficients"], reg["df_residual"], reg["rss"]
    d1 = reg["std_errors"][1] ** 2 * df / rss
    sxx = (reg["std_errors"][0] ** 2 * df / rss) * n / d1
    return sx * b0 + sxx * b1


async def test_a_sum_of_a_binary_field_and_a_count_are_refused(federation, tmp_path: Path) -> None:
    """Σ responder over everyone is the number of responders; the responders but the target
    are a count: their difference is whether the target responded."""
    async def attack(a: Asker) -> float:
        n, mean = (await a.ask("SELECT count(*), avg(responder) FROM ward")).rows[0]
        (rest,) = (await a.ask(f"SELECT count(*) FROM ward WHERE responder = 1 "
                               f"AND age != {TARGET_AGE}")).rows[0]
        return n * mean - rest
    await check(federation, ward, attack, 1.0, tmp_path)


async def test_a_regression_on_a_binary_predictor_is_audited_as_its_groups(
        federation, tmp_path: Path) -> None:
    """regress(updrs, responder) gives Σ updrs·responder: Σ updrs over the responders. With
    avg(updrs) over the responders but the target, the target's updrs."""
    async def attack(a: Asker) -> float:
        reg = (await a.ask("SELECT regress(updrs, responder) FROM ward")).result["regressions"][0]
        n, mean = (await a.ask(f"SELECT count(updrs), avg(updrs) FROM ward WHERE responder = 1 "
                               f"AND age != {TARGET_AGE}")).rows[0]
        return crossproduct_xy(reg) - n * mean
    await check(federation, ward, attack, -33.25, tmp_path, abs_tol=1e-4)


async def test_prop_map_is_audited_as_the_image_of_its_condition(federation,
                                                                 tmp_path: Path) -> None:
    """prop_map(vta, updrs < -20) gives, per voxel, how many covering PD patients have
    updrs < -20 (its fraction times its count); mean_map(vta) over them but the target
    gives the same without the target: the difference is the target's image."""
    async def attack(a: Asker) -> float:
        prop = await a.ask("SELECT prop_map(vta, updrs < -20, correction => 'none') AS m "
                           "FROM ward")
        met = prop.map_array("m", "stat") * prop.map_array("m", "count")
        rest = (await a.ask(f"SELECT mean_map(vta) AS m FROM ward WHERE updrs < -20 "
                            f"AND age != {TARGET_AGE}")).map_array("m", "count")
        return float(np.nansum((met - rest).ravel()[1:]))  # voxel 0 is withheld: all cover it
    target = nib.load(Path(imaged(tmp_path / "truth")["root"]) / "img" / "p095.nii.gz")
    await check(federation, imaged, attack, float(target.get_fdata().ravel()[1:].sum()), tmp_path)


# --- many certificates ---

async def test_many_certificates_cannot_split_a_differencing_attack_with_a_shared_history(
        federation, tmp_path: Path) -> None:
    """A - B - C asked by three fresh certificates: with [privacy] shared_history the third
    is refused naming the other two's jobs (without it each certificate's history is its
    own, and the attack goes through)."""
    parts = ["SELECT count(*), avg(duration) FROM ward",
             f"SELECT count(*), avg(duration) FROM ward WHERE age < {TARGET_AGE}",
             f"SELECT count(*), avg(duration) FROM ward WHERE age > {TARGET_AGE}"]
    sites = [{"privacy": {**OPTIONAL, "shared_history": shared}} for shared in (False, True)]
    async with federation([[ward(tmp_path / "alone")], [ward(tmp_path / "shared")]],
                          per_site=sites) as fed:
        for site in (0, 1):
            jobs, totals = [], []
            for who, sql in zip(("mallory", "mallet", "eve"), parts, strict=True):
                async with fed.client(site, who=f"{who}{site}") as c:
                    job = await c.submit_query(sql)
                    jobs.append(job.id)
                    try:
                        n, mean = (await c.run_job(job)).rows[0]
                        totals.append(n * mean)
                    except JobFailed as failed:
                        refused = failed
            if site == 0:
                assert totals[0] - totals[1] - totals[2] == pytest.approx(16.0)
            else:
                assert len(totals) == 2
                assert RULE in str(refused), refused
                assert jobs[0] in str(refused) and jobs[1] in str(refused)


async def test_many_certificates_are_capped_by_the_catalog_budget(federation,
                                                                  tmp_path: Path) -> None:
    """Ten fresh certificates each asking the differencing count at ε 0.5 under a site-wide
    cap of 2: four are answered, the rest refused naming catalog_budget_epsilon, so all of
    them together are bounded by ε = 2 however many certificates the CA hands out."""
    privacy = {"dp": "required", "default_epsilon": 0.5, "catalog_budget_epsilon": 2.0}
    answered, refusals = 0, []
    async with federation([[ward(tmp_path / "w")]], privacy=privacy) as fed:
        for i in range(10):
            async with fed.client(who=f"sybil{i}") as c:
                try:
                    await c.query(f"SELECT count(*) FROM ward WHERE diagnosis = 'PD' AND "
                                  f"age != {TARGET_AGE} OR age = {TARGET_AGE}")
                    answered += 1
                except JobFailed as failed:
                    refusals.append(str(failed))
        spent = [await fed.daemons[0].store.spent(f"sybil{i}", "ward") for i in range(10)]
    assert answered == 4 and sum(spent) == pytest.approx(2.0)
    assert len(refusals) == 6
    assert all("across all researchers is exhausted" in r and "catalog_budget_epsilon" in r
               for r in refusals), refusals


# --- routine stratified work keeps working (issue 20, item 6) ---

async def test_a_stratified_table_with_a_small_cell_leaves_whole_cohort_work_answerable(
        federation, tmp_path: Path) -> None:
    """GROUP BY diagnosis, sex with a cell of 3 withheld; then the whole cohort's count(*)
    and avg(age), the coarser GROUP BY diagnosis and GROUP BY sex, and an --epsilon query
    are all answered: what they make derivable is the withheld cell's total (3 subjects),
    never one subject."""
    cat = ward(tmp_path / "w")
    frame = pd.read_csv(tmp_path / "w" / "s.csv")
    frame.loc[[1, 3, 5], "diagnosis"] = "dystonia"  # three women
    frame.loc[[0, 2, 4, 6, 8, 10], "diagnosis"] = "dystonia"  # six men
    frame.to_csv(tmp_path / "w" / "s.csv", index=False)
    async with federation([[cat]], privacy=OPTIONAL) as fed, fed.client() as c:
        table = await c.query("SELECT diagnosis, sex, count(*) FROM ward GROUP BY diagnosis, sex")
        everyone = await c.query("SELECT count(*), avg(age) FROM ward")
        coarse = await c.query("SELECT diagnosis, count(*) FROM ward GROUP BY diagnosis")
        by_sex = await c.query("SELECT sex, count(*), avg(age) FROM ward GROUP BY sex")
        noised = await c.query("SELECT diagnosis, count(*) FROM ward GROUP BY diagnosis",
                               epsilon=1.0)
    cells = {(r[0], r[1]): r[2] for r in table.rows}
    assert cells[("dystonia", "M")] == 6 and cells.get(("dystonia", "F")) is None
    assert everyone.rows[0][0] == 96
    assert {r[0]: r[1] for r in coarse.rows}["dystonia"] == 9
    assert sorted(r[1] for r in by_sex.rows) == [48, 48]
    assert noised.privacy[0]["epsilon"] == 1.0


# --- what exact auditing cannot close ---

async def test_the_release_decision_is_an_oracle_that_exact_auditing_cannot_close(
        federation, tmp_path: Path) -> None:
    """Not covered without noise (docs/privacy.md): whether count(G OR (target AND
    updrs <= v)) is withheld, G four subjects (k_min - 1), drives a binary search to the
    target's updrs under dp = "optional" with auditing on. Every release has the same
    cohort (G and the target) and a withheld one releases nothing, so there is nothing to
    refuse; only the noisy threshold bounds it (test_privacy_attacks.py,
    test_suppression_oracle_by_binary_search[required])."""
    async with federation([[ward(tmp_path / "w", n=192)]], privacy=OPTIONAL) as fed, \
            fed.client() as c:
        lo, hi = -60.0, 20.0
        for _ in range(10):
            v = (lo + hi) / 2
            try:
                await c.query(f"SELECT count(*) FROM ward WHERE age < 41 OR "
                              f"age = {TARGET_AGE} AND updrs <= {v}")
                hi = v
            except JobFailed as failed:
                assert "every output was withheld (k_min = 5)" in str(failed)
                lo = v
    assert lo < -33.25 <= hi and hi - lo == pytest.approx(80 / 2 ** 10)


async def test_a_three_valued_sum_against_counts_of_its_values_is_not_covered(
        federation, tmp_path: Path) -> None:
    """Not covered without noise (docs/privacy.md): Σ stage over everyone, less 1 × the
    count with stage 1 and 2 × the count with stage 2 among everyone but the target, is the
    target's stage; the audit ties only two-valued fields to counts of their values."""
    async with federation([[ward(tmp_path / "w")]], privacy=OPTIONAL) as fed, \
            fed.client() as c:
        n, mean = (await c.query("SELECT count(*), avg(stage) FROM ward")).rows[0]
        rest = [(await c.query(f"SELECT count(*) FROM ward WHERE stage = {v} "
                               f"AND age != {TARGET_AGE}")).rows[0][0] for v in (1, 2)]
    assert n * mean - rest[0] - 2 * rest[1] == pytest.approx(2.0)
