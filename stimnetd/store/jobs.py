"""The jobs table: each job's row as the job service moves it through its states, and the
per-state counts the metrics read (kept by triggers, schema v2)."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from typing import Any

import aiosqlite

from stimnet.errors import Overloaded
from stimnetd.store import nonces
from stimnetd.store.records import TERMINAL_STATES, JobRecord, NonceClaim
from stimnetd.store.transaction import Transaction

SELECT = f"SELECT {JobRecord.COLUMNS} FROM jobs"
# Script jobs that hold a place in a researcher's queue (and their script in the store).
PENDING_SCRIPTS = ("SELECT count(*) FROM jobs WHERE owner = ? AND kind = 'script' AND state IN"
                   " ('queued', 'running', 'awaiting_approval')")
INSERT = ("INSERT INTO jobs (id, kind, scope, catalog, owner, state, detail, created_at,"
          " updated_at, request_id, origin, payload, signature, signer_cert, script,"
          " script_sha256, sites_json) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)")


def insert(job: JobRecord, audit: tuple[str, str, str] | None, nonce: tuple[str, float] | None,
           pending_limit: int | None, now: float) -> Callable[[Transaction], bool]:
    """Insert `job` (see Store.create_job); the transaction returns False on a replay."""

    def tx(t: Transaction) -> bool:
        if pending_limit is not None:
            (pending,) = t.conn.execute(PENDING_SCRIPTS, (job.owner,)).fetchone()
            if pending >= pending_limit:
                raise Overloaded(
                    f"you have {pending} script jobs queued, running or awaiting approval "
                    f"at this site, its limit (max_pending_per_researcher = "
                    f"{pending_limit}); wait for some to finish or cancel them")
        if nonce is not None and not nonces.insert(t, NonceClaim(nonce[0], job.owner, nonce[1]),
                                                   now):
            return False
        t.conn.execute(INSERT, (
            job.id, job.kind, job.scope, job.catalog, job.owner, job.state, job.detail,
            job.created_at, job.updated_at, job.request_id, job.origin, job.payload,
            job.signature, job.signer_cert, job.script, job.script_sha256, json.dumps(job.sites)))
        if audit is not None:
            actor, role, action = audit
            t.append(actor, role, action, "accepted",
                     {"job": job.id, "catalog": job.catalog, "kind": job.kind,
                      "scope": job.scope, "request_id": job.request_id})
        return True

    return tx


def update(job_id: str, expect_state: str | None, changes: dict[str, Any], bump_attempts: bool,
           now: float, *, bump_requeues: bool = False) -> Callable[[Transaction], Any]:
    """Set `changes` (columns state, detail, result as stored (blobs.compact), sites) on the
    job if it is in `expect_state` (any state if None), in one statement, counting one more
    attempt or requeue if asked; the transaction returns the changed row, or None."""
    sets, args = ["updated_at = ?"], list[Any]([now])
    for col, val in changes.items():
        sets.append("sites_json = ?" if col == "sites" else f"{col} = ?")
        args.append(json.dumps(val) if col == "sites" else val)
    if bump_attempts:
        sets.append("attempts = attempts + 1")
    if bump_requeues:
        sets.append("requeues = requeues + 1")
    where, keys = "id = ?", [job_id]
    if expect_state is not None:
        where, keys = "id = ? AND state = ?", [job_id, expect_state]

    def tx(t: Transaction) -> Any:
        changed = t.conn.execute(f"UPDATE jobs SET {', '.join(sets)} WHERE {where}",
                                 (*args, *keys)).rowcount
        if not changed:
            return None
        return t.conn.execute(SELECT + " WHERE id = ?", (job_id,)).fetchone()

    return tx


def prune(finished_before: float, batch: int) -> Callable[[Transaction], int]:
    """Delete up to `batch` finished jobs last changed before `finished_before`; how many."""
    states = sorted(TERMINAL_STATES)

    def tx(t: Transaction) -> int:
        return t.conn.execute(
            "DELETE FROM jobs WHERE rowid IN (SELECT rowid FROM jobs WHERE updated_at < ?"
            f" AND state IN ({','.join('?' * len(states))}) LIMIT ?)",
            (finished_before, *states, batch)).rowcount

    return tx


async def get(db: aiosqlite.Connection, job_id: str) -> JobRecord | None:
    rows = list(await db.execute_fetchall(SELECT + " WHERE id = ?", (job_id,)))
    return JobRecord.from_row(rows[0]) if rows else None


async def listed(db: aiosqlite.Connection, owner: str | None, states: Iterable[str] | None,
                 limit: int) -> list[JobRecord]:
    """Newest first; read through the indexes jobs_owner_created / jobs_created."""
    where, args = [], []
    if owner is not None:
        where.append("owner = ?")
        args.append(owner)
    if states is not None:
        states = list(states)
        where.append(f"state IN ({','.join('?' * len(states))})")
        args.extend(states)
    clause = f"WHERE {' AND '.join(where)}" if where else ""
    rows = await db.execute_fetchall(f"{SELECT} {clause} ORDER BY created_at DESC LIMIT ?",
                                     (*args, limit))
    return [JobRecord.from_row(r) for r in rows]


async def counts_by_state(db: aiosqlite.Connection) -> dict[str, int]:
    rows = await db.execute_fetchall("SELECT state, n FROM job_counts WHERE n > 0")
    return {s: int(n) for s, n in rows}
