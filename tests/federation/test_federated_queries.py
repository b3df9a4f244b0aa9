"""Federated aggregate queries across real daemons: exactness, privacy refusals, fan-out."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest

from stimctl.client import BudgetExhausted, JobFailed, Refused
from tests.federation.conftest import cnsim_catalog, pooled_cnsim


async def test_cnsim_federated_equals_pooled(federation, tmp_path: Path) -> None:
    """CNSIM1-3 on three daemons: count, mean, variance of LAB_TSC and LAB_TSC ~ LAB_TRIG equal pooled."""
    cats = [[cnsim_catalog(tmp_path, i)] for i in (1, 2, 3)]
    async with federation(cats) as fed, fed.client() as c:
        ans = await c.query("SELECT count(LAB_TSC), avg(LAB_TSC), variance(LAB_TSC), "
                            "regress(LAB_TSC, LAB_TRIG) FROM cnsim", federated=True, min_sites=3)
    pooled = pooled_cnsim()
    tsc = pooled["LAB_TSC"].dropna()
    count, mean, var = ans.rows[0]
    assert count == len(tsc)
    assert mean == pytest.approx(tsc.mean(), rel=1e-12)
    assert var == pytest.approx(tsc.var(ddof=1), rel=1e-10)
    both = pooled[["LAB_TSC", "LAB_TRIG"]].dropna()
    X = np.column_stack([np.ones(len(both)), both["LAB_TRIG"]])
    beta, *_ = np.linalg.lstsq(X, both["LAB_TSC"].to_numpy(), rcond=None)
    reg = ans.result["regressions"][0]
    assert reg["n"] == len(both)
    assert reg["coefficients"] == pytest.approx(beta.tolist(), rel=1e-9)
    assert [m["site"] for m in ans.manifest] == ["site-a", "site-b", "site-c"]
    assert sum(m["n"] for m in ans.manifest) == len(pooled)


def _tiny_catalog(root: Path, ages: list[float], diag: list[str] | None = None) -> dict:
    root.mkdir(parents=True, exist_ok=True)
    n = len(ages)
    pd.DataFrame({"sid": [f"p{i:03d}" for i in range(n)], "age": ages,
                  "diagnosis": diag or ["PD"] * n}).to_csv(root / "s.csv", index=False)
    return {"name": "tiny", "root": str(root), "subject_key": "sid", "tables": {"s": "s.csv"},
            "fields": {"sid": {"table": "s", "type": "id"},
                       "age": {"table": "s", "type": "numeric", "bounds": [0, 100]},
                       "diagnosis": {"table": "s", "type": "categorical",
                                     "levels": ["PD", "ET", "dystonia"]}}}


async def test_small_groups_are_suppressed_with_reason(federation, tmp_path: Path) -> None:
    """A group smaller than k_min is withheld at the site and the result says why, without its size."""
    diag = ["PD"] * 20 + ["ET"] * 3
    cat = _tiny_catalog(tmp_path / "t", list(range(30, 53)), diag)
    async with federation([[cat]]) as fed, fed.client() as c:
        ans = await c.query("SELECT diagnosis, count(*), avg(age) FROM tiny GROUP BY diagnosis")
    rows = {r[0]: r[1:] for r in ans.rows}
    assert rows["PD"] == [20, pytest.approx(np.mean(range(30, 50)))]
    assert rows.get("ET", [None, None]) == [None, None]
    assert ans.notes == [f"{name}[diagnosis={group}]: suppressed at every site (k_min: cohort of "
                         "fewer than 5 subjects)"
                         for group in ("ET", "dystonia") for name in ("count(*)", "avg(age)")]
    assert "3" not in " ".join(n for n in ans.notes if "ET" in n)


async def test_rare_undeclared_labels_never_leave_a_site(federation, tmp_path: Path) -> None:
    """GROUP BY (and a contingency over) a categorical field that declares no levels: a value
    held by fewer than k_min subjects at a site is a data value, so neither it nor its row
    leaves that site; the result lists the other groups exactly and says some may be unlisted."""
    def surgeon_catalog(root: Path, surgeons: list[str]) -> dict:
        cat = _tiny_catalog(root, [float(40 + i % 30) for i in range(len(surgeons))])
        frame = pd.read_csv(root / "s.csv")
        frame["surgeon"] = surgeons
        frame.to_csv(root / "s.csv", index=False)
        cat["fields"]["surgeon"] = {"table": "s", "type": "categorical"}  # no levels declared
        return cat
    a = surgeon_catalog(tmp_path / "a", ["dr-common"] * 12 + ["dr-rare-a"] * 2)
    b = surgeon_catalog(tmp_path / "b", ["dr-common"] * 6 + ["dr-other"] * 8 + ["dr-rare-b"])
    async with federation([[a], [b]]) as fed, fed.client() as c, fed.client(who="bob") as bob:
        ans = await c.query("SELECT surgeon, count(*) FROM tiny GROUP BY surgeon", federated=True)
        # Another researcher: to alice this cohort is one subject from her released groups.
        table = await bob.query("SELECT contingency(surgeon, diagnosis) FROM tiny", federated=True)
        released = []
        for d in fed.daemons:  # what each site's ledger says it let out
            async with d.store.db.execute("SELECT partials FROM releases") as cur:
                released += [bytes(row[0]) async for row in cur]
    assert {r[0]: r[1] for r in ans.rows} == {"dr-common": 18, "dr-other": 8}
    assert ans.notes == ["count(*): groups and levels of 'surgeon' (no declared levels) with "
                         "fewer than k_min subjects at a site are not listed, labels included; "
                         "values cover the rest"]
    assert set(table.result["contingency"][0]["levels"][0]) == {"dr-common", "dr-other"}
    # Two queries, each released at both sites; none names a rare surgeon.
    assert [b"dr-rare" in blob for blob in released] == [False] * 4


async def test_budget_is_enforced_and_refused_with_resource_exhausted(federation, tmp_path: Path) -> None:
    """Noisy queries charge the ledger; once the budget cannot cover a query it is RESOURCE_EXHAUSTED.
    (120 subjects: at epsilon 1 over four arrays the noisy threshold is some 57 subjects.)"""
    cat = _tiny_catalog(tmp_path / "t", [float(30 + a % 30) for a in range(120)])
    privacy = {"dp": "optional", "budget_epsilon": 2.0, "max_epsilon_per_query": 1.0}
    async with federation([[cat]], privacy=privacy) as fed, fed.client() as c:
        for _ in range(2):
            ans = await c.query("SELECT count(*), avg(age) FROM tiny", epsilon=1.0)
            assert ans.privacy[0]["epsilon"] == pytest.approx(1.0)
            assert ans.privacy[0]["mechanism"] == "laplace"
        with pytest.raises(BudgetExhausted, match="0 of 2 remains"):
            await c.query("SELECT count(*) FROM tiny", epsilon=1.0)
        assert await fed.daemons[0].store.spent("alice", "tiny") == pytest.approx(2.0)
        refusals = [r for r in await fed.daemons[0].store.audit_rows() if r.decision == "refused"
                    or r.decision == "denied"]
        assert [(r.action, r.decision, json.loads(r.detail_json)["code"],
                 json.loads(r.detail_json)["policy"]) for r in refusals] == [
            ("/stimnet.v1.JobService/RunJob", "refused", "RESOURCE_EXHAUSTED", "budget")]


async def test_concurrent_queries_cannot_overspend(federation, tmp_path: Path) -> None:
    """Ten concurrent noisy queries against a budget for three: exactly three are released."""
    cat = _tiny_catalog(tmp_path / "t", [float(a) for a in range(30, 60)])
    privacy = {"dp": "optional", "budget_epsilon": 3.0, "max_epsilon_per_query": 1.0,
               "overlap_guard": False}
    async with federation([[cat]], privacy=privacy) as fed, fed.client() as c:
        async def one() -> str:
            try:
                await c.query("SELECT count(*) FROM tiny", epsilon=1.0)
                return "ok"
            except (JobFailed, BudgetExhausted) as exc:
                assert "budget" in str(exc)
                return "refused"
        outcomes = await asyncio.gather(*[one() for _ in range(10)])
        spent = await fed.daemons[0].store.spent("alice", "tiny")
    assert outcomes.count("ok") == 3 and outcomes.count("refused") == 7
    assert spent == pytest.approx(3.0)


async def test_exact_auditing_refuses_single_subject_differencing(federation, tmp_path: Path) -> None:
    """Cohorts one subject apart are refused, naming the earlier job; two apart is no single
    subject's value and is answered (k_min guards each cohort's own size)."""
    cat = _tiny_catalog(tmp_path / "t", [float(a) for a in range(30, 60)])
    async with federation([[cat]]) as fed, fed.client() as c:
        first = await c.submit_query("SELECT count(*) FROM tiny WHERE age >= 30")
        await c.run_job(first)
        await c.query("SELECT avg(age) FROM tiny WHERE age >= 30")  # same cohort: allowed
        ok = await c.query("SELECT count(*) FROM tiny WHERE age >= 32")  # 2 fewer: allowed
        with pytest.raises(JobFailed, match=f"exact auditing.*earlier job.*{first.id}"):
            await c.query("SELECT count(*) FROM tiny WHERE age >= 31")  # isolates age 30
    assert ok.rows[0][0] == 28


async def test_exact_auditing_refuses_three_query_differencing(federation, tmp_path: Path) -> None:
    """A - B - C with every pair far apart still isolates one subject: refused, naming both
    earlier jobs and the way forward."""
    cat = _tiny_catalog(tmp_path / "t", [float(a) for a in range(30, 60)])
    async with federation([[cat]]) as fed, fed.client() as c:
        a = await c.submit_query("SELECT avg(age) FROM tiny")
        await c.run_job(a)
        b = await c.submit_query("SELECT avg(age) FROM tiny WHERE age < 45")
        await c.run_job(b)
        with pytest.raises(JobFailed, match="differential privacy") as refused:
            await c.query("SELECT avg(age) FROM tiny WHERE age > 45")
    assert a.id in str(refused.value) and b.id in str(refused.value)


async def test_routine_stratified_sequences_keep_working(federation, tmp_path: Path) -> None:
    """GROUP BY with one small cell withheld, then whole-cohort count(*) and avg: answered
    (the withheld cell's total is derivable, no single subject is). A withheld cell of one
    subject is refused the same way, naming the grouped job."""
    diag = ["PD"] * 27 + ["ET"] * 3
    lone = ["PD"] * 29 + ["ET"]
    ages = [float(a) for a in range(30, 60)]
    async with federation([[_tiny_catalog(tmp_path / "t", ages, diag)],
                           [_tiny_catalog(tmp_path / "u", ages, lone)]]) as fed, \
            fed.client() as c, fed.client(1) as d:
        grouped = await c.query("SELECT diagnosis, count(*) FROM tiny GROUP BY diagnosis")
        everyone = await c.query("SELECT count(*), avg(age) FROM tiny")
        job = await d.submit_query("SELECT diagnosis, count(*) FROM tiny GROUP BY diagnosis")
        await d.run_job(job)
        with pytest.raises(JobFailed, match=f"exact auditing.*{job.id}"):
            await d.query("SELECT count(*) FROM tiny")
    assert {r[0]: r[1] for r in grouped.rows}["PD"] == 27
    assert everyone.rows[0][0] == 30


async def test_exact_auditing_sees_through_null_padding(federation, tmp_path: Path) -> None:
    """avg(updrs) is over the subjects with a value: padding the WHERE set with subjects
    whose updrs is NULL makes two WHERE sets 6 apart whose used sets are one subject apart.
    The used sets are what is audited, so the second is refused."""
    diag = ["PD"] * 25 + ["ET"] * 5
    cat = _tiny_catalog(tmp_path / "t", [float(a) for a in range(30, 60)], diag)
    frame = pd.read_csv(tmp_path / "t" / "s.csv")
    frame["updrs"] = [float(-i) if d == "PD" else None for i, d in enumerate(diag)]
    frame.to_csv(tmp_path / "t" / "s.csv", index=False)
    cat["fields"]["updrs"] = {"table": "s", "type": "numeric", "bounds": [-60, 20]}
    async with federation([[cat]]) as fed, fed.client() as c:
        await c.query("SELECT avg(updrs) FROM tiny WHERE diagnosis = 'PD'")
        with pytest.raises(JobFailed, match="exact auditing"):
            await c.query("SELECT avg(updrs) FROM tiny WHERE age != 40")


async def test_exact_auditing_covers_unions_of_some_groups(federation, tmp_path: Path) -> None:
    """The sum of two released cells is a cohort's sum too: "avg(age) of PD, ET and one
    dystonia patient" then "avg(age) by diagnosis" gave that patient's age as
    21 x avg - 10 x avg(PD) - 10 x avg(ET). Refused in either order by a real daemon; the
    same cells again are answered."""
    diag = ["PD"] * 10 + ["ET"] * 10 + ["dystonia"] * 10
    ages = [float(a) for a in range(30, 60)]
    near = "SELECT avg(age) FROM tiny WHERE diagnosis IN ('PD', 'ET') OR age = 55"
    grouped = "SELECT diagnosis, avg(age) FROM tiny GROUP BY diagnosis"
    async with federation([[_tiny_catalog(tmp_path / "t", ages, diag)]]) as fed, \
            fed.client() as c, fed.client(who="bob") as bob:
        first = await c.query(near)
        with pytest.raises(JobFailed, match="exact auditing"):
            await c.query(grouped)
        await bob.query(grouped)
        with pytest.raises(JobFailed, match="exact auditing"):
            await bob.query(near)
        again = await bob.query(grouped)  # the same cells again: nothing new to subtract
    assert first.manifest[0]["n"] == 21
    assert sorted(r[0] for r in again.rows) == ["ET", "PD", "dystonia"]


async def test_min_sites_fails_cleanly(federation, tmp_path: Path) -> None:
    """When fewer sites than min_sites contribute, the job fails naming who did not and why."""
    big = _tiny_catalog(tmp_path / "a", [float(a) for a in range(30, 60)])
    small = _tiny_catalog(tmp_path / "b", [40.0, 41.0])
    async with federation([[big], [small]]) as fed, fed.client() as c:
        with pytest.raises(JobFailed, match=r"only 1 site\(s\) contributed, min_sites is 2.*site-b: suppressed"):
            await c.query("SELECT count(*) FROM tiny", federated=True, min_sites=2)
        ans = await c.query("SELECT count(*) FROM tiny", federated=True, min_sites=1)
    assert ans.rows[0][0] == 30
    assert {m["site"]: m["state"] for m in ans.manifest} == {"site-a": "done", "site-b": "suppressed"}


@pytest.mark.parametrize("slow", [False, True])
async def test_sites_report_accepted_when_their_answer_takes_a_while(
        federation, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, slow: bool) -> None:
    """Per-site progress: a site answering within ACCEPTED_AFTER_S reports its outcome at
    once; a slower one (here: its computation made to take 0.3 s) first says it accepted —
    the entry's own share and a peer's alike. The researcher's stream of a job that ends
    within QUIET_START_S is one message (the final state lists the sites' events); a slower
    job's stream reports its state and site events as they come."""
    from stimnetd.federation import subjob
    from stimnetd.jobs import watch as watch_module
    from stimnetd.site import local as site_module

    if not slow:  # thresholds no loaded CI machine can miss
        monkeypatch.setattr(subjob, "ACCEPTED_AFTER_S", 5.0)
        monkeypatch.setattr(watch_module, "QUIET_START_S", 5.0)
    else:
        real = site_module.compute

        def slow_compute(*args, **kwargs):  # type: ignore[no-untyped-def]
            import time

            time.sleep(0.3)  # in a worker thread, as a large catalog's or a map's would be
            return real(*args, **kwargs)

        monkeypatch.setattr(site_module, "compute", slow_compute)
        monkeypatch.setattr(site_module, "INLINE_SUBJECTS", 0)
    cats = [[_tiny_catalog(tmp_path / n, [float(a) for a in range(30, 60)])] for n in "ab"]
    async with federation(cats) as fed, fed.client() as c:
        events: list[tuple[str, str]] = []
        messages: list[list[str]] = []
        session = c.jobs.Session

        class Spy:  # the client's session, the query's messages noted as they are read
            def __init__(self, call: Any) -> None:
                self.call = call

            async def __aiter__(self) -> Any:
                async for reply in self.call:
                    messages.append(sorted(f.name for f, _ in reply.event.ListFields()))
                    yield reply

            def __getattr__(self, name: str) -> Any:
                return getattr(self.call, name)

        c.jobs.Session = lambda **kw: Spy(session(**kw))  # type: ignore[method-assign]
        ans = await c.query("SELECT count(*) FROM tiny", federated=True, min_sites=2,
                            on_event=lambda kind, v: events.append((v.site, v.state))
                            if kind == "site" else None)
    assert ans.rows[0][0] == 60
    for site in ("site-a", "site-b"):
        mine = [state for s, state in events if s == site]
        assert mine == (["accepted", "done"] if slow else ["done"]), (site, events)
    if slow:
        assert messages[0] == ["state"] and len(messages) > 2, messages
    else:
        assert messages == [["result", "state"]], messages


async def test_a_watcher_joining_a_running_job_sees_its_state_then_each_site_event_once(
        federation, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """WatchJob mid-job: the job's state first, then the sites' events so far (listed in
    that state and sent on their own: each reported once), then the rest as it happens."""
    import asyncio

    from stimnetd.site import local as site_module

    real = site_module.compute

    def slow_compute(*args, **kwargs):  # type: ignore[no-untyped-def]
        import time

        time.sleep(0.4)
        return real(*args, **kwargs)

    monkeypatch.setattr(site_module, "compute", slow_compute)
    monkeypatch.setattr(site_module, "INLINE_SUBJECTS", 0)
    cats = [[_tiny_catalog(tmp_path / n, [float(a) for a in range(30, 60)])] for n in "ab"]
    async with federation(cats) as fed, fed.client() as c:
        job = await c.submit_query("SELECT count(*) FROM tiny", federated=True, min_sites=2)
        await asyncio.sleep(0.2)  # both sites have said "accepted" by now
        events = [(kind, (v.site, v.state) if kind == "site" else None)
                  async for kind, v in c.watch(job.id)]
    assert events[0][0] == "state", events
    sites = [v for kind, v in events if kind == "site"]
    assert sorted(sites) == sorted({(s, st) for s in ("site-a", "site-b")
                                    for st in ("accepted", "done")}), events
    assert [kind for kind, _ in events].count("result") == 1


async def test_a_finished_jobs_result_is_read_back_by_its_owner_only(
        federation, tmp_path: Path) -> None:
    """GetResult streams the stored answer: the same as the one RunJob delivered; another
    researcher does not even see the job, and a job without an answer says why."""
    from stimctl.client import NotFound

    cats = [[_tiny_catalog(tmp_path / n, [float(a) for a in range(30, 60)])] for n in "ab"]
    async with federation(cats) as fed, fed.client() as c, fed.client(who="bob") as bob:
        ans = await c.query("SELECT count(*), avg(age) FROM tiny", federated=True, min_sites=2)
        again = await c.result(ans.job_id)
        assert again.doc == ans.doc and again.rows == ans.rows
        with pytest.raises(NotFound, match="visible to you"):
            await bob.result(ans.job_id)
        with pytest.raises(JobFailed) as failed:
            await c.query("SELECT count(*) FROM tiny", federated=True, min_sites=3)
        with pytest.raises(Refused, match="has no result .state: failed"):
            await c.result(failed.value.job.id)


async def test_unknown_query_field_is_refused_before_sending(federation, tmp_path: Path) -> None:
    """A query naming a field the catalog lacks is refused by every site with the field's name."""
    cat = _tiny_catalog(tmp_path / "t", [float(a) for a in range(30, 60)])
    async with federation([[cat]]) as fed, fed.client() as c:
        with pytest.raises(JobFailed, match="weight"):
            await c.query("SELECT avg(weight) FROM tiny")
        with pytest.raises(Refused.__mro__[1], match="refused before sending"):
            await c.query("DELETE FROM tiny")


async def test_blocking_client_works_inside_a_running_loop(start_node, pki, small_catalog) -> None:
    """stimctl.Client (the notebook API) answers queries, maps included, even under a running loop."""
    import asyncio

    import nibabel as nib

    from stimctl import Client
    from tests.helpers import client_config

    alice = pki.issue("alice", "researcher")
    async with start_node("node-a", catalogs=[small_catalog]) as d:
        def use() -> tuple:
            c = Client(client_config(alice, f"127.0.0.1:{d.port}"))
            try:
                ans = c.query("SELECT sex, count(*) FROM dbs_outcomes GROUP BY sex")
                img = c.query("SELECT mean_map(vta_path, improvement_pct) AS m "
                              "FROM dbs_outcomes").to_nifti()
            finally:
                c.close()
            return ans.to_pandas(), img
        frame, img = await asyncio.to_thread(use)
    assert list(frame.columns) == ["sex", "count(*)"] and frame["count(*)"].sum() == 20
    assert isinstance(img, nib.Nifti1Image) and img.shape == (91, 109, 91)
    # The demo images are MNI (code 4); the map says so after crossing the daemon.
    assert int(img.header["sform_code"]) == 4 and int(img.header["qform_code"]) == 4


async def test_sites_with_either_tls_terminator_federate(start_node, pki, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """A site behind our TLS front and one on gRPC's own TLS answer federated queries
    together, whichever is the entry: the choice is local to a site, the wire is the same."""
    from stimctl.client import AsyncClient
    from stimnetd.testing import free_port
    from tests.helpers import client_config

    alice = pki.issue("alice", "researcher")
    b_cat = _tiny_catalog(tmp_path / "b", [float(a) for a in range(30, 60)])
    a_cat = _tiny_catalog(tmp_path / "a", [float(a) for a in range(60, 70)])
    port_a = free_port()
    answers = []
    async with start_node("site-b", catalogs=[b_cat], tls={"terminate": "grpc"},
                          gossip={"enabled": False},
                          federation={"peers": [f"127.0.0.1:{port_a}"]}) as b:
        async with start_node("site-a", catalogs=[a_cat], gossip={"enabled": False},
                              node={"listen": f"127.0.0.1:{port_a}"},
                              federation={"peers": [f"127.0.0.1:{b.port}"]}) as a:
            assert a.front is not None and b.front is None
            for entry in (a, b):
                async with AsyncClient(client_config(alice, f"127.0.0.1:{entry.port}")) as c:
                    answers.append(await c.query("SELECT count(*), avg(age) FROM tiny",
                                                 federated=True, min_sites=2))
    for ans in answers:
        assert ans.rows[0][0] == 40
        assert ans.rows[0][1] == pytest.approx(np.mean(list(range(30, 70))))
        assert {m["site"]: m["state"] for m in ans.manifest} == {"site-a": "done",
                                                                 "site-b": "done"}


async def test_finished_jobs_are_deleted_after_the_retention_and_releases_stay(
        federation, tmp_path: Path) -> None:
    """`[node] job_retention_days`: a finished job (request, answer) is deleted that long
    after it finished — the researcher is told why it is gone — with an audit entry
    counting it, while the site's release of it stays (budgets and the overlap guard rest
    on releases)."""
    from stimctl.client import NotFound

    retention_days = 2e-5  # 1.7 s
    cat = _tiny_catalog(tmp_path / "t", [float(a) for a in range(30, 60)])
    async with federation([[cat]], node={"job_retention_days": retention_days}) as fed, \
            fed.client() as c:
        job = await c.submit_query("SELECT count(*) FROM tiny")
        await c.run_job(job)
        assert (await c.get_job(job.id)).state == "succeeded"
        store = fed.daemons[0].store
        deadline = asyncio.get_running_loop().time() + 15
        while await store.get_job(job.id) is not None:
            assert asyncio.get_running_loop().time() < deadline, "not deleted in 15 s"
            await asyncio.sleep(0.2)
        with pytest.raises(NotFound, match=r"finished jobs are kept for 2e-05 days"):
            await c.get_job(job.id)
        assert await store.get_release(job.id) is not None
        pruned = [r for r in await store.audit_rows() if r.action == "retention"]
    assert [r.decision for r in pruned] == ["pruned"]
    assert json.loads(pruned[0].detail_json)["jobs"] == 1


async def test_work_in_flight_is_limited_per_researcher_and_per_entry_node(
        federation, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A researcher's queries running at once through one entry are capped
    (`max_queries_per_researcher`, RESOURCE_EXHAUSTED naming the limit; the slot frees when
    one ends), and so are one entry node's sub-jobs at a site (`max_subjobs_per_entry`:
    that site is refused in the manifest, naming the limit; the others answer)."""
    import threading

    from stimctl.client import Overloaded
    from stimnetd.site import local as site_module

    gate = threading.Event()
    computing = threading.Semaphore(0)
    real = site_module.compute

    def gated_compute(*args, **kwargs):  # type: ignore[no-untyped-def]
        computing.release()
        gate.wait(20)  # in a worker thread (INLINE_SUBJECTS = 0)
        return real(*args, **kwargs)

    monkeypatch.setattr(site_module, "compute", gated_compute)
    monkeypatch.setattr(site_module, "INLINE_SUBJECTS", 0)

    async def started(n: int) -> None:  # n more computations are under way
        for _ in range(n):
            assert await asyncio.to_thread(computing.acquire, True, 20)

    cats = [[_tiny_catalog(tmp_path / n, [float(a) for a in range(30, 60)])] for n in "ab"]
    async with federation(cats, node={"max_queries_per_researcher": 1},
                          federation={"max_subjobs_per_entry": 1}) as fed, \
            fed.client() as alice, fed.client(who="bob") as bob:
        sql = "SELECT count(*) FROM tiny"
        # Three submitted at once (SubmitJob: each awaits its row's write), none running
        # yet: exactly one gets the slot.
        racing = await asyncio.gather(*[alice.submit_query(sql, federated=True)
                                        for _ in range(3)], return_exceptions=True)
        admitted = [j for j in racing if not isinstance(j, BaseException)]
        refused = [e for e in racing if isinstance(e, BaseException)]
        assert len(admitted) == 1, racing
        for e in refused:
            assert isinstance(e, Overloaded) and "max_queries_per_researcher = 1" in str(e), e
        first = asyncio.create_task(alice.run_job(admitted[0]))
        await started(2)  # site-a's own share and site-b's sub-job
        with pytest.raises(Overloaded, match=r"you have 1 queries running with this node as "
                                             r"their entry.*max_queries_per_researcher = 1"):
            await alice.query(sql, federated=True)
        # Bob may: but site-b already runs one sub-job from site-a, its limit.
        second = asyncio.create_task(bob.query(sql, federated=True, min_sites=1))
        await started(1)  # site-a's own share of bob's query
        gate.set()
        answers = await asyncio.gather(first, second)
        assert answers[0].rows[0][0] == 60
        states = {m["site"]: (m["state"], m["detail"]) for m in answers[1].manifest}
        assert states["site-a"][0] == "done" and states["site-b"][0] == "refused", states
        assert "max_subjobs_per_entry = 1" in states["site-b"][1], states
        # Slots free as queries end.
        again = await alice.query(sql, federated=True, min_sites=2)
        assert again.rows[0][0] == 60


async def test_pending_script_jobs_per_researcher_are_capped(federation, tmp_path: Path) -> None:
    """Under 'review' every script job waits for an admin, keeping its script in the
    store: a researcher's pending ones are capped at each site (`max_pending_per_researcher`,
    RESOURCE_EXHAUSTED naming the limit); other researchers are not held up."""
    from stimctl.client import Overloaded

    cats = [[_tiny_catalog(tmp_path / n, [float(a) for a in range(30, 60)])] for n in "ab"]
    async with federation(cats, scripts={"policy": "review", "max_pending_per_researcher": 2,
                                         "declared_outputs": "optional"}) \
            as fed, fed.client() as alice, fed.client(who="bob") as bob:
        for i in range(2):
            job = await alice.submit_script(f"print({i})\n".encode(), "tiny")
            assert job.state == "awaiting_approval"
        with pytest.raises(Overloaded, match=r"you have 2 script jobs queued, running or "
                                             r"awaiting approval at this site.*"
                                             r"max_pending_per_researcher = 2"):
            await alice.submit_script(b"print(2)\n", "tiny")
        assert (await bob.submit_script(b"print(3)\n", "tiny")).state == "awaiting_approval"


async def test_pending_script_jobs_are_capped_at_a_peer_too(federation, tmp_path: Path) -> None:
    """At a peer (here site-b with a limit of 1, as its own config would set): carol's
    first federated script leaves a pending request there, her second is refused there,
    naming the limit, while site-a (limit 2) still takes its own share."""
    cats = [[_tiny_catalog(tmp_path / n, [float(a) for a in range(30, 60)])] for n in "ab"]
    async with federation(cats, scripts={"policy": "review", "max_pending_per_researcher": 2,
                                         "declared_outputs": "optional"}) as fed, \
            fed.client(who="carol") as carol:
        fed.daemons[1].subjobs._max_pending_scripts = 1  # noqa: SLF001
        details = []
        for i in range(2):
            job = await carol.submit_script(f"print({i})\n".encode(), "tiny", federated=True)
            with pytest.raises(JobFailed) as failed:  # awaiting approval at both sites
                await carol.run_job(job)
            details.append(str(failed.value))
        assert "site-b: refused (awaiting approval" in details[0], details[0]
        assert "site-b: refused (you have 1 script jobs queued, running or awaiting approval " \
               "at this site, its limit (max_pending_per_researcher = 1)" in details[1], details[1]
        assert "site-a: refused (awaiting approval" in details[1], details[1]
