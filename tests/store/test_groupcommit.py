"""Group commit: bookkeeping commits without an fsync, and deferred writes that ride in the
next transaction (or the group commit), each failing alone."""

from __future__ import annotations

import asyncio
import json
import threading
from pathlib import Path

import pytest

from stimnet.errors import Conflict
from stimnetd.store import Store
from stimnetd.store.audit import AuditVerification
from tests.store.contract import ALICE, SQLITE_IMPLEMENTATIONS, StoreFactory, job_ids, job_row, release, rules


@pytest.fixture(params=SQLITE_IMPLEMENTATIONS, ids=lambda f: f.name)
def factory(request: pytest.FixtureRequest) -> StoreFactory:
    """SQLite only: its group-commit writer (PostgreSQL commits per call)."""
    return request.param  # type: ignore[no-any-return]


NEVER = 600.0  # a group commit interval no test waits for: only other writes commit


async def test_bookkeeping_commits_skip_only_their_own_fsync(store: Store) -> None:
    """A query's job row commits at synchronous=NORMAL; every other transaction — and the
    next one after a bookkeeping commit, even one that failed — runs at FULL."""
    FULL, NORMAL = 2, 1

    async def level(*, durable: bool = True) -> int:
        return await store._writer.run(lambda tx: tx.conn.execute(  # noqa: SLF001
            "PRAGMA synchronous").fetchone()[0], durable=durable)

    assert await level(durable=False) == NORMAL
    assert await level() == FULL
    assert await store.create_job(job_row("job1"), durable=False) is True
    assert await level() == FULL
    with pytest.raises(Conflict):  # the same id again: rolled back
        await store.create_job(job_row("job1"), durable=False)
    assert await level() == FULL
    updated = await store.update_job("job1", state="succeeded", durable=False)
    assert updated.state == "succeeded" and await level() == FULL
    assert (await store.get_job("job1")).state == "succeeded"  # type: ignore[union-attr]


async def test_a_deferred_row_rides_in_the_next_transaction(
        factory: StoreFactory, tmp_path: Path) -> None:
    """A deferred write is committed by the next transaction that comes (here a release),
    with its nonce, before any group commit runs."""
    store = await factory.open(tmp_path / "node.sqlite3", group_commit_s=NEVER)
    try:
        create = asyncio.ensure_future(store.create_job(
            job_row("q1", scope="federated"), audit=("alice", "researcher", "submit"),
            nonce=("n-q1", 300.0), durable=False, defer=True))
        await asyncio.sleep(0)  # queued
        assert await job_ids(store) == set()
        await store.release(release("q1"), decide=rules(), audit_actor=ALICE)
        assert await job_ids(store) == {"q1"}
        assert (create.done(), create.result(), store.nonce_seen("n-q1")) == (True, True, True)
        rows = await store.audit_rows()
        assert [r.action for r in rows] == ["submit", "release"]
        assert await store.verify_audit() == AuditVerification(True, 2)
    finally:
        await store.close()


async def test_a_deferred_row_alone_is_committed_by_the_group_commit(store: Store) -> None:
    """With no other transaction to ride in, a deferred write is committed by the group
    commit; an update deferred the same way follows it."""
    create = asyncio.ensure_future(store.create_job(job_row("q1"), durable=False, defer=True))
    await asyncio.sleep(0)
    assert create.done() is False  # nothing has committed it yet
    assert await create is True
    updated = await store.update_job("q1", state="succeeded", durable=False, defer=True)
    assert updated.state == "succeeded"
    assert (await store.get_job("q1")).state == "succeeded"  # type: ignore[union-attr]


async def test_a_failing_deferred_write_undoes_only_itself(
        factory: StoreFactory, tmp_path: Path) -> None:
    """A deferred row that cannot be written (its id is taken) fails alone: its host's
    release and audit entry commit, so do other deferred rows, and the chain verifies."""
    store = await factory.open(tmp_path / "node.sqlite3", group_commit_s=NEVER)
    try:
        assert await store.create_job(job_row("q1"), durable=False) is True
        dup = asyncio.ensure_future(store.create_job(
            job_row("q1"), audit=("alice", "researcher", "submit"), durable=False, defer=True))
        other = asyncio.ensure_future(store.create_job(
            job_row("q2"), audit=("alice", "researcher", "submit"), durable=False, defer=True))
        replay = asyncio.ensure_future(store.create_job(
            job_row("q3"), nonce=("n-q1", 300.0), durable=False, defer=True))
        assert await store.remember_nonce("n-q1", "alice", 300.0) is True  # q3's nonce taken
        await asyncio.sleep(0)
        await store.release(release("r1"), decide=rules(), audit_actor=ALICE)
        with pytest.raises(Conflict, match="UNIQUE constraint failed: jobs.id"):
            await dup
        assert (await other, await replay) == (True, False)
        assert await job_ids(store) == {"q1", "q2"}
        assert (await store.get_release("r1")).job_id == "r1"  # type: ignore[union-attr]
        rows = await store.audit_rows()
        assert await store.verify_audit() == AuditVerification(True, len(rows))
        submits = [r for r in rows if r.action == "submit"]
        assert [json.loads(r.detail_json)["job"] for r in submits] == ["q2"]
    finally:
        await store.close()


async def test_a_deferred_write_outlives_a_host_that_failed(store: Store) -> None:
    """When the transaction it rode in rolls back (its own work raised), a deferred write
    is committed by the group commit instead."""
    create = asyncio.ensure_future(store.create_job(job_row("q1"), durable=False, defer=True))
    await asyncio.sleep(0)

    def boom(tx: object) -> None:
        raise RuntimeError("host failed")
    with pytest.raises(RuntimeError, match="host failed"):
        await store._writer.run(boom)  # noqa: SLF001
    assert await create is True
    assert await job_ids(store) == {"q1"}


async def test_closing_the_store_commits_deferred_writes(
        factory: StoreFactory, tmp_path: Path) -> None:
    """A deferred write still queued when the store closes is committed, not lost."""
    path = tmp_path / "node.sqlite3"
    s = await factory.open(path, group_commit_s=NEVER)
    create = asyncio.ensure_future(s.create_job(job_row("q1"), durable=False, defer=True))
    await asyncio.sleep(0)
    await s.close()
    assert create.result() is True
    again = await factory.open(path)
    try:
        assert await job_ids(again) == {"q1"}
    finally:
        await again.close()


async def test_flush_waits_for_a_commit_in_flight(factory: StoreFactory, tmp_path: Path) -> None:
    """An entry the group commit has taken from the queue but not yet committed is
    committed when `flush` returns: a read after a flush sees every entry queued before."""
    store = await factory.open(tmp_path / "node.sqlite3", group_commit_s=NEVER)
    started, go = threading.Event(), threading.Event()

    def slow(tx: object) -> None:
        started.set()
        go.wait(30)

    try:
        store.audit_soon("127.0.0.1:5", "anonymous", "tls-handshake", "denied")
        in_flight = asyncio.ensure_future(store._writer.run(slow))  # noqa: SLF001 - takes it
        assert await asyncio.to_thread(started.wait, 30)
        flushing = asyncio.ensure_future(store.flush())
        for _ in range(3):
            await asyncio.sleep(0)
        assert not flushing.done()
        go.set()
        await asyncio.gather(in_flight, flushing)
        assert [r.action for r in await store.audit_rows()] == ["tls-handshake"]
    finally:
        go.set()
        await store.close()
