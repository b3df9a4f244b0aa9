"""The PostgreSQL store, for a site that runs several `stimnetd` replicas on one database
(`[store] url`).

`PgStore` has the SQLite `Store`'s verbs under the same names and with the same meaning
(store/contract.py's `SiteStore`; tests/store runs one body against both), in parts:
pg_base.py (the pool and the one audit chain), pg_jobs.py (job rows, and the queue
replicas share: `claim_queued` / `claim_job` with a lease, `renew_lease`,
`recover_expired`), pg_releases.py (releases, the privacy ledger, refunds) and pg_node.py
(nonces, the site secret, approvals, gossip members). Schema migrations: pg_schema.py,
applied under an advisory lock so replicas starting together migrate once.

Serialisation: every write that appends to the audit chain, which includes every release
and so every budget charge, first takes one transaction-scoped advisory lock, then reads
at READ COMMITTED. Holding the lock, a statement sees every transaction that held it
before, so the chain has one head and a charge sees every earlier charge: two replicas
cannot both spend the last of a budget. (Under SERIALIZABLE the snapshot would predate
the lock's wait, and the same outcome would come from aborts and retries instead.) The
cost is that a site's releases commit one at a time, as they do in the SQLite store's
single writer.

What differs from SQLite: each replica keeps its own state directory (its lock, and the
store identity it last ran with), the database is the server's to back up (`backup` runs
`pg_dump`), and the state volume's free space is the server's business (`out_of_space`
is always False here; the local floor still applies to the state directory).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import subprocess
import time
import urllib.parse
from collections.abc import Callable
from pathlib import Path

import asyncpg

from stimnet.errors import StimnetError
from stimnetd.config.store import redact
from stimnetd.store import identity
from stimnetd.store.db import StoreCorrupt
from stimnetd.store.groupcommit import GROUP_COMMIT_S
from stimnetd.store.identity import FORCE, StoreReplaced
from stimnetd.store.lock import StateDirLock
from stimnetd.store.nonces import NonceMirror
from stimnetd.store.pg_base import MIGRATION_LOCK, PgStoreError
from stimnetd.store.pg_jobs import PgJobs
from stimnetd.store.pg_node import PgNode
from stimnetd.store.pg_releases import PgReleases
from stimnetd.store.pg_schema import PG_MIGRATIONS

__all__ = ["PgStore", "PgStoreError"]

# The anchor whose directory holds the identity file (identity.py reads `path.parent`).
IDENTITY_ANCHOR = "postgresql-store"


class PgStore(PgNode, PgReleases, PgJobs):
    """Shared durable state of one site's replicas, in PostgreSQL (asyncpg pool).

    Args:
        url: postgresql://user[:password]@host[:port]/database
        state_dir: this replica's own directory (its lock and store identity); None for
            a store opened without them (tests, tools).
    """

    def __init__(self, url: str, *, state_dir: Path | None = None,
                 clock: Callable[[], float] = time.time, pool_size: int = 10,
                 command_timeout_s: float = 30.0,
                 group_commit_s: float = GROUP_COMMIT_S) -> None:
        super().__init__(url, clock=clock, group_commit_s=group_commit_s)
        self.state_dir = state_dir
        self._pool_size = pool_size
        self._timeout = command_timeout_s
        self._nonces = NonceMirror()
        self._dir_lock = StateDirLock(state_dir) if state_dir is not None else None
        self.out_of_space = False

    @property
    def where(self) -> str:
        """The store as an operator would name it (no password)."""
        return f"PostgreSQL store {redact(self.url)}"

    async def open(self, *, integrity_check: bool = True, lock_dir: bool = False,
                   check_identity: bool = False) -> None:
        """Connect and bring the schema up to date (one replica at a time). `lock_dir`:
        hold this replica's state directory first. `check_identity`: refuse a database
        that is not the one this replica ran on before, and re-verify the audit chain.
        (`integrity_check` is the server's business here: accepted and ignored.)"""
        if lock_dir and self._dir_lock is not None:
            self.state_dir.mkdir(parents=True, exist_ok=True)  # type: ignore[union-attr]
            self._dir_lock.acquire()
        try:
            await self._connect()
            if check_identity:
                await self._check_identity()
            await self._load_nonces()
        except BaseException:
            await self.close()
            raise

    async def _connect(self) -> None:
        try:
            self._pool = await asyncpg.create_pool(self.url, min_size=1, max_size=self._pool_size,
                                                   command_timeout=self._timeout)
        except (OSError, asyncpg.PostgresError, ValueError) as exc:
            message = str(exc).replace(self.url, redact(self.url))
            raise PgStoreError(f"{self.where} cannot be reached: {type(exc).__name__}: "
                               f"{message}") from None
        async with self.pool.acquire() as conn:
            await conn.execute("SELECT pg_advisory_lock($1)", MIGRATION_LOCK)
            try:
                await _migrate(conn)
            finally:
                await conn.execute("SELECT pg_advisory_unlock($1)", MIGRATION_LOCK)

    def _anchor(self) -> Path | None:
        return None if self.state_dir is None else self.state_dir / IDENTITY_ANCHOR

    async def _check_identity(self) -> None:
        """The database's first audit entry is the one this replica knows, and its chain
        verifies (as the SQLite store checks its file)."""
        anchor = self._anchor()
        expected = identity.read(anchor) if anchor is not None else None
        if expected is not None:
            actual = await self.first_hash()
            if actual is None:
                raise StoreReplaced(f"{self.where} has no audit entries, but this node has run "
                                    f"on one before (store identity {expected[:16]} in "
                                    f"{identity.identity_path(anchor)}); {FORCE}")  # type: ignore[arg-type]
            if actual != expected:
                raise StoreReplaced(f"{self.where} is not this node's store (its identity "
                                    f"{actual[:16]}, this node's {expected[:16]} in "
                                    f"{identity.identity_path(anchor)}); {FORCE}")  # type: ignore[arg-type]
        verdict = await self.verify_audit()
        if not verdict.ok:
            raise StoreCorrupt(f"{self.where} failed its audit-chain check at start "
                               f"({verdict.problem}); restore it from a backup before serving")

    async def keep_identity(self, *, replace: bool = False) -> None:
        """Write the store's identity (its first audit entry's hash) into this replica's
        state directory once that entry is committed; `replace`: over an earlier one."""
        anchor = self._anchor()
        if anchor is None or (identity.read(anchor) is not None and not replace):
            return
        await self.flush()
        store_id = await self.first_hash()
        if store_id is not None:
            identity.write(anchor, store_id)

    async def close(self) -> None:
        """Commit queued audit entries, then close (and let go of the directory);
        idempotent."""
        try:
            if self._soon_task is not None:
                self._soon_task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await self._soon_task
            if self._pool is not None:
                await self.flush()
        finally:
            pool, self._pool = self._pool, None
            try:
                if pool is not None:
                    await pool.close()
            finally:
                if self._dir_lock is not None:
                    self._dir_lock.release()

    async def backup(self, dest: Path) -> None:
        """A consistent copy with the server's `pg_dump` (custom format, for
        `pg_restore`): one snapshot of every table, the chain and the ledger agreeing."""
        if dest.exists():
            raise StimnetError(f"backup destination {dest} already exists; refusing to overwrite")
        pg_dump = shutil.which("pg_dump")
        if pg_dump is None:
            raise StimnetError("backing up a PostgreSQL store needs pg_dump on PATH "
                               "(Debian: apt-get install postgresql-client)")
        await self.flush()
        parts = urllib.parse.urlsplit(self.url)
        env = dict(os.environ)
        if parts.password is not None:  # not on the command line, where ps shows it
            env["PGPASSWORD"] = urllib.parse.unquote(parts.password)
            netloc = (parts.username or "") + "@" + (parts.hostname or "") + (
                f":{parts.port}" if parts.port else "")
            parts = parts._replace(netloc=netloc)
        proc = await asyncio.create_subprocess_exec(
            pg_dump, "--format=custom", f"--file={dest}", f"--dbname={parts.geturl()}",
            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        _, err = await proc.communicate()
        if proc.returncode != 0:
            with contextlib.suppress(FileNotFoundError):
                dest.unlink()
            raise StimnetError(f"pg_dump of {self.where} failed: "
                               f"{err.decode(errors='replace').strip()[:300]}")
        os.chmod(dest, 0o600)


async def _migrate(conn: asyncpg.Connection) -> None:
    await conn.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")
    version = await conn.fetchval("SELECT max(version) FROM schema_version") or 0
    if version > len(PG_MIGRATIONS):
        raise PgStoreError(f"the PostgreSQL store is at schema {version}, newer than this "
                           f"stimnetd knows ({len(PG_MIGRATIONS)}); upgrade stimnetd")
    for number, script in enumerate(PG_MIGRATIONS[version:], start=version + 1):
        async with conn.transaction():
            await conn.execute(script)
            await conn.execute("INSERT INTO schema_version (version) VALUES ($1)", number)
