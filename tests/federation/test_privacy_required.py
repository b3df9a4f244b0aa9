"""dp = "required" on real daemons: the noisy threshold, delta beside epsilon, no exact refusals."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from stimctl.client import JobFailed

REQUIRED = {"dp": "required", "budget_epsilon": 100.0, "delta": 1e-6, "budget_delta": 1e-3}


def catalog(root: Path, n: int, diag: list[str] | None = None, surgeon: bool = False) -> dict:
    root.mkdir(parents=True, exist_ok=True)
    df = pd.DataFrame({"sid": [f"p{i:03d}" for i in range(n)],
                       "age": [30.0 + i % 40 for i in range(n)],
                       "diagnosis": diag or ["PD"] * n,
                       "surgeon": [f"dr-{i % 3}" for i in range(n)]})
    df.to_csv(root / "s.csv", index=False)
    fields = {"sid": {"table": "s", "type": "id"},
              "age": {"table": "s", "type": "numeric", "bounds": [0, 100]},
              "diagnosis": {"table": "s", "type": "categorical",
                            "levels": ["PD", "ET", "dystonia"]},
              "surgeon": {"table": "s", "type": "categorical"}}
    return {"name": "tiny", "root": str(root), "subject_key": "sid", "tables": {"s": "s.csv"},
            "fields": fields}


async def test_the_result_states_epsilon_and_delta_and_the_ledger_holds_both(
        federation, tmp_path: Path) -> None:
    """Each site's (epsilon, delta) are separate fields of the result and the manifest, and
    the ledger is charged both."""
    cats = [[catalog(tmp_path / f"t{i}", 200)] for i in range(2)]
    async with federation(cats, privacy=REQUIRED) as fed, fed.client() as c:
        ans = await c.query("SELECT count(*) FROM tiny", federated=True, min_sites=2)
        spent = [(await d.store.spent("alice", "tiny"), await d.store.spent_delta("alice", "tiny"))
                 for d in fed.daemons]
    assert [(p["epsilon"], p["delta"]) for p in ans.privacy] == [(1.0, 1e-6)] * 2
    assert [(m["epsilon"], m["delta"]) for m in ans.manifest] == [(1.0, 1e-6)] * 2
    assert spent == [(pytest.approx(1.0), pytest.approx(1e-6))] * 2
    # The count is the noised one: near 400, and the manifest's n are noised too.
    assert abs(ans.rows[0][0] - 400) < 40
    assert all(abs(m["n"] - 200) < 30 for m in ans.manifest)


async def test_a_small_group_is_withheld_by_its_noised_count(federation, tmp_path: Path) -> None:
    """A group of 3 (k_min 5) is withheld, and the reason names the noisy threshold."""
    diag = ["PD"] * 197 + ["ET"] * 3
    async with federation([[catalog(tmp_path / "t", 200, diag)]], privacy=REQUIRED) as fed, \
            fed.client() as c:
        ans = await c.query("SELECT diagnosis, count(*) FROM tiny GROUP BY diagnosis")
    rows = {r[0]: r[1] for r in ans.rows}
    assert abs(rows["PD"] - 197) < 30
    assert rows.get("ET") is None and rows.get("dystonia") is None
    assert any("noised count below k_min = 5" in n for n in ans.notes), ans.notes


async def test_grouping_by_a_field_without_declared_levels_is_refused(
        federation, tmp_path: Path) -> None:
    """Which values of an undeclared field occur is data: under DP it cannot be grouped on."""
    async with federation([[catalog(tmp_path / "t", 200)]], privacy=REQUIRED) as fed, \
            fed.client() as c:
        with pytest.raises(JobFailed, match="'surgeon' declares no levels"):
            await c.query("SELECT surgeon, count(*) FROM tiny GROUP BY surgeon")
        assert await fed.daemons[0].store.spent("alice", "tiny") == 0


async def test_no_exact_refusal_oracle_under_dp(federation, tmp_path: Path) -> None:
    """Cohorts two subjects apart: exact auditing would refuse the second (a refusal decided
    on exact cohorts is an output outside DP); under required both are answered, noised."""
    async with federation([[catalog(tmp_path / "t", 200)]], privacy=REQUIRED) as fed, \
            fed.client() as c:
        a = await c.query("SELECT count(*) FROM tiny WHERE age >= 30")
        b = await c.query("SELECT count(*) FROM tiny WHERE age >= 31")
        assert await fed.daemons[0].store.spent("alice", "tiny") == pytest.approx(2.0)
    assert abs(a.rows[0][0] - 200) < 30 and abs(b.rows[0][0] - 195) < 30


async def test_the_site_wide_catalog_cap_holds_across_researchers(federation, tmp_path: Path) -> None:
    """Fresh certificates get fresh per-researcher budgets, but not past the catalog's
    site-wide cap; `stimctl info` (GetInfo) shows the cap and what is left."""
    privacy = {**REQUIRED, "catalog_budget_epsilon": 3.0}
    async with federation([[catalog(tmp_path / "t", 200)]], privacy=privacy) as fed, \
            fed.client() as alice, fed.client(who="bob") as bob, \
            fed.client(who="carol") as carol:
        await alice.query("SELECT count(*) FROM tiny")
        await alice.query("SELECT count(*) FROM tiny")
        await bob.query("SELECT count(*) FROM tiny")
        with pytest.raises(JobFailed, match="across all researchers is exhausted"):
            await carol.query("SELECT count(*) FROM tiny")
        info = await carol.info()
    assert (info.budget_epsilon, info.catalog_budget_epsilon) == (100.0, 3.0)
    assert dict(info.catalog_epsilon_remaining) == {"tiny": 0.0}
    assert info.delta_per_query == pytest.approx(1e-6)


@pytest.mark.parametrize("shared", [False, True])
async def test_a_shared_auditing_history_spans_researchers(federation, tmp_path: Path,
                                                          shared: bool) -> None:
    """[privacy] shared_history: exact auditing keeps one history per catalog, so a second
    certificate cannot finish a differencing attack the first one started (without it, the
    second certificate's history is its own)."""
    privacy = {"dp": "off", "shared_history": shared}
    async with federation([[catalog(tmp_path / "t", 40)]], privacy=privacy) as fed, \
            fed.client() as alice, fed.client(who="mallory") as mallory:
        first = await alice.submit_query("SELECT count(*) FROM tiny")
        await alice.run_job(first)
        if shared:
            with pytest.raises(JobFailed, match=f"exact auditing.*{first.id}"):
                await mallory.query("SELECT count(*) FROM tiny WHERE age != 30")
        else:
            ans = await mallory.query("SELECT count(*) FROM tiny WHERE age != 30")
            assert ans.rows[0][0] == 39
