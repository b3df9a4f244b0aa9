"""The verbs the SQLite store and the PostgreSQL store share, one test body run against
each: budget charges and refusals, idempotent releases, the audit chain and its tamper
check, job rows and racing state changes."""

from __future__ import annotations

import asyncio
import dataclasses
import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from stimnet.errors import Conflict, Replayed, StimnetError
from stimnetd.store import Store
from stimnetd.store.pg import PgStore
from stimnetd.store.records import NonceClaim
from tests.store.contract import job_row, release, rules

ALICE = ("alice", "researcher")


@pytest.fixture(params=["sqlite", "postgresql"])
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Any]:
    s: Any
    if request.param == "sqlite":
        s = Store(tmp_path / "node.sqlite3")
    else:
        s = PgStore(request.getfixturevalue("pg_url"))
    await s.open()
    try:
        yield s
    finally:
        await s.close()


async def tamper(store: Any, seq: int) -> None:
    """Edit one audit entry behind the store's back, as someone with the database would."""
    if isinstance(store, Store):
        await store.flush()
        conn = sqlite3.connect(store.path)
        conn.execute("UPDATE audit SET decision = 'released' WHERE seq = ?", (seq,))
        conn.commit()
        conn.close()
    else:
        conn = await asyncpg.connect(store.url)
        await conn.execute("UPDATE audit SET decision = 'released' WHERE seq = $1", seq)
        await conn.close()


async def test_releases_charge_the_budget_until_it_is_spent(store: Any) -> None:
    """0.4 + 0.4 fit a budget of 1; the third is refused for the budget and not charged."""
    rule = rules(budget=1.0)
    await store.release(release("j1", 0.4), decide=rule, audit_actor=ALICE)
    await store.release(release("j2", 0.4), decide=rule, audit_actor=ALICE)
    with pytest.raises(StimnetError, match="budget"):
        await store.release(release("j3", 0.4), decide=rule, audit_actor=ALICE)
    assert await store.spent("alice", "c") == pytest.approx(0.8)
    decisions = [r.decision for r in await store.audit_rows()]
    assert decisions == ["released", "released", "refused"]


async def test_a_job_released_twice_is_charged_once(store: Any) -> None:
    """A re-run job gets its stored release back; the ledger holds one charge."""
    rule = rules(budget=1.0)
    await store.release(release("j1", 0.5), decide=rule, audit_actor=ALICE)
    again = await store.release(release("j1", 0.5), decide=rule, audit_actor=ALICE)
    assert (again.job_id, again.epsilon) == ("j1", 0.5)
    assert await store.spent("alice", "c") == pytest.approx(0.5)


async def test_concurrent_releases_never_overspend(store: Any) -> None:
    """20 releases of 1 at once against a budget of 5: exactly 5 are charged."""
    rule = rules(budget=5.0)

    async def one(i: int) -> bool:
        try:
            await store.release(release(f"j{i}", 1.0), decide=rule, audit_actor=ALICE)
        except StimnetError:
            return False
        return True

    results = await asyncio.gather(*(one(i) for i in range(20)))
    assert sum(results) == 5
    assert await store.spent("alice", "c") == pytest.approx(5.0)


async def test_the_audit_chain_verifies_and_shows_an_edit(store: Any) -> None:
    """Entries chain; editing one is reported at that entry."""
    for i in range(4):
        await store.audit("alice", "researcher", "query", "refused", {"i": i})
    assert (await store.verify_audit()).ok
    await tamper(store, 3)
    verdict = await store.verify_audit()
    assert (verdict.ok, verdict.first_bad_seq) == (False, 3)


async def test_a_job_id_is_taken_once(store: Any) -> None:
    """A second job with the same id is a Conflict; the first is stored as it was."""
    job = job_row("job-1")
    assert await store.create_job(job, audit=("alice", "researcher", "submit"))
    with pytest.raises(Conflict):
        await store.create_job(job)
    got = await store.get_job("job-1")
    assert got is not None and (got.id, got.state, got.payload) == ("job-1", job.state, job.payload)


async def test_of_two_racing_state_changes_exactly_one_applies(store: Any) -> None:
    """approve and cancel of one awaiting job at once: one wins, the other gets None."""
    await store.create_job(job_row("job-1", state="awaiting_approval"))
    results = await asyncio.gather(
        store.update_job_if("job-1", "awaiting_approval", state="queued"),
        store.update_job_if("job-1", "awaiting_approval", state="cancelled"))
    assert sum(r is not None for r in results) == 1
    final = await store.get_job("job-1")
    winner = next(r for r in results if r is not None)
    assert final is not None and final.state == winner.state


async def test_a_requeue_is_counted_apart_from_attempts(store: Any) -> None:
    """A restart's re-queue counts in `requeues` and `attempts`, a resumed queued job's in
    `attempts` only: the once-only re-run cap reads the first, on either store."""
    await store.create_job(job_row("job-1", kind="script"))
    await store.create_job(job_row("job-2", kind="script", state="queued"))
    requeued = await store.update_job_if("job-1", "running", state="queued",
                                         bump_attempts=True, bump_requeues=True)
    resumed = await store.update_job_if("job-2", "queued", state="queued", bump_attempts=True)
    assert requeued is not None and resumed is not None
    assert [(j.requeues, j.attempts) for j in (requeued, resumed)] == [(1, 1), (0, 1)]
    got = await store.get_job("job-1")
    assert got is not None and (got.state, got.requeues) == ("queued", 1)


async def test_delta_is_charged_beside_epsilon(store: Any) -> None:
    """A noised release's δ goes to the ledger next to its ε, and is audited."""
    rule = rules(budget=1.0)
    await store.release(dataclasses.replace(release("j1", 0.25), delta=1e-6), decide=rule,
                        audit_actor=ALICE)
    assert await store.spent_delta("alice", "c") == pytest.approx(1e-6)
    assert await store.spent("alice", "c") == pytest.approx(0.25)
    (row,) = await store.audit_rows()
    assert '"delta":1e-06' in row.detail_json


async def test_the_site_secret_is_made_once_and_kept(store: Any) -> None:
    """The first call makes a 32-byte secret; every later call returns the same one."""
    first = await store.site_secret()
    assert len(first) == 32
    assert await asyncio.gather(store.site_secret(), store.site_secret()) == [first, first]


async def test_an_approved_script_stays_approved(store: Any) -> None:
    """Approving a hash is recorded (again is fine); another hash is not approved."""
    await store.approve_script("a" * 64, "admin")
    await store.approve_script("a" * 64, "admin2")
    assert await store.is_script_approved("a" * 64)
    assert not await store.is_script_approved("b" * 64)


async def test_a_nonce_is_claimed_once_with_its_audit_entry(store: Any) -> None:
    """The first claim of a nonce is True and appends its entries; a copy is False and
    appends nothing; two copies at once: exactly one wins."""
    accepted = ("alice", "researcher", "submit", "accepted", {"job": "j1"})
    assert await store.claim_nonce(NonceClaim("n1", "alice", 300.0, accepted),
                                   audit=("node-a", "node", "run", "ok", {}))
    assert not await store.claim_nonce(NonceClaim("n1", "alice", 300.0, accepted))
    assert [r.action for r in await store.audit_rows()] == ["submit", "run"]
    both = await asyncio.gather(store.remember_nonce("n2", "alice", 300.0),
                                store.remember_nonce("n2", "alice", 300.0))
    assert sorted(both) == [False, True]


async def test_a_replayed_release_is_refused_and_charges_nothing(store: Any) -> None:
    """A release carrying a nonce already used raises Replayed; the ledger is unchanged."""
    rule = rules(budget=5.0)
    await store.release(release("j1", 1.0), decide=rule, audit_actor=ALICE,
                        nonce=NonceClaim("n1", "alice", 300.0))
    with pytest.raises(Replayed):
        await store.release(release("j2", 1.0), decide=rule, audit_actor=ALICE,
                            nonce=NonceClaim("n1", "alice", 300.0))
    assert await store.spent("alice", "c") == pytest.approx(1.0)
