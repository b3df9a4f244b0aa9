"""The PostgreSQL store's jobs: the `Store` job verbs, and the queue replicas share
(`claim_queued` with a lease, `renew_lease`, `recover_expired`)."""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any

import asyncpg

from stimnet.errors import Conflict, Overloaded, StimnetError
from stimnet.states import MAX_REQUEUES
from stimnetd.store.db import compacted
from stimnetd.store.jobs import PENDING_SCRIPTS
from stimnetd.store.pg_base import JOB_COLUMNS, PgBase
from stimnetd.store.pg_sync import translate
from stimnetd.store.records import TERMINAL_STATES, JobRecord, NonceClaim

_INSERT = (f"INSERT INTO jobs ({JOB_COLUMNS}) VALUES ($1,$2,$3,$4,$5,$6,$7,$8,$9,$10,"
           "$11,$12,$13,$14,$15,$16,$17,$18,$19,$20)")


def _record(row: asyncpg.Record | None) -> JobRecord | None:
    return JobRecord.from_row(tuple(row)) if row is not None else None


class PgJobs(PgBase):
    async def create_job(self, job: JobRecord, *, audit: tuple[str, str, str] | None = None,
                         nonce: tuple[str, float] | None = None, durable: bool = True,
                         pending_limit: int | None = None, defer: bool = False) -> bool:
        """`Store.create_job`: the job and its audit entry, refusing a replayed `nonce` in
        the same transaction (False), and Overloaded past `pending_limit`. `defer` and
        `durable=False` both commit without waiting for the server's flush."""
        now = self._clock()
        async with self.chained(durable=durable and not defer) as conn:
            if pending_limit is not None:
                pending = await conn.fetchval(translate(PENDING_SCRIPTS), job.owner)
                if pending >= pending_limit:
                    raise Overloaded(
                        f"you have {pending} script jobs queued, running or awaiting approval "
                        f"at this site, its limit (max_pending_per_researcher = "
                        f"{pending_limit}); wait for some to finish or cancel them")
            if nonce is not None and not await self._insert_nonce(
                    conn, NonceClaim(nonce[0], job.owner, nonce[1]), now):
                return False
            try:
                await conn.execute(
                    _INSERT, job.id, job.kind, job.scope, job.catalog, job.owner, job.state,
                    job.detail, job.created_at, job.updated_at, job.request_id, job.origin,
                    job.payload, job.signature, job.signer_cert, job.script, job.script_sha256,
                    json.dumps(job.sites), job.result, job.attempts, job.requeues)
            except asyncpg.UniqueViolationError:
                raise Conflict(f"a job with id {job.id} exists") from None
            if audit is not None:
                actor, role, action = audit
                await self._append(conn, actor, role, action, "accepted",
                                   {"job": job.id, "catalog": job.catalog, "kind": job.kind,
                                    "scope": job.scope, "request_id": job.request_id})
        self._nonce_committed(nonce, now)
        return True

    async def get_job(self, job_id: str) -> JobRecord | None:
        return _record(await self.pool.fetchrow(f"SELECT {JOB_COLUMNS} FROM jobs WHERE id = $1",
                                                job_id))

    async def update_job(self, job_id: str, *, state: str | None = None, detail: str | None = None,
                         sites: list[dict[str, Any]] | None = None, result: bytes | None = None,
                         bump_attempts: bool = False, bump_requeues: bool = False,
                         durable: bool = True, defer: bool = False) -> JobRecord:
        record = await self.update_job_if(job_id, None, state=state, detail=detail, sites=sites,
                                          result=result, bump_attempts=bump_attempts,
                                          bump_requeues=bump_requeues, durable=durable,
                                          defer=defer)
        if record is None:
            raise StimnetError(f"job {job_id} vanished")
        return record

    async def update_job_if(self, job_id: str, expect_state: str | None, *,
                            state: str | None = None, detail: str | None = None,
                            sites: list[dict[str, Any]] | None = None,
                            result: bytes | None = None, bump_attempts: bool = False,
                            bump_requeues: bool = False, durable: bool = True,
                            defer: bool = False) -> JobRecord | None:
        """`Store.update_job_if`: changed only if in `expect_state`, in one statement. A job
        leaving `running` also leaves its replica's lease."""
        sets, args = ["updated_at = $1"], list[Any]([self._clock()])
        stored = await compacted(result)
        for col, val in (("state", state), ("detail", detail), ("result", stored),
                         ("sites_json", None if sites is None else json.dumps(sites))):
            if val is not None:
                args.append(val)
                sets.append(f"{col} = ${len(args)}")
        if state is not None and state != "running":
            sets.append("claimed_by = NULL, lease_until = NULL")
        if bump_attempts:
            sets.append("attempts = attempts + 1")
        if bump_requeues:
            sets.append("requeues = requeues + 1")
        args.append(job_id)
        where = f"id = ${len(args)}"
        if expect_state is not None:
            args.append(expect_state)
            where += f" AND state = ${len(args)}"
        async with self.pool.acquire() as conn, conn.transaction():
            if not durable or defer:
                await conn.execute("SET LOCAL synchronous_commit = off")
            row = await conn.fetchrow(
                f"UPDATE jobs SET {', '.join(sets)} WHERE {where} RETURNING {JOB_COLUMNS}",
                *args)
        return _record(row)

    async def list_jobs(self, *, owner: str | None = None, states: Iterable[str] | None = None,
                        limit: int = 100) -> list[JobRecord]:
        """Newest first (indexes jobs_owner_created / jobs_created)."""
        where, args = [], list[Any]()
        if owner is not None:
            args.append(owner)
            where.append(f"owner = ${len(args)}")
        if states is not None:
            args.append(list(states))
            where.append(f"state = ANY(${len(args)}::text[])")
        clause = f"WHERE {' AND '.join(where)}" if where else ""
        args.append(limit)
        rows = await self.pool.fetch(f"SELECT {JOB_COLUMNS} FROM jobs {clause}"
                                     f" ORDER BY created_at DESC LIMIT ${len(args)}", *args)
        return [JobRecord.from_row(tuple(r)) for r in rows]

    async def prune_jobs(self, finished_before: float, *, batch: int = 1000) -> int:
        """`Store.prune_jobs`: finished jobs last changed before `finished_before`, in
        batches; releases made before it drop their partials (their job is gone)."""
        while int((await self.pool.execute(
                "UPDATE releases SET partials = NULL WHERE job_id IN (SELECT job_id FROM"
                " releases WHERE at < $1 AND partials IS NOT NULL LIMIT $2)",
                finished_before, batch)).rsplit(" ", 1)[-1]) >= batch:
            pass
        total = 0
        states = sorted(TERMINAL_STATES)
        while True:
            status = await self.pool.execute(
                "DELETE FROM jobs WHERE id IN (SELECT id FROM jobs WHERE updated_at < $1"
                " AND state = ANY($2::text[]) LIMIT $3)", finished_before, states, batch)
            deleted = int(status.rsplit(" ", 1)[-1])
            total += deleted
            if deleted < batch:
                return total

    async def count_jobs_by_state(self) -> dict[str, int]:
        # Counted, not kept by triggers as in SQLite: one counts row per state would be a
        # hot row every replica's transitions lock. Retention bounds the table.
        rows = await self.pool.fetch("SELECT state, count(*) FROM jobs GROUP BY state")
        return {str(s): int(n) for s, n in rows}

    # -- the queue replicas share ------------------------------------------------------

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
        return _record(row)

    async def claim_job(self, job_id: str, replica: str, lease_s: float,
                        detail: str = "") -> JobRecord | None:
        """Job `job_id`, if still queued, now running under `replica`'s lease; None if
        another replica took it (or it left the queue)."""
        now = self._clock()
        row = await self.pool.fetchrow(
            # A re-queued job's run counts an attempt: it is resumed, so each site returns
            # the release it already made (as recovery marks it on SQLite).
            "UPDATE jobs SET state = 'running', detail = $5, claimed_by = $1,"
            " lease_until = $2, updated_at = $3,"
            " attempts = attempts + CASE WHEN requeues > 0 THEN 1 ELSE 0 END"
            " WHERE id = $4 AND state = 'queued'"
            f" RETURNING {JOB_COLUMNS}", replica, now + lease_s, now, job_id, detail)
        return _record(row)

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
        async with self.chained() as conn:
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
