"""The store's contract: migrations, audit chain, nonces, ledger, releases, integrity."""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import json
import sqlite3
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from stimnet.errors import BudgetExhausted, Overloaded, Refused
from stimnetd.privacy.overlap import check_overlap, check_union_overlap
from stimnetd.store import Store, StoreCorrupt, db
from stimnetd.store.records import JobRecord, Release, cohort_digest, cohort_sketch, sketch_distances
from stimnetd.store.schema import MIGRATIONS


@pytest.fixture
async def store(tmp_path: Path):  # type: ignore[no-untyped-def]
    s = Store(tmp_path / "state" / "node.sqlite3")
    await s.open()
    yield s
    await s.close()


def _release(job: str, eps: float | None = None, cohort: frozenset[str] = frozenset({"a"})) -> Release:
    return Release(job_id=job, researcher="alice", catalog="c", decision="released", epsilon=eps,
                   cohort=cohort, partials=b"p", at=1.0)


async def test_schema_is_migrated_and_wal(store: Store) -> None:
    """A new store is at the latest schema version, in WAL mode, and private (0600)."""
    (version,) = list(await store.db.execute_fetchall("PRAGMA user_version"))[0]
    (mode,) = list(await store.db.execute_fetchall("PRAGMA journal_mode"))[0]
    assert version == len(MIGRATIONS) and mode == "wal"
    assert store.path.stat().st_mode & 0o777 == 0o600


async def test_nonce_pruning_uses_an_index(store: Store) -> None:
    """Every nonce insert prunes expired nonces: by index, not a scan of the whole table
    (a scan cost 2.8 ms per transaction at 60,000 remembered requests)."""
    plan = await store.db.execute_fetchall(
        "EXPLAIN QUERY PLAN DELETE FROM nonces WHERE seen_at < ?", (0.0,))
    assert any("USING INDEX nonces_seen" in row[-1] for row in plan), plan


async def test_job_listings_read_an_index(store: Store) -> None:
    """A researcher's job list and an admin's (newest first) do not scan every job."""
    for where, args, index in (("WHERE owner = ?", ("alice",), "jobs_owner_created"),
                               ("", (), "jobs_created")):
        plan = await store.db.execute_fetchall(
            f"EXPLAIN QUERY PLAN SELECT id FROM jobs {where} ORDER BY created_at DESC LIMIT 50",
            args)
        details = " ".join(row[-1] for row in plan)
        assert f"USING INDEX {index}" in details and "TEMP B-TREE" not in details, details


async def test_a_version_1_store_is_upgraded_in_place(tmp_path: Path) -> None:
    """A store written by the first schema (no nonce index) opens, keeps its data, and
    reaches the current version."""
    path = tmp_path / "old.sqlite3"
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA journal_mode = WAL")
    for stmt in MIGRATIONS[0].split(";"):
        if stmt.strip():
            conn.execute(stmt)
    conn.execute("INSERT INTO nonces (nonce, signer, seen_at) VALUES ('old', 'alice', 1.0)")
    for i, state in enumerate(("succeeded", "succeeded", "failed")):
        conn.execute("INSERT INTO jobs (id, kind, scope, catalog, owner, state, detail, "
                     "created_at, updated_at, request_id, origin, payload, signature, "
                     "signer_cert) VALUES (?, 'query', 'local', 'c', 'alice', ?, '', 1, 1, "
                     "'r', 'client', x'', x'', x'')", (f"j{i}", state))
    conn.execute("PRAGMA user_version = 1")
    conn.close()
    s = Store(path, clock=lambda: 2.0)
    await s.open()
    try:
        (version,) = list(await s.db.execute_fetchall("PRAGMA user_version"))[0]
        assert version == len(MIGRATIONS) and s.nonce_seen("old")
        assert await s.count_jobs_by_state() == {"succeeded": 2, "failed": 1}
    finally:
        await s.close()


async def test_job_counts_by_state_follow_every_change(store: Store) -> None:
    """The jobs-by-state gauge's counts (kept by triggers) equal counting the table after
    inserts, state changes, updates that keep the state, and deletes."""

    async def counted() -> dict[str, int]:
        rows = await store.db.execute_fetchall("SELECT state, COUNT(*) FROM jobs GROUP BY state")
        return {st: int(n) for st, n in rows}

    for i in range(4):
        assert await store.create_job(JobRecord(
            id=f"j{i}", kind="query", scope="local", catalog="c", owner="alice",
            state="running", detail="", created_at=1.0, updated_at=1.0, request_id="r",
            origin="client", payload=b"", signature=b"", signer_cert=b""))
    await store.update_job("j0", state="succeeded")
    await store.update_job("j1", state="failed", detail="x")
    await store.update_job("j2", detail="same state")
    await store.update_job("j1", state="succeeded")
    await store.db.execute("DELETE FROM jobs WHERE id = 'j3'")
    assert await store.count_jobs_by_state() == await counted() == {"succeeded": 2, "running": 1}


async def test_audit_chain_verifies(store: Store) -> None:
    """Durable and group-committed entries form one chain that verifies."""
    await store.audit("alice", "researcher", "A", "allowed", {"x": 1})
    store.audit_soon("bob", "researcher", "B", "allowed")
    await store.audit("carol", "admin", "C", "denied")
    rows = await store.audit_rows()
    assert [r.action for r in rows] == ["A", "B", "C"]
    assert (await store.verify_audit()).ok


@pytest.mark.parametrize("tamper, problem", [
    ("UPDATE audit SET decision = 'allowed' WHERE seq = 2", "entry 2 does not match its hash"),
    ("DELETE FROM audit WHERE seq = 2", "entry 3 found where 2 was expected"),
    ("UPDATE audit SET seq = -1 WHERE seq = 2; UPDATE audit SET seq = 2 WHERE seq = 3;"
     " UPDATE audit SET seq = 3 WHERE seq = -1", "entry 2 does not link to entry 1"),
])
async def test_audit_tampering_is_detected(tmp_path: Path, tamper: str, problem: str) -> None:
    """Editing, deleting or reordering an audit row in a copy of the store is reported."""
    s = Store(tmp_path / "a.sqlite3")
    await s.open()
    for i in range(4):
        await s.audit("alice", "researcher", f"act{i}", "denied", {"i": i})
    await s.close()
    with sqlite3.connect(tmp_path / "a.sqlite3") as conn:
        conn.executescript(tamper)
    s2 = Store(tmp_path / "a.sqlite3")
    await s2.open()
    try:
        v = await s2.verify_audit()
    finally:
        await s2.close()
    assert not v.ok and problem in v.problem


async def test_reordering_whole_rows_is_detected(tmp_path: Path) -> None:
    """Swapping the content of two rows (keeping seq order) breaks the hash links."""
    s = Store(tmp_path / "a.sqlite3")
    await s.open()
    for i in range(3):
        await s.audit("alice", "researcher", f"act{i}", "allowed", {"i": i})
    await s.close()
    with sqlite3.connect(tmp_path / "a.sqlite3") as conn:
        r2 = conn.execute("SELECT at, actor, role, action, decision, detail_json, prev_hash, hash "
                          "FROM audit WHERE seq = 2").fetchone()
        r3 = conn.execute("SELECT at, actor, role, action, decision, detail_json, prev_hash, hash "
                          "FROM audit WHERE seq = 3").fetchone()
        cols = "at=?, actor=?, role=?, action=?, decision=?, detail_json=?, prev_hash=?, hash=?"
        conn.execute(f"UPDATE audit SET {cols} WHERE seq = 2", r3)
        conn.execute(f"UPDATE audit SET {cols} WHERE seq = 3", r2)
    s2 = Store(tmp_path / "a.sqlite3")
    await s2.open()
    v = await s2.verify_audit()
    await s2.close()
    assert not v.ok and v.first_bad_seq == 2


async def test_nonce_is_remembered_once(store: Store) -> None:
    """A nonce is accepted once; the second use is a replay."""
    assert await store.remember_nonce("n1", "alice", 300)
    assert not await store.remember_nonce("n1", "alice", 300)


async def test_nonce_seen_covers_every_way_a_nonce_is_kept_and_survives_a_restart(
        tmp_path: Path) -> None:
    """`nonce_seen` (in memory, no database round trip) knows the nonces of claims, of
    releases and refusals, and of submitted jobs, and still knows them after a restart;
    nonces past twice the freshness window are forgotten, as in the table."""
    from stimnetd.store import NonceClaim
    from stimnetd.store.records import JobRecord

    now = [1000.0]
    path = tmp_path / "node.sqlite3"
    s = Store(path, clock=lambda: now[0])
    await s.open()
    assert await s.claim_nonce(NonceClaim("claimed", "alice", 300))
    await s.release(_release("j1"), budget=1.0, audit_actor=("alice", "researcher"),
                    nonce=NonceClaim("released", "alice", 300))
    with pytest.raises(BudgetExhausted):
        await s.release(_release("j2", eps=5.0), budget=1.0,
                        audit_actor=("alice", "researcher"),
                        nonce=NonceClaim("refused", "alice", 300))
    job = JobRecord(id="job1", kind="query", scope="local", catalog="c", owner="alice",
                    state="running", detail="", created_at=now[0], updated_at=now[0],
                    request_id="r", origin="client", payload=b"{}", signature=b"",
                    signer_cert=b"")
    assert await s.create_job(job, nonce=("submitted", 300))
    kept = ("claimed", "released", "refused", "submitted")
    assert all(s.nonce_seen(n) for n in kept) and not s.nonce_seen("other")
    await s.close()

    s = Store(path, clock=lambda: now[0])
    await s.open()
    try:
        assert all(s.nonce_seen(n) for n in kept) and not s.nonce_seen("other")
        now[0] += 2 * 300 + 1  # past every kept nonce's window: the next claim prunes them
        assert await s.claim_nonce(NonceClaim("later", "alice", 300))
        assert not any(s.nonce_seen(n) for n in kept) and s.nonce_seen("later")
    finally:
        await s.close()


async def test_release_charges_once_and_is_idempotent(store: Store) -> None:
    """A job's release charges epsilon once; releasing the same job again returns the stored one."""
    await store.release(_release("j1", 1.0), budget=2.0, audit_actor=("alice", "researcher"))
    again = await store.release(_release("j1", 1.0), budget=2.0, audit_actor=("alice", "researcher"))
    assert again.job_id == "j1"
    assert await store.spent("alice", "c") == pytest.approx(1.0)


async def test_budget_refusal_is_audited_and_charges_nothing(store: Store) -> None:
    """A release beyond the budget raises RESOURCE_EXHAUSTED, leaves the ledger alone, and is audited."""
    await store.release(_release("j1", 1.5), budget=2.0, audit_actor=("alice", "researcher"))
    with pytest.raises(BudgetExhausted, match="0.5 of 2 remains"):
        await store.release(_release("j2", 1.0), budget=2.0, audit_actor=("alice", "researcher"))
    assert await store.spent("alice", "c") == pytest.approx(1.5)
    assert await store.get_release("j2") is None
    last = (await store.audit_rows())[-1]
    assert (last.decision, '"policy":"budget"' in last.detail_json) == ("refused", True)
    assert (await store.verify_audit()).ok


async def test_concurrent_releases_cannot_overspend(store: Store) -> None:
    """Twenty racing releases against a budget for five: exactly five are charged."""
    async def one(i: int) -> bool:
        try:
            await store.release(_release(f"j{i}", 1.0), budget=5.0,
                                audit_actor=("alice", "researcher"))
            return True
        except BudgetExhausted:
            return False
    results = await asyncio.gather(*[one(i) for i in range(20)])
    assert sum(results) == 5 and await store.spent("alice", "c") == pytest.approx(5.0)


async def test_overlap_guard_sees_earlier_cohorts_of_similar_size(store: Store) -> None:
    """The guard callback receives earlier released cohorts within the size window."""
    seen: list[list[frozenset[str]]] = []
    await store.release(_release("j1", cohort=frozenset("abcdef")), budget=1,
                        audit_actor=("alice", "researcher"))

    def guard(members: frozenset[str], earlier: list[frozenset[str]]) -> None:
        seen.append(earlier)
        if any(len(e ^ members) < 5 for e in earlier):
            raise Refused("overlap")

    with pytest.raises(Refused):
        await store.release(_release("j2", cohort=frozenset("abcde")), budget=1, guard=guard,
                            guard_window=4, audit_actor=("alice", "researcher"))
    assert seen == [[frozenset("abcdef")]]
    assert await store.get_release("j2") is None


async def test_every_disclosed_cohort_is_guarded_and_recorded(store: Store) -> None:
    """A release disclosing several cohorts (a grouped query's cells and their union) has
    each checked against earlier ones and each recorded, so a later query near any of them
    is refused; a refusal records none of them."""
    def guard(members: frozenset[str], earlier: list[frozenset[str]]) -> None:
        if any(0 < len(e ^ members) < 3 for e in earlier):
            raise Refused("overlap")

    def disclosing(job: str, *cohorts: str) -> Release:
        sets = [frozenset(c) for c in cohorts]
        return dataclasses.replace(_release(job, cohort=frozenset().union(*sets)),
                                   guarded=tuple((c, cohort_digest(c)) for c in sets))

    kw = {"budget": 1, "guard": guard, "guard_window": 2, "audit_actor": ("alice", "researcher")}
    await store.release(disclosing("j1", "abcdefgh", "ijklmnop", "abcdefghijklmnop"), **kw)
    with pytest.raises(Refused):
        await store.release(disclosing("j2", "abcdefg"), **kw)  # one from a cell
    with pytest.raises(Refused):
        await store.release(disclosing("j3", "abcdefghijklmnopq"), **kw)  # one from the union
    with pytest.raises(Refused):  # the second cohort of a release is checked too
        await store.release(disclosing("j4", "qrstuvwxyz", "ijklmno"), **kw)
    await store.release(disclosing("j5", "qrstuvwxyz"), **kw)
    async with store.db.execute("SELECT size FROM cohorts ORDER BY size") as cur:
        assert [r[0] async for r in cur] == [8, 8, 10, 16]


async def test_guard_parses_only_cohorts_whose_sketch_could_be_near(store: Store) -> None:
    """Of earlier cohorts of the same size, the guard is handed those whose sketches are
    within the window (the near one) and not the rest; a row stored without a sketch
    (before schema v3) is handed over and sketched, so it is judged by sketch next time."""
    def fps(ids: range) -> frozenset[str]:
        return frozenset(hashlib.sha256(str(i).encode()).hexdigest()[:32] for i in ids)

    seen: list[list[frozenset[str]]] = []

    def guard(members: frozenset[str], earlier: list[frozenset[str]]) -> None:
        seen.append(earlier)
        if any(0 < len(e ^ members) < 5 for e in earlier):
            raise Refused("overlap")

    kw = {"budget": 1, "guard_window": 4, "audit_actor": ("alice", "researcher")}
    for i, start in enumerate((0, 1000, 2000, 3000)):  # four far-apart cohorts of 200
        await store.release(_release(f"far{i}", cohort=fps(range(start, start + 200))), **kw)
    await store.db.execute("DELETE FROM cohort_sketches WHERE digest = (SELECT digest FROM "
                           "cohorts WHERE rowid = (SELECT MAX(rowid) FROM cohorts))")
    await store.db.commit()
    near = fps(range(2, 202))  # two off the first cohort
    with pytest.raises(Refused):
        await store.release(_release("near", cohort=near), guard=guard, **kw)
    assert sorted(len(e ^ near) for e in seen[0]) == [4, 400]  # the near one + the unsketched
    async with store.db.execute("SELECT COUNT(*) FROM cohorts LEFT JOIN cohort_sketches USING "
                                "(researcher, catalog, digest) WHERE sketch IS NULL") as cur:
        assert (await cur.fetchone())[0] == 0


@given(a=st.sets(st.text(max_size=6) | st.from_regex(r"[0-9a-f]{32}", fullmatch=True),
                 max_size=40),
       b=st.sets(st.text(max_size=6) | st.from_regex(r"[0-9a-f]{32}", fullmatch=True),
                 max_size=40))
def test_sketch_distance_never_exceeds_the_set_difference(a: set[str], b: set[str]) -> None:
    """The guard's prefilter skips a cohort only when its sketch is more than k_min - 1
    away, which is safe because the distance is a lower bound on |A xor B| for any members."""
    (d,) = sketch_distances(cohort_sketch(a), [cohort_sketch(b)])
    # Never above the set difference (safe to skip on), never below the size difference
    # (the sketch counts every member: it is no weaker than the size window).
    assert abs(len(a) - len(b)) <= d <= len(a ^ b)


@given(st.sets(st.text(max_size=3) | st.from_regex(r"[0-9a-f]{2,32}", fullmatch=True),
               max_size=30))
def test_a_member_lands_in_the_same_bucket_whatever_set_it_is_in(cohort: set[str]) -> None:
    """The sketch of a set is the sum of its members' own sketches (so sketches of disjoint
    cells add up to their union's, which the union guard relies on), whichever way the
    set's members were decoded (all hex at once, or one by one)."""
    one_by_one = sum(np.frombuffer(cohort_sketch([m]), dtype="<u4").astype(np.int64)
                     for m in cohort)
    assert np.array_equal(np.frombuffer(cohort_sketch(cohort), dtype="<u4"),
                          one_by_one if cohort else np.zeros(256))


async def test_corrupt_store_is_refused(tmp_path: Path) -> None:
    """A store file that is not a database is refused with a message saying to restore it."""
    p = tmp_path / "bad.sqlite3"
    p.write_bytes(b"SQLite format 3\x00" + b"\xff" * 4000)
    with pytest.raises(StoreCorrupt, match="restore it from a backup"):
        await Store(p).open()


async def test_backup_is_a_consistent_copy(store: Store, tmp_path: Path) -> None:
    """backup() writes a copy whose audit chain verifies; it never overwrites a file."""
    await store.audit("alice", "researcher", "A", "allowed")
    dest = tmp_path / "backup.sqlite3"
    await store.backup(dest)
    copy = Store(dest)
    await copy.open()
    assert (await copy.verify_audit()).entries == 1
    await copy.close()
    with pytest.raises(Exception, match="already exists"):
        await store.backup(dest)


async def test_cancelled_writer_does_not_desync_the_audit_chain(store: Store) -> None:
    """A caller cancelled while its transaction commits (a client hanging up) leaves the chain
    head in step with the file: later appends succeed and the chain verifies."""
    for _ in range(20):
        task = asyncio.create_task(store.audit("alice", "researcher", "A", "allowed"))
        await asyncio.sleep(0)  # let it reach the database thread
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await store.audit("bob", "researcher", "B", "denied")
    v = await store.verify_audit()
    assert v.ok, v.problem
    assert v.entries >= 20


async def test_bookkeeping_commits_skip_only_their_own_fsync(store: Store) -> None:
    """A query's job row commits at synchronous=NORMAL; every other transaction — and the
    next one after a bookkeeping commit, even one that failed — runs at FULL."""
    FULL, NORMAL = 2, 1
    job = JobRecord(id="job1", kind="query", scope="local", catalog="c", owner="alice",
                    state="running", detail="", created_at=1.0, updated_at=1.0, request_id="r",
                    origin="client", payload=b"{}", signature=b"", signer_cert=b"")

    async def level(*, durable: bool = True) -> int:
        return await store._tx(lambda chain: chain.conn.execute(  # noqa: SLF001
            "PRAGMA synchronous").fetchone()[0], durable=durable)

    assert await level(durable=False) == NORMAL
    assert await level() == FULL
    assert await store.create_job(job, durable=False)
    assert await level() == FULL
    with pytest.raises(sqlite3.IntegrityError):  # the same id again: rolled back
        await store.create_job(job, durable=False)
    assert await level() == FULL
    updated = await store.update_job("job1", state="succeeded", durable=False)
    assert updated.state == "succeeded" and await level() == FULL
    assert (await store.get_job("job1")).state == "succeeded"  # type: ignore[union-attr]


def _query_row(job_id: str) -> JobRecord:
    return JobRecord(id=job_id, kind="query", scope="federated", catalog="c", owner="alice",
                     state="running", detail="", created_at=1.0, updated_at=1.0,
                     request_id="r", origin="client", payload=b"{}", signature=b"",
                     signer_cert=b"")


async def _rows(store: Store) -> set[str]:
    return {r.id for r in await store.list_jobs(limit=100)}


async def test_a_deferred_row_rides_in_the_next_transaction(
        store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    """A deferred write is committed by the next transaction that comes (here a release),
    with its nonce, long before the group commit would have run."""
    monkeypatch.setattr(db, "GROUP_COMMIT_S", 600.0)
    create = asyncio.ensure_future(store.create_job(
        _query_row("q1"), audit=("alice", "researcher", "submit"), nonce=("n-q1", 300.0),
        durable=False, defer=True))
    await asyncio.sleep(0)  # queued
    assert await _rows(store) == set()
    await store.release(_release("q1"), budget=1.0, audit_actor=("alice", "researcher"))
    assert await _rows(store) == {"q1"}
    assert await asyncio.wait_for(create, 5) is True and store.nonce_seen("n-q1")
    assert (await store.verify_audit()).ok


async def test_a_deferred_row_alone_is_committed_by_the_group_commit(store: Store) -> None:
    """With no other transaction to ride in, a deferred write lands within GROUP_COMMIT_S;
    an update deferred the same way follows it."""
    assert await asyncio.wait_for(store.create_job(_query_row("q1"), durable=False,
                                                   defer=True), 5)
    updated = await asyncio.wait_for(store.update_job("q1", state="succeeded", durable=False,
                                                      defer=True), 5)
    assert updated.state == "succeeded"
    assert (await store.get_job("q1")).state == "succeeded"  # type: ignore[union-attr]


async def test_a_failing_deferred_write_undoes_only_itself(
        store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    """A deferred row that cannot be written (its id is taken) fails alone: its host's
    release and audit entry commit, so do other deferred rows, and the chain verifies."""
    monkeypatch.setattr(db, "GROUP_COMMIT_S", 600.0)
    assert await store.create_job(_query_row("q1"), durable=False)
    dup = asyncio.ensure_future(store.create_job(
        _query_row("q1"), audit=("alice", "researcher", "submit"), durable=False, defer=True))
    other = asyncio.ensure_future(store.create_job(
        _query_row("q2"), audit=("alice", "researcher", "submit"), durable=False, defer=True))
    replay = asyncio.ensure_future(store.create_job(
        _query_row("q3"), nonce=("n-q1", 300.0), durable=False, defer=True))
    await store.remember_nonce("n-q1", "alice", 300.0)  # the host: q3's nonce is now taken
    await asyncio.sleep(0)
    await store.release(_release("r1"), budget=1.0, audit_actor=("alice", "researcher"))
    with pytest.raises(sqlite3.IntegrityError):
        await dup
    assert await other is True and await replay is False
    assert await _rows(store) == {"q1", "q2"}
    assert await store.get_release("r1") is not None
    v = await store.verify_audit()
    assert v.ok, v.problem
    submits = [r for r in await store.audit_rows() if r.action == "submit"]
    assert [json.loads(r.detail_json)["job"] for r in submits] == ["q2"]


async def test_a_deferred_write_outlives_a_host_that_failed(store: Store) -> None:
    """When the transaction it rode in rolls back (its own work raised), a deferred write
    is committed by the group commit instead."""
    create = asyncio.ensure_future(store.create_job(_query_row("q1"), durable=False,
                                                    defer=True))
    await asyncio.sleep(0)

    def boom(chain: object) -> None:
        raise RuntimeError("host failed")
    with pytest.raises(RuntimeError, match="host failed"):
        await store._tx(boom)  # noqa: SLF001
    assert await asyncio.wait_for(create, 5) is True
    assert await _rows(store) == {"q1"}


async def test_closing_the_store_commits_deferred_writes(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A deferred write still queued when the store closes is committed, not lost."""
    monkeypatch.setattr(db, "GROUP_COMMIT_S", 600.0)
    path = tmp_path / "node.sqlite3"
    s = Store(path)
    await s.open()
    create = asyncio.ensure_future(s.create_job(_query_row("q1"), durable=False, defer=True))
    await asyncio.sleep(0)
    await s.close()
    assert create.result() is True
    again = Store(path)
    await again.open()
    try:
        assert await _rows(again) == {"q1"}
    finally:
        await again.close()


def _grouped(job: str, *cells: frozenset[str]) -> Release:
    """A grouped release as the site builds it: each cell and their union disclosed, the
    cells as its atoms."""
    union = frozenset().union(*cells)
    disclosed = [(c, cohort_digest(c)) for c in cells]
    if len(cells) > 1:
        disclosed.append((union, cohort_digest(union)))
    return dataclasses.replace(_release(job, cohort=union), guarded=tuple(disclosed),
                               atoms=tuple(disclosed[:len(cells)]) if len(cells) > 1 else ())


async def test_unions_of_some_groups_are_guarded_in_either_order(tmp_path: Path) -> None:
    """STN ∪ GPi plus one subject, and a query grouped into STN, GPi and VIM: each cell
    and all three together are far from it, STN and GPi together one subject away. Refused
    whichever comes first, and when both are grouped; a repeated grouped query, and one
    grouped differently but far from every union, are not."""
    def fps(tag: str, n: int = 20) -> frozenset[str]:
        return frozenset(hashlib.sha256(f"{tag}{i}".encode()).hexdigest()[:32] for i in range(n))

    stn, gpi, vim, other = fps("stn"), fps("gpi"), fps("vim"), fps("other", 40)
    near = stn | gpi | fps("x", 1)

    def guard(members: frozenset[str], earlier: list[frozenset[str]]) -> None:
        check_overlap(members, earlier, 5)

    def union_guard(atoms: list[frozenset[str]], earlier: list[list[frozenset[str]]]) -> None:
        check_union_overlap(atoms, earlier, 5)

    kw = {"budget": 1, "guard": guard, "union_guard": union_guard, "guard_window": 4,
          "audit_actor": ("alice", "researcher")}
    for name, first, second in (
            ("cohort-then-groups", _release("a1", cohort=near), _grouped("a2", stn, gpi, vim)),
            ("groups-then-cohort", _grouped("b1", stn, gpi, vim), _release("b2", cohort=near)),
            ("groups-then-groups", _grouped("c1", stn, gpi, vim),
             _grouped("c2", near, other))):
        s = Store(tmp_path / name / "node.sqlite3")
        await s.open()
        try:
            await s.release(first, **kw)
            with pytest.raises(Refused, match="union of"):  # not the pairwise guard's words
                await s.release(second, **kw)
            if name == "groups-then-cohort":
                await s.release(_grouped("b3", stn, gpi, vim), **kw)  # the same again
                await s.release(_grouped("b4", stn | gpi | vim, other), **kw)
                async with s.db.execute("SELECT COUNT(*) FROM cohort_families") as cur:
                    assert (await cur.fetchone())[0] == 2
        finally:
            await s.close()


async def test_retention_deletes_only_finished_jobs_past_their_time(store: Store) -> None:
    """Finished jobs last changed before the cutoff go (in small transactions); queued,
    running and awaiting-approval jobs stay however old, newer finished ones stay, and so
    does every release; the jobs-by-state counts follow."""
    states = ["succeeded", "failed", "cancelled", "interrupted", "queued", "running",
              "awaiting_approval"]
    for i, state in enumerate(states):
        for at in (100.0, 10_000.0):
            assert await store.create_job(JobRecord(
                id=f"{state}-{at:g}", kind="query", scope="local", catalog="c", owner="alice",
                state=state, detail="", created_at=at, updated_at=at, request_id=f"r{i}",
                origin="client", payload=b"{}", signature=b"", signer_cert=b""))
    await store.release(_release("succeeded-100"), budget=1, audit_actor=("alice", "researcher"))
    assert await store.prune_jobs(5_000.0, batch=3) == 4
    kept = {j.id for j in await store.list_jobs(limit=100)}
    assert kept == {f"{s}-10000" for s in states} | {
        "queued-100", "running-100", "awaiting_approval-100"}
    assert await store.count_jobs_by_state() == {
        s: 2 if s in ("queued", "running", "awaiting_approval") else 1 for s in states}
    assert await store.get_release("succeeded-100") is not None
    assert await store.prune_jobs(5_000.0) == 0


def _script(job_id: str, owner: str, state: str = "queued") -> JobRecord:
    return JobRecord(id=job_id, kind="script", scope="local", catalog="c", owner=owner,
                     state=state, detail="", created_at=1.0, updated_at=1.0, request_id="r",
                     origin="client", payload=b"{}", signature=b"", signer_cert=b"",
                     script=b"x" * 1000, script_sha256="0" * 64)


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
    assert len(refused) == 3 and all(isinstance(r, Overloaded) for r in refused)
    assert "max_pending_per_researcher = 2" in str(refused[0])
    assert len(await store.list_jobs(owner="alice")) == 2
    assert not any(store.nonce_seen(f"n{i}" * 8) for i, r in enumerate(results)
                   if r is not True)
    assert await store.create_job(_script("b1", "bob"), pending_limit=2)  # per owner
    done = (await store.list_jobs(owner="alice"))[0]
    await store.update_job(done.id, state="succeeded")  # an ended job frees its place
    assert await store.create_job(_script("s9", "alice", "awaiting_approval"), pending_limit=2)
    store.audit_soon("someone", "researcher", "rpc", "allowed", {"n": 1})
    with pytest.raises(Overloaded):
        await store.create_job(_script("s10", "alice"), pending_limit=2)
    rows = await store.audit_rows()  # flushes: the queued entry survived the rollback
    assert [r.actor for r in rows if r.action == "rpc"] == ["someone"]
    assert (await store.verify_audit()).ok
