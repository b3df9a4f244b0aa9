"""The PostgreSQL store, for a site that runs several `stimnetd` replicas on one database.

`PgStore` has the `Store` verbs the replicas must agree on, under the same names and with
the same meaning, so the store contract suite runs one test body against both
(tests/store_pg): the privacy ledger's `release` / `spent`, the audit chain's `audit` /
`audit_rows` / `verify_audit`, jobs' `create_job` / `get_job` / `update_job_if`, nonces' `claim_nonce` /
`remember_nonce`, and the
site's `site_secret` / `approve_script` / `is_script_approved`. What
only replicas need is added: `claim_queued` (a queued job goes to exactly one replica,
``FOR UPDATE SKIP LOCKED``), `renew_lease`, and `recover_expired` (a job whose replica
stopped renewing is re-queued or marked interrupted, per `[scripts] on_restart`).

Serialisation: every write that appends to the audit chain, which includes every release
and so every budget charge, first takes one transaction-scoped advisory lock, then reads
at READ COMMITTED. Holding the lock, a statement sees every transaction that held it
before, so the chain has one head and a charge sees every earlier charge: two replicas
cannot both spend the last of a budget. (Under SERIALIZABLE the snapshot would predate
the lock's wait, and the same outcome would come from aborts and retries instead.) The
cost is that a site's releases commit one at a time, as they do in the SQLite store's
single writer.

Not here (the SQLite store has them; a replica needs them before `[store] url` can
point a daemon at PostgreSQL): the overlap guard's cohort tables and exact auditing's
history, gossip members, job listing and pruning, backups. A `decide` rule that asks for
near cohorts gets an error saying so, never an empty answer.
"""

from __future__ import annotations

import json
import secrets
import time
from collections.abc import Callable
from typing import Any

import asyncpg

from stimnet.errors import Conflict, Replayed, StimnetError
from stimnet.states import MAX_REQUEUES
from stimnetd.store.audit import GENESIS as GENESIS
from stimnetd.store.audit import AuditRow, AuditVerification, chain_hash, verify_rows
from stimnetd.store.node import SECRET_BYTES
from stimnetd.store.pg_schema import PG_MIGRATIONS
from stimnetd.store.records import (
    Disclosed,
    JobRecord,
    NonceClaim,
    Release,
    ReleaseRule,
    cohort_digest,
)
from stimnetd.store.releases import REPLAYED
from stimnetd.store.transaction import AuditEntry

# Any constant will do; it names "the audit chain's head" to pg_advisory_xact_lock.
CHAIN_LOCK = 0x5354_494D_4E45_5401
MIGRATION_LOCK = 0x5354_494D_4E45_5402
JOB_COLUMNS = JobRecord.COLUMNS
AUDIT_COLUMNS = "seq, at, actor, role, action, decision, detail_json, prev_hash, hash"


class PgStoreError(StimnetError):
    code = "INTERNAL"


class _PreReadLedger:
    """The `LedgerView` a rule sees in a PostgreSQL release: what was spent, read after
    taking the chain lock."""

    def __init__(self, spent: float, spent_delta: float, catalog_spent: float = 0.0) -> None:
        self._spent = spent
        self._spent_delta = spent_delta
        self._catalog_spent = catalog_spent

    def catalog_spent(self) -> float:
        return self._catalog_spent

    def spent(self) -> float:
        return self._spent

    def spent_delta(self) -> float:
        return self._spent_delta

    def near_cohorts(self, members: frozenset[str], digest: str,
                     window: int) -> list[frozenset[str]]:
        raise PgStoreError("the overlap guard is not available on the PostgreSQL store yet; "
                           "set [privacy] overlap_guard = false or use the SQLite store")

    def near_families(self, atoms: Disclosed, window: int) -> list[list[frozenset[str]]]:
        return self.near_cohorts(frozenset(), "", window)  # type: ignore[return-value]

    def linear_history(self, quantity: str) -> list[tuple[frozenset[str], str, str]]:
        return self.near_cohorts(frozenset(), "", 0)  # type: ignore[return-value]

    def linear_known(self, quantity: str, digests: list[str]) -> bool:
        self.near_cohorts(frozenset(), "", 0)
        return False


class PgStore:
    """Shared durable state of one site's replicas, in PostgreSQL (asyncpg pool)."""

    def __init__(self, url: str, *, clock: Callable[[], float] = time.time,
                 pool_size: int = 10, command_timeout_s: float = 30.0) -> None:
        self.url = url
        self._clock = clock
        self._pool_size = pool_size
        self._timeout = command_timeout_s
        self._pool: asyncpg.Pool | None = None

    async def open(self) -> None:
        """Connect and bring the schema up to date (one replica at a time)."""
        try:
            self._pool = await asyncpg.create_pool(self.url, min_size=1, max_size=self._pool_size,
                                                   command_timeout=self._timeout)
        except (OSError, asyncpg.PostgresError) as exc:
            raise PgStoreError(f"PostgreSQL store cannot be reached: {type(exc).__name__}: "
                               f"{exc}") from None
        async with self.pool.acquire() as conn:
            await conn.execute("SELECT pg_advisory_lock($1)", MIGRATION_LOCK)
            try:
                await _migrate(conn)
            finally:
                await conn.execute("SELECT pg_advisory_unlock($1)", MIGRATION_LOCK)

    async def close(self) -> None:
        pool, self._pool = self._pool, None
        if pool is not None:
            await pool.close()

    @property
    def pool(self) -> asyncpg.Pool:
        if self._pool is None:
            raise RuntimeError("store is not open")
        return self._pool

    # -- audit chain -----------------------------------------------------------------

    async def audit(self, actor: str, role: str, action: str, decision: str,
                    detail: dict[str, Any]) -> int:
        """Append one entry to the site's one chain; its sequence number."""
        async with self.pool.acquire() as conn, conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock($1)", CHAIN_LOCK)
            return await self._append(conn, actor, role, action, decision, detail)

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

    async def audit_rows(self, since: float = 0.0) -> list[AuditRow]:
        rows = await self.pool.fetch(f"SELECT {AUDIT_COLUMNS} FROM audit WHERE at >= $1 "
                                     "ORDER BY seq", since)
        return [AuditRow(*r) for r in rows]

    async def verify_audit(self) -> AuditVerification:
        return verify_rows(await self.audit_rows())

    # -- releases and the privacy ledger ---------------------------------------------

    async def spent_delta(self, researcher: str, catalog: str) -> float:
        value = await self.pool.fetchval(
            "SELECT COALESCE(SUM(delta), 0) FROM ledger WHERE researcher = $1 AND catalog = $2",
            researcher, catalog)
        return float(value)

    async def spent(self, researcher: str, catalog: str) -> float:
        value = await self.pool.fetchval(
            "SELECT COALESCE(SUM(epsilon), 0) FROM ledger WHERE researcher = $1 AND catalog = $2",
            researcher, catalog)
        return float(value)

    async def release(self, release: Release, *, decide: ReleaseRule,
                      audit_actor: tuple[str, str], nonce: NonceClaim | None = None) -> Release:
        """`Store.release`: record, charge and audit in one transaction unless `decide`
        refuses (the refusal's audit entry commits, then its error is raised); a job
        released before returns the stored release, charging nothing. With `nonce`, the
        request's nonce is remembered first in this transaction; a replay (on any replica)
        raises `Replayed` and nothing is released."""
        base = {"job": release.job_id, "catalog": release.catalog}
        async with self.pool.acquire() as conn:
            async with conn.transaction():
                await conn.execute("SELECT pg_advisory_xact_lock($1)", CHAIN_LOCK)
                if nonce is not None:
                    nonce.consumed = True
                    if not await self._insert_nonce(conn, nonce, self._clock()):
                        raise Replayed(REPLAYED)
                existing = await conn.fetchrow(
                    "SELECT job_id, researcher, catalog, decision, epsilon, cohort_digest,"
                    " partials, at FROM releases WHERE job_id = $1", release.job_id)
                if existing is not None:
                    return Release.from_row(tuple(existing))
                spent = await conn.fetchrow(
                    "SELECT COALESCE(SUM(epsilon), 0), COALESCE(SUM(delta), 0) FROM ledger"
                    " WHERE researcher = $1 AND catalog = $2", release.researcher,
                    release.catalog)
                catalog_spent = await conn.fetchval(
                    "SELECT COALESCE(SUM(epsilon), 0) FROM ledger WHERE catalog = $1",
                    release.catalog)
                refusal = decide(_PreReadLedger(float(spent[0]), float(spent[1]),
                                                float(catalog_spent)), release)
                if refusal is not None:
                    await self._append(conn, *audit_actor, "release", "refused",
                                       {**base, **refusal.audit_detail()})
                else:
                    await self._write_release(conn, release)
                    await self._append(conn, *audit_actor, "release", release.decision,
                                       {**base, "epsilon": release.epsilon,
                                        "delta": release.delta,
                                        "researcher": release.researcher,
                                        **release.audit_detail})
        if refusal is not None:
            raise refusal.error()
        return release

    @staticmethod
    async def _write_release(conn: asyncpg.Connection, release: Release) -> None:
        if release.epsilon:
            await conn.execute(
                "INSERT INTO ledger (researcher, catalog, job_id, epsilon, delta, at)"
                " VALUES ($1,$2,$3,$4,$5,$6)", release.researcher, release.catalog,
                release.job_id, release.epsilon, release.delta, release.at)
        await conn.execute(
            "INSERT INTO releases (job_id, researcher, catalog, decision, epsilon,"
            " cohort_digest, partials, at) VALUES ($1,$2,$3,$4,$5,$6,$7,$8)",
            release.job_id, release.researcher, release.catalog, release.decision,
            release.epsilon, release.cohort_key or cohort_digest(release.cohort),
            release.partials, release.at)

    # -- jobs --------------------------------------------------------------------------

    async def create_job(self, job: JobRecord, *,
                         audit: tuple[str, str, str] | None = None) -> bool:
        """Insert the job (and its audit entry). Conflict if the id is taken."""
        async with self.pool.acquire() as conn, conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock($1)", CHAIN_LOCK)
            try:
                await conn.execute(
                    f"INSERT INTO jobs ({JOB_COLUMNS}) VALUES ($1,$2,$3,$4,$5,$6,$7,$8,$9,$10,"
                    "$11,$12,$13,$14,$15,$16,$17,$18,$19,$20)",
                    job.id, job.kind, job.scope, job.catalog, job.owner, job.state, job.detail,
                    job.created_at, job.updated_at, job.request_id, job.origin, job.payload,
                    job.signature, job.signer_cert, job.script, job.script_sha256,
                    json.dumps(job.sites), job.result, job.attempts, job.requeues)
            except asyncpg.UniqueViolationError as exc:
                raise Conflict(str(exc)) from None
            if audit is not None:
                actor, role, action = audit
                await self._append(conn, actor, role, action, "accepted",
                                   {"job": job.id, "catalog": job.catalog, "kind": job.kind,
                                    "scope": job.scope, "request_id": job.request_id})
        return True

    async def get_job(self, job_id: str) -> JobRecord | None:
        row = await self.pool.fetchrow(f"SELECT {JOB_COLUMNS} FROM jobs WHERE id = $1", job_id)
        return JobRecord.from_row(tuple(row)) if row else None

    async def update_job_if(self, job_id: str, expect_state: str | None, *,
                            state: str | None = None, detail: str | None = None,
                            sites: list[dict[str, Any]] | None = None,
                            result: bytes | None = None,
                            bump_attempts: bool = False,
                            bump_requeues: bool = False) -> JobRecord | None:
        """`Store.update_job_if`: changed only if in `expect_state`, in one statement."""
        sets, args = ["updated_at = $1"], list[Any]([self._clock()])
        for col, val in (("state", state), ("detail", detail), ("result", result),
                         ("sites_json", None if sites is None else json.dumps(sites))):
            if val is not None:
                args.append(val)
                sets.append(f"{col} = ${len(args)}")
        if bump_attempts:
            sets.append("attempts = attempts + 1")
        if bump_requeues:
            sets.append("requeues = requeues + 1")
        args.append(job_id)
        where = f"id = ${len(args)}"
        if expect_state is not None:
            args.append(expect_state)
            where += f" AND state = ${len(args)}"
        row = await self.pool.fetchrow(
            f"UPDATE jobs SET {', '.join(sets)} WHERE {where} RETURNING {JOB_COLUMNS}", *args)
        return JobRecord.from_row(tuple(row)) if row else None

    # -- signed-request nonces ----------------------------------------------------------

    async def claim_nonce(self, claim: NonceClaim, audit: AuditEntry | None = None) -> bool:
        """`Store.claim_nonce`: remember `claim` (with its accepted entry, then `audit`);
        False on a replay, whichever replica saw the request first. Nonces older than twice
        the freshness window are pruned, as in the SQLite store."""
        async with self.pool.acquire() as conn, conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock($1)", CHAIN_LOCK)
            fresh = await self._insert_nonce(conn, claim, self._clock())
            if fresh and audit is not None:
                await self._append(conn, *audit)
        claim.consumed = True
        return fresh

    async def _insert_nonce(self, conn: asyncpg.Connection, claim: NonceClaim,
                            now: float) -> bool:
        """Remember `claim` (and append its accepted entry); False if it is a replay. The
        caller holds CHAIN_LOCK."""
        await conn.execute("DELETE FROM nonces WHERE seen_at < $1", now - 2 * claim.max_age_s)
        inserted = await conn.fetchval(
            "INSERT INTO nonces (nonce, signer, seen_at) VALUES ($1, $2, $3)"
            " ON CONFLICT (nonce) DO NOTHING RETURNING 1", claim.nonce, claim.signer, now)
        if inserted is not None and claim.accepted is not None:
            await self._append(conn, *claim.accepted)
        return inserted is not None

    async def remember_nonce(self, nonce: str, signer: str, max_age_s: float, *,
                             audit: AuditEntry | None = None) -> bool:
        return await self.claim_nonce(NonceClaim(nonce, signer, max_age_s, audit))

    async def nonce_seen_now(self, nonce: str) -> bool:
        """Whether any replica has remembered `nonce` (a database read: replicas share no
        memory, so the SQLite store's in-memory `nonce_seen` has no counterpart here)."""
        return bool(await self.pool.fetchval(
            "SELECT EXISTS (SELECT 1 FROM nonces WHERE nonce = $1)", nonce))

    # -- the site's own state ----------------------------------------------------------

    async def site_secret(self) -> bytes:
        """`Store.site_secret`: made on first use; replicas asking at once get one secret."""
        await self.pool.execute(
            "INSERT INTO meta (key, value) VALUES ('site_secret', $1) ON CONFLICT DO NOTHING",
            secrets.token_bytes(SECRET_BYTES))
        return bytes(await self.pool.fetchval("SELECT value FROM meta WHERE key = 'site_secret'"))

    async def installation_id(self) -> str:
        """`Store.installation_id`: made on first use; replicas share one."""
        await self.pool.execute(
            "INSERT INTO meta (key, value) VALUES ('installation_id', $1) ON CONFLICT DO NOTHING",
            secrets.token_hex(8).encode())
        got = await self.pool.fetchval("SELECT value FROM meta WHERE key = 'installation_id'")
        return bytes(got).decode()

    async def approve_script(self, sha256: str, by: str) -> None:
        await self.pool.execute(
            "INSERT INTO approvals (script_sha256, approved_by, at) VALUES ($1, $2, $3)"
            " ON CONFLICT (script_sha256) DO UPDATE SET approved_by = EXCLUDED.approved_by,"
            " at = EXCLUDED.at", sha256, by, self._clock())

    async def is_script_approved(self, sha256: str) -> bool:
        return bool(await self.pool.fetchval(
            "SELECT EXISTS (SELECT 1 FROM approvals WHERE script_sha256 = $1)", sha256))

    # -- replicas ----------------------------------------------------------------------

    async def claim_queued(self, replica: str, lease_s: float) -> JobRecord | None:
        """The oldest queued job, now running under `replica`'s lease; None if none is
        free. Replicas claiming at once each get a different job, or none."""
        now = self._clock()
        row = await self.pool.fetchrow(
            "UPDATE jobs SET state = 'running', claimed_by = $1, lease_until = $2,"
            " updated_at = $3, attempts = attempts + 1 WHERE id = ("
            " SELECT id FROM jobs WHERE state = 'queued' ORDER BY created_at"
            " LIMIT 1 FOR UPDATE SKIP LOCKED)"
            f" RETURNING {JOB_COLUMNS}", replica, now + lease_s, now)
        return JobRecord.from_row(tuple(row)) if row else None

    async def renew_lease(self, job_id: str, replica: str, lease_s: float) -> bool:
        """Extend `replica`'s hold on a running job; False if it is no longer its own."""
        status = await self.pool.execute(
            "UPDATE jobs SET lease_until = $1 WHERE id = $2 AND claimed_by = $3"
            " AND state = 'running'", self._clock() + lease_s, job_id, replica)
        return bool(status.endswith(" 1"))

    async def recover_expired(self, on_restart: str, *, by: str) -> list[str]:
        """Running jobs whose lease ran out (their replica stopped): re-queued
        (`on_restart = "requeue"`, each at most MAX_REQUEUES times) or interrupted, each
        audited; their ids."""
        if on_restart not in ("requeue", "interrupt"):
            raise ValueError(f"on_restart must be requeue or interrupt, not {on_restart!r}")
        # A job re-queued MAX_REQUEUES times already is interrupted: one that takes its
        # replica down would otherwise take each replica down in turn.
        cap = MAX_REQUEUES if on_restart == "requeue" else 0
        async with self.pool.acquire() as conn, conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock($1)", CHAIN_LOCK)
            rows = await conn.fetch(
                "UPDATE jobs SET"
                " state = CASE WHEN requeues < $1 THEN 'queued' ELSE 'interrupted' END,"
                " detail = CASE WHEN requeues < $1 THEN $2 WHEN requeues > 0 THEN $3 ELSE $4 END,"
                " requeues = requeues + CASE WHEN requeues < $1 THEN 1 ELSE 0 END,"
                " claimed_by = NULL, lease_until = NULL, updated_at = $5"
                " WHERE state = 'running' AND lease_until < $5 RETURNING id, state",
                cap, "re-queued: the replica running it stopped",
                "interrupted again: the replica running its re-run stopped too; not re-run "
                "again",
                "interrupted: the replica running it stopped", self._clock())
            for row in sorted(rows, key=lambda r: str(r["id"])):
                await self._append(conn, by, "node", "recover", row["state"], {"job": row["id"]})
        return sorted(str(r["id"]) for r in rows)


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
