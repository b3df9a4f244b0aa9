"""Multi-round GLM jobs and meta-analysis over real daemons on loopback (real mTLS)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import statsmodels.api as sm
from statsmodels.stats.meta_analysis import combine_effects

from stimnet.errors import JobFailed
from tests.federation.conftest import CNSIM_FIELDS, cnsim_catalog

# LAB_HDL has values below 0 in CNSIM: bounds that hold them all (a site clamps to its
# declared bounds, so the pooled reference would otherwise see other values).
GLM_FIELDS = {**CNSIM_FIELDS,
              "LAB_HDL": {**CNSIM_FIELDS["LAB_HDL"], "bounds": [-1, 10]},
              "DIS_DIAB": {"table": "lab", "type": "integer", "bounds": [0, 1]},
              "CONDITIONS": {"table": "lab", "type": "integer", "bounds": [0, 4]}}


def glm_catalog(tmp: Path, i: int) -> dict:
    """CNSIM<i> with DIS_DIAB and a count: CONDITIONS, the number of the four recorded
    conditions a subject has."""
    cat = cnsim_catalog(tmp, i)
    path = Path(cat["root"]) / "lab.csv"
    df = pd.read_csv(path)
    df["CONDITIONS"] = df[["DIS_CVA", "MEDI_LPD", "DIS_DIAB", "DIS_AMI"]].sum(axis=1)
    df.to_csv(path, index=False)
    return {**cat, "fields": GLM_FIELDS}


def pooled(tmp: Path) -> pd.DataFrame:
    return pd.concat([pd.read_csv(tmp / f"cnsim{i}" / "lab.csv") for i in (1, 2, 3)],
                     ignore_index=True)


def statsmodels_fit(df: pd.DataFrame, formula: str, family):  # type: ignore[no-untyped-def]
    y, *xs = [t.strip() for t in formula.replace("~", "+").split("+")]
    d = df[[y, *xs]].dropna()
    return sm.GLM(d[y], sm.add_constant(d[xs]), family=family).fit(tol=1e-12), len(d)


@pytest.mark.parametrize(("formula", "family", "sm_family"), [
    ("DIS_DIAB ~ PM_BMI_CONTINUOUS + LAB_TSC", "binomial", sm.families.Binomial()),
    ("CONDITIONS ~ PM_BMI_CONTINUOUS + LAB_HDL", "poisson", sm.families.Poisson()),
])
async def test_cnsim_glm_on_three_daemons_equals_statsmodels_on_the_concatenated_files(
        federation, tmp_path: Path, formula: str, family: str, sm_family) -> None:  # type: ignore[no-untyped-def]
    """The federated GLM over CNSIM1-3 on three daemons equals statsmodels on the three
    files concatenated (1e-6 on coefficients and standard errors), and each iteration's
    deviance streams to the client as the fit runs."""
    cats = [[glm_catalog(tmp_path, i)] for i in (1, 2, 3)]
    events: list[tuple[str, object]] = []

    def seen(kind: str, value: object) -> None:
        events.append((kind, value))
    async with federation(cats, privacy={"dp": "off"}) as fed, fed.client() as c:
        ans = await c.query(f"SELECT glm('{formula}', '{family}') FROM cnsim", federated=True,
                            min_sites=3, on_event=seen)
    ref, n = statsmodels_fit(pooled(tmp_path), formula, sm_family)
    glm = ans.result["glm"]
    assert glm["outcome"] == "converged" and glm["n"] == n
    np.testing.assert_allclose(glm["coefficients"], ref.params.to_numpy(), rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(glm["std_errors"], ref.bse.to_numpy(), rtol=1e-6)
    assert glm["deviance"] == pytest.approx(ref.deviance, rel=1e-9)
    assert glm["null_deviance"] == pytest.approx(ref.null_deviance, rel=1e-9)
    assert glm["aic"] == pytest.approx(ref.aic, rel=1e-9)
    assert [r[0] for r in ans.rows] == ["Intercept", *[t.strip() for t in
                                                       formula.split("~")[1].split("+")]]
    assert [m["site"] for m in ans.manifest] == ["site-a", "site-b", "site-c"]
    progress = [v for k, v in events if k == "log" and "iteration" in str(v)]
    assert len(progress) == glm["iterations"]
    assert progress[0].startswith("site-a: iteration 1: deviance ")


async def test_a_round_not_of_the_signed_job_is_refused_by_the_site(federation,
                                                                    tmp_path: Path) -> None:
    """A site answers a later round only of a fit whose first round it released, in order,
    within the declared rounds, with one finite parameter per coefficient: otherwise it
    refuses, saying which rule, and audits the refusal."""
    from stimnet.signing import new_request
    from stimnetd.federation.fanout import Target

    cats = [[glm_catalog(tmp_path, 1)], [glm_catalog(tmp_path, 2)]]
    sql = "SELECT glm('DIS_DIAB ~ PM_BMI_CONTINUOUS + LAB_TSC', 'binomial', 3) FROM cnsim"
    async with federation(cats, privacy={"dp": "off"}) as fed, fed.client() as c:
        entry = fed.daemons[0]
        transport = entry.fanout._transport  # the entry's own peer client: real mTLS
        target = Target(fed.address(1), "site-b")
        from stimnet.query.sql import parse_sql
        spec = parse_sql(sql).to_dict()

        async def ask(signed, round_no: int, beta: list[float]) -> tuple[str, str]:  # type: ignore[no-untyped-def]
            async def sink(*_: object) -> None:
                return None
            o = await transport.run_subjob(target, signed, "t", 10.0, sink, small=True,
                                           round_no=round_no, beta=beta)
            return o.state, o.detail

        fresh = c.sign(new_request("query", "cnsim", entry="site-a", scope="federated",
                                   spec=spec))
        state, detail = await ask(fresh, 2, [0.0, 0.0, 0.0])
        assert state == "refused" and "has no fit of that job in progress" in detail
        # Now a real first round at site-b, then rounds out of order, of the wrong size,
        # and past the signed bound (maxit 3: four rounds).
        signed = c.sign(new_request("query", "cnsim", entry="site-a", scope="federated",
                                    spec=spec))
        state, _ = await ask(signed, 1, [])
        assert state == "done"
        assert await ask(signed, 3, [0.0] * 3) == (
            "refused", f"round 3 of job {signed_id(signed)} refused: the next round here is 2")
        state, detail = await ask(signed, 2, [0.0, 0.0])
        assert state == "refused" and "must be 3 finite numbers" in detail
        for r in (2, 3, 4):
            assert (await ask(signed, r, [-4.0, 0.0, 0.0]))[0] == "done"
        state, detail = await ask(signed, 5, [-4.0, 0.0, 0.0])
        assert state == "refused" and "has no fit of that job in progress" in detail
        # A query job is not a multi-round model: its later rounds are refused.
        count = c.sign(new_request("query", "cnsim", entry="site-a", scope="federated",
                                   spec=parse_sql("SELECT count(*) FROM cnsim").to_dict()))
        state, detail = await ask(count, 2, [0.0])
        assert state == "refused" and "not a multi-round model" in detail
        audit = await fed.daemons[1].store.audit_rows()
    refusals = [r for r in audit if r.action == "release" and r.decision == "refused"]
    assert len(refusals) == 5


def signed_id(signed) -> str:  # type: ignore[no-untyped-def]
    import hashlib
    import json
    return hashlib.sha256(json.loads(signed.payload)["nonce"].encode()).hexdigest()[:24]


async def test_meta_analysis_over_three_daemons_equals_combine_effects(federation,
                                                                       tmp_path: Path) -> None:
    """meta(avg(...)) and meta(glm(...)): each site's own estimate, pooled by fixed and
    random effects exactly as statsmodels' combine_effects pools the same per-site
    estimates, leave-one-site-out included."""
    cats = [[glm_catalog(tmp_path, i)] for i in (1, 2, 3)]
    async with federation(cats, privacy={"dp": "off"}) as fed, fed.client() as c:
        mean = await c.query("SELECT meta(avg(LAB_HDL)) FROM cnsim", federated=True,
                             min_sites=3)
        model = await c.query("SELECT meta(glm('DIS_DIAB ~ PM_BMI_CONTINUOUS', 'binomial')) "
                              "FROM cnsim", federated=True, min_sites=3)
    frames = [pd.read_csv(tmp_path / f"cnsim{i}" / "lab.csv") for i in (1, 2, 3)]
    hdl = [f["LAB_HDL"].dropna() for f in frames]
    y = np.array([h.mean() for h in hdl])
    se = np.array([h.std(ddof=1) / np.sqrt(len(h)) for h in hdl])
    _assert_pooled(mean.result["meta"][0], y, se)
    fits = [statsmodels_fit(f, "DIS_DIAB ~ PM_BMI_CONTINUOUS", sm.families.Binomial())[0]
            for f in frames]
    slope = model.result["meta"][1]
    assert slope["term"] == "PM_BMI_CONTINUOUS"
    _assert_pooled(slope, np.array([f.params.iloc[1] for f in fits]),
                   np.array([f.bse.iloc[1] for f in fits]), rtol=1e-6)
    assert [r[:2] for r in model.rows] == [[t, m] for t in ("Intercept", "PM_BMI_CONTINUOUS")
                                          for m in ("fixed", "dl", "reml")]


def _combined(y: np.ndarray, se: np.ndarray):  # type: ignore[no-untyped-def]
    # Its random-effects values are NaN when its (untruncated) τ² is negative.
    with np.errstate(invalid="ignore", divide="ignore"):
        return combine_effects(y, se * se, method_re="dl")


def _random(ref) -> tuple[float, float]:  # type: ignore[no-untyped-def]
    """combine_effects' DL estimate and SE, or its fixed effect's where its τ² < 0: it
    does not truncate τ² at 0 as we (and metafor) do, and equals us whenever Q ≥ k - 1."""
    if ref.tau2 > 0:
        return ref.mean_effect_re, ref.sd_eff_w_re
    return ref.mean_effect_fe, ref.sd_eff_w_fe


def _assert_pooled(doc: dict, y: np.ndarray, se: np.ndarray, rtol: float = 1e-9) -> None:
    np.testing.assert_allclose([s["estimate"] for s in doc["sites"]], y, rtol=rtol)
    np.testing.assert_allclose([s["std_error"] for s in doc["sites"]], se, rtol=rtol)
    ref = _combined(y, se)
    assert doc["fixed"]["estimate"] == pytest.approx(ref.mean_effect_fe, rel=rtol)
    assert doc["fixed"]["std_error"] == pytest.approx(ref.sd_eff_w_fe, rel=rtol)
    assert (doc["dl"]["estimate"], doc["dl"]["std_error"]) == pytest.approx(_random(ref),
                                                                           rel=rtol)
    assert doc["heterogeneity"]["q"] == pytest.approx(ref.q, rel=rtol)
    assert doc["dl"]["tau2"] == pytest.approx(max(ref.tau2, 0.0), rel=rtol, abs=1e-15)
    for i, loo in enumerate(doc["leave_one_out"]):
        keep = np.arange(3) != i
        r = _combined(y[keep], se[keep])
        assert loo["omitted"] == f"site-{'abc'[i]}"
        assert loo["fixed"]["estimate"] == pytest.approx(r.mean_effect_fe, rel=rtol)
        assert loo["dl"]["estimate"] == pytest.approx(_random(r)[0], rel=rtol)


async def test_a_glm_that_cannot_be_fitted_fails_saying_why(federation, tmp_path: Path) -> None:
    """Too few iterations for convergence: the job fails as not converged, with no
    numbers that look like estimates."""
    cats = [[glm_catalog(tmp_path, i)] for i in (1, 2)]
    async with federation(cats, privacy={"dp": "off"}) as fed, fed.client() as c:
        with pytest.raises(JobFailed, match="GLM not_converged: the fit did not converge"):
            await c.query("SELECT glm('DIS_DIAB ~ PM_BMI_CONTINUOUS + LAB_TSC', 'binomial', 2) "
                          "FROM cnsim", federated=True)


DP = {"dp": "required", "default_epsilon": 1.0, "max_epsilon_per_query": 10.0,
      "budget_epsilon": 10.0}


async def test_a_dp_glm_is_charged_once_up_front_and_refused_when_the_budget_cannot_cover_it(
        federation, tmp_path: Path) -> None:
    """Under dp = "required" a binomial GLM's ε covers every round it may take: each site
    charges it once, with its first round, whatever the number of rounds; a fit the
    remaining budget cannot cover is refused with RESOURCE_EXHAUSTED before any round,
    and so is every submission but one of a concurrent pair that together exceed it."""
    import asyncio

    from stimnet.errors import BudgetExhausted

    sql = "SELECT glm('DIS_DIAB ~ PM_BMI_CONTINUOUS + LAB_TSC', 'binomial', {}) FROM cnsim"
    cats = [[glm_catalog(tmp_path, i)] for i in (1, 2, 3)]
    async with federation(cats, privacy=DP) as fed, fed.client() as c, \
            fed.client(who="bob") as bob:
        try:
            ans = await c.query(sql.format(25), federated=True, epsilon=6.0, min_sites=3)
            rounds = ans.result["glm"]["rounds"]
            assert ans.result["glm"]["deviance"] is None  # not released under noise
        except JobFailed as exc:  # a noised fit may not settle: it says so, with no numbers
            assert "GLM not_converged" in str(exc) or "GLM singular" in str(exc), exc
            rounds = 26
        spent = [await d.store.spent("alice", "cnsim") for d in fed.daemons]
        assert spent == [pytest.approx(6.0, rel=1e-6)] * 3, (spent, rounds)
        # Every site refuses it before its first round: nothing is computed or charged.
        with pytest.raises((BudgetExhausted, JobFailed), match="privacy budget exhausted"):
            await c.query(sql.format(25), federated=True, epsilon=6.0, min_sites=3)
        assert [await d.store.spent("alice", "cnsim") for d in fed.daemons] == spent
        # Two at once from bob, 6 + 6 > 10: at every site at most one is charged.
        results = await asyncio.gather(
            *[bob.query(sql.format(25), federated=True, epsilon=6.0, min_sites=3)
              for _ in range(2)], return_exceptions=True)
        bob_spent = [await d.store.spent("bob", "cnsim") for d in fed.daemons]
    assert all(s == pytest.approx(6.0, rel=1e-6) for s in bob_spent), bob_spent
    assert sum(isinstance(r, BudgetExhausted | JobFailed) for r in results) >= 1, results


async def test_model_queries_that_dp_cannot_noise_are_refused_saying_why(
        federation, tmp_path: Path) -> None:
    async with federation([[glm_catalog(tmp_path, 1)]], privacy=DP) as fed, fed.client() as c:
        for sql in ("SELECT glm('CONDITIONS ~ LAB_HDL', 'poisson') FROM cnsim",
                    "SELECT meta(avg(LAB_HDL)) FROM cnsim"):
            with pytest.raises(JobFailed, match="only glm\\(..., 'binomial'\\) is available"):
                await c.query(sql)
        assert await fed.daemons[0].store.spent("alice", "cnsim") == 0.0


async def test_cli_shows_glm_progress_and_meta_tables_and_writes_a_forest_plot(
        federation, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`stimctl query` prints each iteration's deviance as it runs and the coefficient
    table; for meta(...) the per-site and leave-one-out tables, and --forest writes the
    PNG; the client's answer gives both as DataFrames."""
    from tests.federation.test_cli import _client_file, _run

    cats = [[glm_catalog(tmp_path, i)] for i in (1, 2, 3)]
    png = tmp_path / "forest.png"
    async with federation(cats, privacy={"dp": "off"}) as fed, fed.client() as c:
        cfg = str(_client_file(tmp_path, fed.pki.issue("carol", "researcher"),
                               fed.daemons[0].port))
        code, out, err = await _run(
            capsys, "--config", cfg, "query", "--federated",
            "SELECT glm('DIS_DIAB ~ PM_BMI_CONTINUOUS + LAB_TSC', 'binomial') FROM cnsim")
        assert code == 0, err
        assert "log: site-a: iteration 1: deviance" in err
        assert "PM_BMI_CONTINUOUS" in out and "p_value" in out
        code, out, err = await _run(
            capsys, "--config", cfg, "query", "--federated", "--forest", str(png),
            "SELECT meta(avg(LAB_HDL)) FROM cnsim")
        assert code == 0, err
        assert "leave one site out" in out and "site-b" in out
        ans = await c.query("SELECT meta(avg(LAB_HDL)) FROM cnsim", federated=True)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    frame = ans.forest_frame()
    assert list(frame["row"]) == ["site-a", "site-b", "site-c", "fixed", "dl", "reml"]
    assert frame["estimate"].iloc[3] == pytest.approx(ans.meta[0]["fixed"]["estimate"])
    assert list(ans.to_pandas()["method"]) == ["fixed", "dl", "reml"]


async def test_cnsim_quantiles_by_bisection_are_within_their_bound_of_pooled_pandas(
        federation, tmp_path: Path) -> None:
    """quantile_exact over CNSIM1-3 on three daemons at the default k_min: every LAB_HDL
    quantile from 0.05 to 0.95 within the documented (hi - lo) / 2^(rounds + 1) of pooled
    pandas; each bisection round streams."""
    probs = [0.05, 0.1, 0.25, 0.5, 0.75, 0.9, 0.95]
    cats = [[glm_catalog(tmp_path, i)] for i in (1, 2, 3)]
    lines: list[str] = []
    async with federation(cats, privacy={"dp": "off"}) as fed, fed.client() as c:
        assert fed.daemons[0].site.k_min == 5
        ans = await c.query(f"SELECT quantile_exact(LAB_HDL, {', '.join(map(str, probs))}) "
                            "FROM cnsim", federated=True, min_sites=3,
                            on_event=lambda k, v: lines.append(str(v)) if k == "log" else None)
    q = ans.result["quantiles"]
    ref = pooled(tmp_path)["LAB_HDL"].dropna().quantile(probs).to_numpy()
    assert q["bound"] == pytest.approx(11 / 2 ** 12)  # bounds [-1, 10], 11 rounds
    assert q["n"] == len(pooled(tmp_path)["LAB_HDL"].dropna())
    np.testing.assert_allclose(q["values"], ref, rtol=0, atol=q["bound"])
    assert [r[0] for r in ans.rows] == probs
    assert sum("bisection round" in line for line in lines) == 11
