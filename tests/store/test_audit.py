"""The audit chain: durable and group-committed entries, tamper evidence, cancellation."""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path

import pytest

from stimnetd.store import Store
from stimnetd.store.audit import AuditVerification
from tests.store.contract import ALICE, SQLITE_IMPLEMENTATIONS, StoreFactory


@pytest.fixture(params=SQLITE_IMPLEMENTATIONS, ids=lambda f: f.name)
def factory(request: pytest.FixtureRequest) -> StoreFactory:
    """SQLite only: tampering with the file (tests/store_pg covers PostgreSQL's)."""
    return request.param  # type: ignore[no-any-return]


async def test_audit_chain_verifies(store: Store) -> None:
    """Durable and group-committed entries form one chain that verifies."""
    assert await store.audit(*ALICE, "A", "allowed", {"x": 1}) == 1
    store.audit_soon("bob", "researcher", "B", "allowed")
    assert await store.audit("carol", "admin", "C", "denied") == 3
    rows = await store.audit_rows()
    assert [(r.seq, r.action) for r in rows] == [(1, "A"), (2, "B"), (3, "C")]
    assert await store.verify_audit() == AuditVerification(True, 3)


async def _tampered(factory: StoreFactory, path: Path, entries: int,
                    tamper: str | None = None) -> AuditVerification:
    s = await factory.open(path)
    for i in range(entries):
        await s.audit(*ALICE, f"act{i}", "denied", {"i": i})
    await s.close()
    if tamper is not None:
        with sqlite3.connect(path) as conn:
            conn.executescript(tamper)
    s2 = await factory.open(path)
    try:
        return await s2.verify_audit()
    finally:
        await s2.close()


@pytest.mark.parametrize("tamper, bad, problem", [
    ("UPDATE audit SET decision = 'allowed' WHERE seq = 2", 2,
     "entry 2 does not match its hash (it was edited)"),
    ("DELETE FROM audit WHERE seq = 2", 3,
     "entry 3 found where 2 was expected (entries missing or reordered)"),
    ("UPDATE audit SET seq = -1 WHERE seq = 2; UPDATE audit SET seq = 2 WHERE seq = 3;"
     " UPDATE audit SET seq = 3 WHERE seq = -1", 2,
     "entry 2 does not link to entry 1 (an earlier entry was deleted, edited or reordered)"),
])
async def test_audit_tampering_is_detected(factory: StoreFactory, tmp_path: Path, tamper: str,
                                           bad: int, problem: str) -> None:
    """Editing, deleting or reordering an audit row in a copy of the store is reported."""
    v = await _tampered(factory, tmp_path / "a.sqlite3", 4, tamper)
    assert v == AuditVerification(False, 3 if "DELETE" in tamper else 4, bad, problem)


async def test_reordering_whole_rows_is_detected(factory: StoreFactory, tmp_path: Path) -> None:
    """Swapping the content of two rows (keeping seq order) breaks the hash links."""
    path = tmp_path / "a.sqlite3"
    assert await _tampered(factory, path, 3) == AuditVerification(True, 3)
    with sqlite3.connect(path) as conn:
        cols = "at, actor, role, action, decision, detail_json, prev_hash, hash"
        r2 = conn.execute(f"SELECT {cols} FROM audit WHERE seq = 2").fetchone()
        r3 = conn.execute(f"SELECT {cols} FROM audit WHERE seq = 3").fetchone()
        sets = "at=?, actor=?, role=?, action=?, decision=?, detail_json=?, prev_hash=?, hash=?"
        conn.execute(f"UPDATE audit SET {sets} WHERE seq = 2", r3)
        conn.execute(f"UPDATE audit SET {sets} WHERE seq = 3", r2)
    v = await _tampered(factory, path, 0)
    assert (v.ok, v.entries, v.first_bad_seq) == (False, 3, 2)


async def test_cancelled_writer_does_not_desync_the_audit_chain(store: Store) -> None:
    """A caller cancelled while its transaction commits (a client hanging up) leaves the chain
    head in step with the file: later appends succeed and the chain verifies."""
    for _ in range(20):
        task = asyncio.create_task(store.audit(*ALICE, "A", "allowed"))
        await asyncio.sleep(0)  # let it reach the database thread
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await store.audit("bob", "researcher", "B", "denied")
    rows = await store.audit_rows()
    assert [r.action for r in rows if r.action != "A"] == ["B"] * 20
    assert [r.seq for r in rows] == list(range(1, len(rows) + 1))
    assert await store.verify_audit() == AuditVerification(True, len(rows))
