"""What every part of the PostgreSQL store shares: the pool, the clock, and the one audit
chain (pg.py has the overview).

Every write that appends to the chain first takes one transaction-scoped advisory lock
(`CHAIN_LOCK`), then reads at READ COMMITTED: holding the lock, a statement sees every
transaction that held it before, so the chain has one head across replicas.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import asyncpg

from stimnet.errors import StimnetError
from stimnetd.store.audit import GENESIS, AuditRow, AuditVerification, chain_hash, verify_rows
from stimnetd.store.groupcommit import GROUP_COMMIT_S
from stimnetd.store.records import JobRecord, NonceClaim
from stimnetd.store.transaction import AuditEntry

# Any constant will do; it names "the audit chain's head" to pg_advisory_xact_lock.
CHAIN_LOCK = 0x5354_494D_4E45_5401
MIGRATION_LOCK = 0x5354_494D_4E45_5402
MEMBERS_LOCK = 0x5354_494D_4E45_5403
JOB_COLUMNS = JobRecord.COLUMNS
AUDIT_COLUMNS = "seq, at, actor, role, action, decision, detail_json, prev_hash, hash"


class PgStoreError(StimnetError):
    code = "INTERNAL"


class PgBase:
    """The pool, the clock and the audit chain of a PostgreSQL store."""

    def __init__(self, url: str, *, clock: Callable[[], float] = time.time,
                 group_commit_s: float = GROUP_COMMIT_S) -> None:
        self.url = url
        self._clock = clock
        self._pool: asyncpg.Pool | None = None
        self._group_commit_s = group_commit_s
        self._soon: list[AuditEntry] = []
        self._soon_task: asyncio.Task[None] | None = None

    @property
    def pool(self) -> asyncpg.Pool:
        if self._pool is None:
            raise RuntimeError("store is not open")
        return self._pool

    @contextlib.asynccontextmanager
    async def chained(self, *, durable: bool = True) -> AsyncIterator[asyncpg.Connection]:
        """A transaction holding CHAIN_LOCK. Not `durable`: its commit does not wait for
        the server's WAL flush (bookkeeping rows, as the SQLite store's non-durable writes;
        a crash of the server can lose it, never reorder or corrupt it)."""
        riding: list[AuditEntry] = []
        try:
            async with self.pool.acquire() as conn, conn.transaction():
                if not durable:
                    await conn.execute("SET LOCAL synchronous_commit = off")
                await conn.execute("SELECT pg_advisory_xact_lock($1)", CHAIN_LOCK)
                riding, self._soon = self._soon, []
                for entry in riding:
                    await self._append(conn, *entry)
                yield conn
        except BaseException:
            self._soon[:0] = riding  # rolled back with it: they ride in the next one
            raise

    async def _append(self, conn: asyncpg.Connection, actor: str, role: str, action: str,
                      decision: str, detail: dict[str, Any]) -> int:
        """Chain one entry; the caller holds CHAIN_LOCK in this transaction."""
        head = await conn.fetchrow("SELECT seq, hash FROM audit ORDER BY seq DESC LIMIT 1")
        seq, prev = (head["seq"] + 1, head["hash"]) if head else (1, GENESIS)
        at = self._clock()
        detail_json = json.dumps(detail, sort_keys=True, separators=(",", ":"), default=str)
        h = chain_hash(prev, seq, at, actor, role, action, decision, detail_json)
        await conn.execute(f"INSERT INTO audit ({AUDIT_COLUMNS}) VALUES "
                           "($1,$2,$3,$4,$5,$6,$7,$8,$9)",
                           seq, at, actor, role, action, decision, detail_json, prev, h)
        return int(seq)

    async def audit(self, actor: str, role: str, action: str, decision: str,
                    detail: dict[str, Any] | None = None) -> int:
        """Append one entry to the site's one chain, durably; its sequence number."""
        async with self.chained() as conn:
            return await self._append(conn, actor, role, action, decision, detail or {})

    def audit_soon(self, actor: str, role: str, action: str, decision: str,
                   detail: dict[str, Any] | None = None) -> None:
        """Queue an entry for a transaction a few ms later (allowed read-only RPCs, as in
        the SQLite store); the next chained transaction or `flush` commits it."""
        self._soon.append((actor, role, action, decision, detail or {}))
        if self._soon_task is None or self._soon_task.done():
            self._soon_task = asyncio.get_running_loop().create_task(self._commit_soon())

    async def _commit_soon(self) -> None:
        await asyncio.sleep(self._group_commit_s)
        await self.flush()

    async def flush(self) -> None:
        """Commit the queued entries now."""
        if self._soon:
            async with self.chained(durable=False):
                pass

    async def audit_rows(self, since: float = 0.0) -> list[AuditRow]:
        await self.flush()
        rows = await self.pool.fetch(f"SELECT {AUDIT_COLUMNS} FROM audit WHERE at >= $1 "
                                     "ORDER BY seq", since)
        return [AuditRow(*r) for r in rows]

    async def verify_audit(self) -> AuditVerification:
        return verify_rows(await self.audit_rows())

    # The nonce table and its mirror are pg_node.PgNode's; jobs and releases insert nonces.
    async def _insert_nonce(self, conn: asyncpg.Connection, claim: NonceClaim,
                            now: float) -> bool:
        raise NotImplementedError

    def _nonce_committed(self, nonce: tuple[str, float] | None, now: float) -> None:
        raise NotImplementedError

    def _nonce_claimed(self, claim: NonceClaim, now: float) -> None:
        raise NotImplementedError

    async def first_hash(self) -> str | None:
        """The chain's first entry's hash: the store's identity (store/identity.py)."""
        got = await self.pool.fetchval("SELECT hash FROM audit WHERE seq = 1")
        return None if got is None else str(got)
