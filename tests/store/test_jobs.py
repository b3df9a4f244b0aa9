"""The jobs table: inserts and conditional updates, per-state counts, retention, and the
per-researcher cap on pending scripts."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from stimnet.errors import Conflict, Overloaded
from stimnetd.store import Store
from stimnetd.store.audit import AuditVerification
from stimnetd.store.records import JobRecord
from tests.store.contract import ALICE, StoreFactory, job_ids, job_row, release, rules


async def test_job_counts_by_state_follow_every_change(store: Store,
                                                       factory: StoreFactory) -> None:
    """The jobs-by-state gauge's counts (kept by triggers) equal counting the table after
    inserts, state changes, updates that keep the state, and deletes."""

    async def counted() -> dict[str, int]:
        rows = await factory.rows(store, "SELECT state, COUNT(*) FROM jobs GROUP BY state")
        return {st: int(n) for st, n in rows}

    for i in range(4):
        assert await store.create_job(job_row(f"j{i}")) is True
    await store.update_job("j0", state="succeeded")
    await store.update_job("j1", state="failed", detail="x")
    await store.update_job("j2", detail="same state")
    await store.update_job("j1", state="succeeded")
    await factory.run(store, "DELETE FROM jobs WHERE id = 'j3'")
    assert await store.count_jobs_by_state() == await counted() == {"succeeded": 2, "running": 1}


async def test_a_job_id_is_taken_once(store: Store) -> None:
    """Inserting a job whose id exists is a Conflict, and leaves the first job as it was."""
    assert await store.create_job(job_row("j1")) is True
    with pytest.raises(Conflict, match=r"UNIQUE constraint failed: jobs\.id|a job with id j1 exists"):
        await store.create_job(job_row("j1", state="queued"))
    assert (await store.get_job("j1")).state == "running"  # type: ignore[union-attr]


async def test_an_update_applies_only_in_the_expected_state(store: Store) -> None:
    """Of two racing decisions on one job exactly one applies; the other sees None."""
    assert await store.create_job(job_row("j1", kind="script", state="awaiting_approval")) is True
    results = await asyncio.gather(
        store.update_job_if("j1", "awaiting_approval", state="queued", bump_attempts=True),
        store.update_job_if("j1", "awaiting_approval", state="cancelled"))
    applied = [r for r in results if r is not None]
    assert [(r.state, r.attempts) for r in applied] == [("queued", 1)]
    assert await store.update_job_if("missing", None, state="failed") is None


async def test_requeues_are_kept_in_the_row(factory: StoreFactory, tmp_path: Path) -> None:
    """A restart's re-queue is counted in the row (also in a file upgraded from the first
    schema) and survives reopening the store."""
    path = tmp_path / "node.sqlite3"
    store = await factory.open(path)
    assert await store.create_job(job_row("j1", kind="script")) is True
    assert (await store.get_job("j1")).requeues == 0  # type: ignore[union-attr]
    await store.update_job("j1", state="queued", bump_attempts=True, bump_requeues=True)
    await store.update_job("j1", state="running")
    await store.close()
    reopened = await factory.open(path)
    try:
        got = await reopened.get_job("j1")
        assert got is not None and (got.state, got.requeues, got.attempts) == ("running", 1, 1)
    finally:
        await reopened.close()


async def test_a_listing_is_newest_first_and_filtered(store: Store) -> None:
    """Jobs are listed newest first, by owner and state, at most `limit` of them."""
    for i, (owner, state) in enumerate((("alice", "running"), ("bob", "running"),
                                        ("alice", "succeeded"), ("alice", "running"))):
        await store.create_job(job_row(f"j{i}", owner=owner, state=state, at=float(i)))
    assert [j.id for j in await store.list_jobs()] == ["j3", "j2", "j1", "j0"]
    assert [j.id for j in await store.list_jobs(owner="alice", states=["running"])] == ["j3", "j0"]
    assert [j.id for j in await store.list_jobs(limit=1)] == ["j3"]


async def test_retention_deletes_only_finished_jobs_past_their_time(store: Store) -> None:
    """Finished jobs last changed before the cutoff go (in small transactions); queued,
    running and awaiting-approval jobs stay however old, newer finished ones stay, and so
    does every release; the jobs-by-state counts follow."""
    states = ["succeeded", "failed", "cancelled", "interrupted", "queued", "running",
              "awaiting_approval"]
    for i, state in enumerate(states):
        for at in (100.0, 10_000.0):
            assert await store.create_job(job_row(f"{state}-{at:g}", state=state, at=at,
                                                  request_id=f"r{i}")) is True
    await store.release(release("succeeded-100"), decide=rules(), audit_actor=ALICE)
    assert await store.prune_jobs(5_000.0, batch=3) == 4
    assert await job_ids(store) == {f"{s}-10000" for s in states} | {
        "queued-100", "running-100", "awaiting_approval-100"}
    assert await store.count_jobs_by_state() == {
        s: 2 if s in ("queued", "running", "awaiting_approval") else 1 for s in states}
    assert (await store.get_release("succeeded-100")).job_id == "succeeded-100"  # type: ignore[union-attr]
    assert await store.prune_jobs(5_000.0) == 0


def _script(job_id: str, owner: str, state: str = "queued") -> JobRecord:
    return job_row(job_id, kind="script", owner=owner, state=state)


async def test_pending_script_jobs_are_capped_per_owner_in_the_insert_transaction(
        store: Store) -> None:
    """Each pending script job keeps its script (up to 1 MiB) in the store: a researcher
    may have `pending_limit` queued / running / awaiting approval, counted in the insert's
    transaction so concurrent submissions cannot all pass; nothing of a refused one stays
    (its row, its nonce), and pending audit entries riding along are kept for the next."""
    results = await asyncio.gather(
        *[store.create_job(_script(f"s{i}", "alice"), nonce=(f"n{i}" * 8, 300),
                           pending_limit=2) for i in range(5)], return_exceptions=True)
    assert sum(r is True for r in results) == 2, results
    refused = [r for r in results if isinstance(r, BaseException)]
    assert [type(r) for r in refused] == [Overloaded] * 3
    assert "max_pending_per_researcher = 2" in str(refused[0])
    assert len(await store.list_jobs(owner="alice")) == 2
    assert [store.nonce_seen(f"n{i}" * 8) for i, r in enumerate(results) if r is not True] == \
        [False] * 3
    assert await store.create_job(_script("b1", "bob"), pending_limit=2) is True  # per owner
    done = (await store.list_jobs(owner="alice"))[0]
    await store.update_job(done.id, state="succeeded")  # an ended job frees its place
    assert await store.create_job(_script("s9", "alice", "awaiting_approval"),
                                  pending_limit=2) is True
    store.audit_soon("someone", "researcher", "rpc", "allowed", {"n": 1})
    with pytest.raises(Overloaded):
        await store.create_job(_script("s10", "alice"), pending_limit=2)
    rows = await store.audit_rows()  # flushes: the queued entry survived the rollback
    assert [r.actor for r in rows if r.action == "rpc"] == ["someone"]
    assert await store.verify_audit() == AuditVerification(True, len(rows))
