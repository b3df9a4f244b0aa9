"""Two replicas of one site sharing the PostgreSQL store, each a separate process with its
own connection pool (tests/store_pg/replica.py): budget charges across both never
overspend, a queued job goes to exactly one, a replica killed mid-job leaves its job to
the other, and the audit chain stays one chain."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from stimnetd.store.pg import PgStore, PgStoreError
from stimnetd.store.pg_schema import PG_MIGRATIONS
from tests.store.contract import job_row

REPO = Path(__file__).resolve().parents[2]


def replica(url: str, mode: str, name: str, *args: object) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "tests.store_pg.replica", url, mode, name, *map(str, args)],
        cwd=REPO, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        env={**os.environ, "PYTHONPATH": str(REPO)})


def line(proc: subprocess.Popen[str]) -> dict[str, Any]:
    assert proc.stdout is not None
    out = proc.stdout.readline()
    assert out, f"replica exited with {proc.wait(timeout=30)} before answering"
    return dict(json.loads(out))


def run_together(*procs: subprocess.Popen[str]) -> list[dict[str, Any]]:
    """Wait until every replica is connected, release them at once, collect answers."""
    for p in procs:
        assert line(p) == {"ready": True}
    for p in procs:
        assert p.stdin is not None
        p.stdin.write("go\n")
        p.stdin.flush()
    answers = [line(p) for p in procs]
    for p in procs:
        assert p.wait(timeout=60) == 0
    return answers


@pytest.fixture
async def store(pg_url: str) -> Any:
    s = PgStore(pg_url)
    await s.open()
    try:
        yield s
    finally:
        await s.close()


async def test_twenty_charges_over_two_replicas_against_a_budget_of_five_charge_five(
        store: PgStore, pg_url: str) -> None:
    """10 concurrent DP releases of ε=1 on each replica, budget 5: exactly 5 charged in
    all, the ledger says 5, and the audit chain is one chain of 20 release entries."""
    a = replica(pg_url, "charge", "a", 10, 1.0, 5.0)
    b = replica(pg_url, "charge", "b", 10, 1.0, 5.0)
    answers = await asyncio.to_thread(run_together, a, b)
    charged = answers[0]["charged"] + answers[1]["charged"]
    assert len(charged) == 5
    assert await store.spent("alice", "c") == pytest.approx(5.0)
    rows = await store.audit_rows()
    assert [r.seq for r in rows] == list(range(1, 21))
    assert sorted(r.decision for r in rows) == ["refused"] * 15 + ["released"] * 5
    assert (await store.verify_audit()).ok


async def test_a_queued_job_is_claimed_by_exactly_one_replica(store: PgStore, pg_url: str) -> None:
    """40 queued jobs, two replicas with four claimers each: every job claimed once."""
    for i in range(40):
        await store.create_job(job_row(f"job-{i:02}", state="queued", at=float(i)))
    a = replica(pg_url, "claim", "a")
    b = replica(pg_url, "claim", "b")
    answers = await asyncio.to_thread(run_together, a, b)
    got_a, got_b = answers[0]["claimed"], answers[1]["claimed"]
    assert sorted(got_a + got_b) == [f"job-{i:02}" for i in range(40)]
    assert not set(got_a) & set(got_b)
    for job_id in got_a[:3] + got_b[:3]:
        job = await store.get_job(job_id)
        assert job is not None and (job.state, job.attempts) == ("running", 1)


@pytest.mark.parametrize(("on_restart", "state"), [("requeue", "queued"),
                                                   ("interrupt", "interrupted")])
async def test_a_replica_killed_mid_job_leaves_it_to_the_other(
        store: PgStore, pg_url: str, on_restart: str, state: str) -> None:
    """Replica a claims the job and is SIGKILLed; once its lease runs out the other
    replica's recovery re-queues it (and claims it) or marks it interrupted."""
    await store.create_job(job_row("job-1", state="queued"))
    a = replica(pg_url, "hold", "a", 1.0)
    try:
        assert await asyncio.to_thread(line, a) == {"held": "job-1"}
        assert await store.recover_expired(on_restart, by="b") == []  # lease still valid
    finally:
        a.send_signal(signal.SIGKILL)
        a.wait(timeout=30)
    for _ in range(100):
        recovered = await store.recover_expired(on_restart, by="b")
        if recovered:
            break
        await asyncio.sleep(0.05)
    assert recovered == ["job-1"]
    job = await store.get_job("job-1")
    assert job is not None and job.state == state
    if on_restart == "requeue":
        again = await store.claim_queued("b", 30.0)
        assert again is not None and (again.id, again.attempts) == ("job-1", 2)
    rows = await store.audit_rows()
    assert (rows[-1].actor, rows[-1].action, rows[-1].decision) == ("b", "recover", state)


async def test_a_job_whose_replicas_keep_stopping_is_requeued_once(store: PgStore) -> None:
    """Its lease runs out twice: re-queued the first time, interrupted for good the second
    (saying so), and audited each time, so a job that takes replicas down stops at one."""
    await store.create_job(job_row("job-1", state="queued"))
    decisions = []
    for replica_name in ("a", "b"):
        held = await store.claim_queued(replica_name, -1.0)  # a lease already run out
        assert held is not None and held.id == "job-1"
        assert await store.recover_expired("requeue", by="c") == ["job-1"]
        job = await store.get_job("job-1")
        assert job is not None
        decisions.append((job.state, job.requeues))
    assert decisions == [("queued", 1), ("interrupted", 1)]
    assert job is not None and "not re-run again" in job.detail
    assert await store.claim_queued("c", 30.0) is None
    rows = await store.audit_rows()
    assert [r.decision for r in rows if r.action == "recover"] == ["queued", "interrupted"]


async def test_a_lease_is_renewed_only_by_its_holder(store: PgStore) -> None:
    """The holder extends its lease; another replica cannot, nor after recovery."""
    await store.create_job(job_row("job-1", state="queued"))
    assert (await store.claim_queued("a", 30.0)) is not None
    assert await store.renew_lease("job-1", "a", 30.0)
    assert not await store.renew_lease("job-1", "b", 30.0)
    assert await store.claim_queued("b", 30.0) is None


async def test_replicas_opening_at_once_migrate_once(pg_url: str) -> None:
    """Two stores opening the same empty database together apply each migration once."""
    stores = [PgStore(pg_url), PgStore(pg_url)]
    await asyncio.gather(*(s.open() for s in stores))
    try:
        conn = await asyncpg.connect(pg_url)
        versions = [r[0] for r in await conn.fetch("SELECT version FROM schema_version")]
        await conn.close()
        assert sorted(versions) == list(range(1, len(PG_MIGRATIONS) + 1))
    finally:
        for s in stores:
            await s.close()


async def test_a_database_from_a_newer_stimnetd_is_refused(pg_url: str) -> None:
    """A schema version past this build's migrations: a clear error, nothing changed."""
    conn = await asyncpg.connect(pg_url)
    await conn.execute("CREATE TABLE schema_version (version INTEGER NOT NULL)")
    await conn.execute("INSERT INTO schema_version VALUES ($1)", len(PG_MIGRATIONS) + 1)
    await conn.close()
    s = PgStore(pg_url)
    with pytest.raises(PgStoreError, match="newer than this stimnetd knows"):
        await s.open()
    await s.close()


async def test_an_unreachable_server_is_one_clear_error() -> None:
    """A URL nobody listens on: PgStoreError naming the problem, no traceback."""
    s = PgStore("postgresql://stimnet@127.0.0.1:1/none")
    with pytest.raises(PgStoreError, match="cannot be reached"):
        await s.open()


async def test_replicas_share_one_site_secret_and_approvals(pg_url: str) -> None:
    """Two stores asking for the secret at once get the same one; an approval made
    through one is seen through the other."""
    a, b = PgStore(pg_url), PgStore(pg_url)
    await asyncio.gather(a.open(), b.open())
    try:
        sa, sb = await asyncio.gather(a.site_secret(), b.site_secret())
        assert sa == sb and len(sa) == 32
        await a.approve_script("c" * 64, "admin")
        assert await b.is_script_approved("c" * 64)
    finally:
        await a.close()
        await b.close()


async def test_a_database_at_the_first_schema_is_upgraded_in_place(pg_url: str) -> None:
    """A database written by schema 1 (with a charge in it) is migrated to the current
    schema on open, keeping its rows."""
    conn = await asyncpg.connect(pg_url)
    await conn.execute("CREATE TABLE schema_version (version INTEGER NOT NULL)")
    await conn.execute(PG_MIGRATIONS[0])
    await conn.execute("INSERT INTO schema_version VALUES (1)")
    await conn.execute("INSERT INTO ledger (researcher, catalog, job_id, epsilon, at)"
                       " VALUES ('alice', 'c', 'old', 0.5, 1.0)")
    await conn.close()
    s = PgStore(pg_url)
    await s.open()
    try:
        assert await s.spent("alice", "c") == pytest.approx(0.5)
        assert len(await s.site_secret()) == 32  # a table of migration 2
        conn = await asyncpg.connect(pg_url)
        versions = sorted(r[0] for r in await conn.fetch("SELECT version FROM schema_version"))
        await conn.close()
        assert versions == list(range(1, len(PG_MIGRATIONS) + 1))
    finally:
        await s.close()


async def test_a_request_replayed_to_the_other_replica_is_refused(pg_url: str) -> None:
    """A nonce remembered through one replica's store is a replay through the other's."""
    a, b = PgStore(pg_url), PgStore(pg_url)
    await asyncio.gather(a.open(), b.open())
    try:
        assert await a.remember_nonce("n-1", "alice", 300.0)
        assert await b.nonce_seen_now("n-1")
        assert not await b.remember_nonce("n-1", "alice", 300.0)
    finally:
        await a.close()
        await b.close()
