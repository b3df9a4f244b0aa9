"""The store file: schema and migrations, indexes, integrity, backup."""

from __future__ import annotations

from pathlib import Path

import pytest

from stimnet.errors import StimnetError
from stimnetd.store import Store, StoreCorrupt
from stimnetd.store.audit import AuditVerification
from stimnetd.store.schema import MIGRATIONS
from tests.store.contract import ALICE, SQLITE_IMPLEMENTATIONS, StoreFactory, write_first_schema


@pytest.fixture(params=SQLITE_IMPLEMENTATIONS, ids=lambda f: f.name)
def factory(request: pytest.FixtureRequest) -> StoreFactory:
    """SQLite only: the file's schema, WAL mode, pages and backup."""
    return request.param  # type: ignore[no-any-return]


async def test_schema_is_migrated_and_wal(store: Store) -> None:
    """A new store is at the latest schema version, in WAL mode, and private (0600)."""
    (version,) = list(await store.db.execute_fetchall("PRAGMA user_version"))[0]
    (mode,) = list(await store.db.execute_fetchall("PRAGMA journal_mode"))[0]
    assert (version, mode) == (len(MIGRATIONS), "wal")
    assert store.path.stat().st_mode & 0o777 == 0o600


async def test_nonce_pruning_uses_an_index(store: Store) -> None:
    """Every nonce insert prunes expired nonces: by index, not a scan of the whole table
    (which grows with every request in the freshness window)."""
    plan = await store.db.execute_fetchall(
        "EXPLAIN QUERY PLAN DELETE FROM nonces WHERE seen_at < ?", (0.0,))
    details = " ".join(row[-1] for row in plan)
    assert "USING INDEX nonces_seen" in details, details


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
    conn = write_first_schema(path)
    conn.execute("INSERT INTO nonces (nonce, signer, seen_at) VALUES ('old', 'alice', 1.0)")
    for i, state in enumerate(("succeeded", "succeeded", "failed")):
        conn.execute("INSERT INTO jobs (id, kind, scope, catalog, owner, state, detail, "
                     "created_at, updated_at, request_id, origin, payload, signature, "
                     "signer_cert) VALUES (?, 'query', 'local', 'c', 'alice', ?, '', 1, 1, "
                     "'r', 'client', x'', x'', x'')", (f"j{i}", state))
    conn.close()
    s = Store(path, clock=lambda: 2.0)
    await s.open()
    try:
        (version,) = list(await s.db.execute_fetchall("PRAGMA user_version"))[0]
        assert (version, s.nonce_seen("old")) == (len(MIGRATIONS), True)
        assert await s.count_jobs_by_state() == {"succeeded": 2, "failed": 1}
    finally:
        await s.close()


async def test_a_store_from_a_newer_stimnetd_is_refused(factory: StoreFactory,
                                                        tmp_path: Path) -> None:
    """A file at a schema version this stimnetd does not know is refused, opened or checked."""
    path = tmp_path / "node.sqlite3"
    s = await factory.open(path)
    await s.db.execute(f"PRAGMA user_version = {len(MIGRATIONS) + 1}")
    await s.close()
    words = f"has schema version {len(MIGRATIONS) + 1}, newer than this stimnetd understands"
    with pytest.raises(StoreCorrupt, match=words):
        await Store(path).open()
    with pytest.raises(StoreCorrupt, match=words):
        Store.check_file(path)


async def test_corrupt_store_is_refused(tmp_path: Path) -> None:
    """A store file that is not a database is refused with a message saying to restore it."""
    p = tmp_path / "bad.sqlite3"
    p.write_bytes(b"SQLite format 3\x00" + b"\xff" * 4000)
    with pytest.raises(StoreCorrupt, match="restore it from a backup"):
        await Store(p).open()
    with pytest.raises(StoreCorrupt, match="restore it from a backup"):
        Store.check_file(p)


async def test_integrity_check_of_a_healthy_store(store: Store) -> None:
    """A store that was just written passes SQLite's full integrity check."""
    await store.audit(*ALICE, "A", "allowed")
    assert await store.integrity_check() == ["ok"]
    Store.check_file(store.path)  # raises if not


async def test_backup_is_a_consistent_copy(store: Store, tmp_path: Path) -> None:
    """backup() writes a copy whose audit chain verifies; it never overwrites a file."""
    await store.audit(*ALICE, "A", "allowed")
    store.audit_soon(*ALICE, "B", "allowed")  # queued: the backup commits it first
    dest = tmp_path / "backup.sqlite3"
    await store.backup(dest)
    copy = Store(dest)
    await copy.open()
    try:
        assert await copy.verify_audit() == AuditVerification(True, 2)
    finally:
        await copy.close()
    assert dest.stat().st_mode & 0o777 == 0o600
    with pytest.raises(StimnetError, match="already exists"):
        await store.backup(dest)


async def test_the_installation_id_is_made_once_and_kept(factory: StoreFactory,
                                                         tmp_path: Path) -> None:
    """A store's installation id is random per store and survives reopening."""
    a = await factory.open(tmp_path / "a.sqlite3")
    b = await factory.open(tmp_path / "b.sqlite3")
    try:
        first = await a.installation_id()
        assert len(first) == 16 and await a.installation_id() == first
        assert await b.installation_id() != first
    finally:
        await a.close()
        await b.close()
    again = await factory.open(tmp_path / "a.sqlite3")
    try:
        assert await again.installation_id() == first
    finally:
        await again.close()
