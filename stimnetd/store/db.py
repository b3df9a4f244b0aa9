"""The node's store: aiosqlite over one SQLite file in WAL mode.

Writes are serialised by one asyncio lock and run as `BEGIN IMMEDIATE` transactions, so a
check and the write that depends on it (budget then charge, nonce then accept) are atomic
even when many RPCs race. `synchronous=FULL`: a commit that returned is on disk, which the
privacy ledger and the audit chain need (a crash must never un-spend epsilon).
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import functools
import hashlib
import json
import os
import secrets
import sqlite3
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, TypeVar

import aiosqlite
import numpy as np
import structlog

from stimnet.errors import Overloaded, Replayed, StimnetError
from stimnetd.privacy.overlap import UnionSizes, near_families, unions
from stimnetd.privacy.policy import BudgetExhausted as PrivacyBudgetExhausted
from stimnetd.store.audit import GENESIS, AuditRow, AuditVerification, chain_hash, verify_rows
from stimnetd.store.records import (
    SKETCH_BUCKETS,
    TERMINAL_STATES,
    JobRecord,
    MemberRecord,
    NonceClaim,
    Release,
    cohort_digest,
    cohort_sketch,
)
from stimnetd.store.schema import MIGRATIONS

T = TypeVar("T")

# Audit entries of allowed calls and deferred bookkeeping wait at most this long for a
# transaction to ride in before they are committed by themselves.
GROUP_COMMIT_S = 0.02


class StoreCorrupt(StimnetError):
    code = "INTERNAL"


class Store:
    def __init__(self, path: Path, *, clock: Callable[[], float] = time.time) -> None:
        self.path = path
        self._clock = clock
        self._db: aiosqlite.Connection | None = None
        self._write_lock = asyncio.Lock()
        self._last_hash = GENESIS
        self._last_seq = 0
        self._pending_audit: list[tuple[str, str, str, str, dict[str, Any]]] = []
        # Bookkeeping writes (a query's job row) waiting for the next transaction: see
        # `_defer`. Each with the future its caller awaits.
        self._deferred: list[tuple[Callable[[_Chain], Any], asyncio.Future[Any]]] = []
        self._flush_task: asyncio.Task[None] | None = None
        # Nonces this store holds, mirrored in memory (loaded at open, added after each
        # commit) so that `nonce_seen` needs no database round trip. Only a fast early
        # answer: the transactions that insert a nonce remain the guarantee.
        self._nonces: set[str] = set()
        self._nonce_order: collections.deque[tuple[float, str]] = collections.deque()

    # -- lifecycle -------------------------------------------------------------------

    async def open(self, *, integrity_check: bool = True) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            db = await aiosqlite.connect(self.path, isolation_level=None)
        except sqlite3.Error as exc:
            raise StoreCorrupt(f"store {self.path} cannot be opened: {exc}") from None
        self._db = db
        try:
            await db.execute("PRAGMA busy_timeout = 5000")
            await db.execute("PRAGMA journal_mode = WAL")
            await db.execute("PRAGMA synchronous = FULL")
            await db.execute("PRAGMA foreign_keys = ON")
            if integrity_check:
                rows = list(await (await db.execute("PRAGMA quick_check")).fetchall())
                if [r[0] for r in rows] != ["ok"]:
                    raise StoreCorrupt(f"store {self.path} failed its integrity check "
                                       f"({rows[0][0]}); restore it from a backup "
                                       "(stimnetd backup) before serving")
            await self._migrate()
            row = await (await db.execute(
                "SELECT seq, hash FROM audit ORDER BY seq DESC LIMIT 1")).fetchone()
            self._last_seq, self._last_hash = (int(row[0]), row[1]) if row else (0, GENESIS)
            for nonce, seen_at in await db.execute_fetchall(
                    "SELECT nonce, seen_at FROM nonces ORDER BY seen_at"):
                self._nonces.add(nonce)
                self._nonce_order.append((seen_at, nonce))
        except sqlite3.DatabaseError as exc:
            await db.close()
            self._db = None
            raise StoreCorrupt(f"store {self.path} is not a usable SQLite database: {exc}; "
                               "restore it from a backup before serving") from None
        except BaseException:
            await db.close()
            self._db = None
            raise
        os.chmod(self.path, 0o600)

    @staticmethod
    def check_file(path: Path) -> None:
        """Read-only integrity check of an existing store (for check-config); a missing
        store is fine (it is created at first start)."""
        if not path.exists():
            return
        try:
            conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
            try:
                rows = conn.execute("PRAGMA quick_check").fetchall()
                (version,) = conn.execute("PRAGMA user_version").fetchone()
            finally:
                conn.close()
        except sqlite3.Error as exc:
            raise StoreCorrupt(f"store {path} is not a usable SQLite database: {exc}; restore it "
                               "from a backup before serving") from None
        if [r[0] for r in rows] != ["ok"]:
            raise StoreCorrupt(f"store {path} failed its integrity check ({rows[0][0]}); restore "
                               "it from a backup (stimnetd backup) before serving")
        if version > len(MIGRATIONS):
            raise StoreCorrupt(f"store {path} has schema version {version}, newer than this "
                               f"stimnetd understands ({len(MIGRATIONS)}); upgrade stimnetd")

    async def close(self) -> None:
        if self._db is None:
            return
        try:
            await self.flush()
        finally:
            await self._db.close()
            self._db = None

    async def _migrate(self) -> None:
        db = self.db
        (version,) = await (await db.execute("PRAGMA user_version")).fetchone()  # type: ignore[misc]
        if version > len(MIGRATIONS):
            raise StoreCorrupt(f"store {self.path} has schema version {version}, newer than this "
                               f"stimnetd understands ({len(MIGRATIONS)}); upgrade stimnetd")
        for i in range(version, len(MIGRATIONS)):
            await db.execute("BEGIN IMMEDIATE")
            try:
                await _exec_script(db, MIGRATIONS[i])
                await db.execute(f"PRAGMA user_version = {i + 1}")
                await db.execute("COMMIT")
            except BaseException:
                await db.execute("ROLLBACK")
                raise

    @property
    def db(self) -> aiosqlite.Connection:
        if self._db is None:
            raise RuntimeError("store is not open")
        return self._db

    async def backup(self, dest: Path) -> None:
        """A consistent online copy via SQLite's backup API."""
        if dest.exists():
            raise StimnetError(f"backup destination {dest} already exists; refusing to overwrite")
        await self.flush()
        target = await aiosqlite.connect(dest)
        try:
            await self.db.backup(target)
        finally:
            await target.close()
        os.chmod(dest, 0o600)

    async def integrity_check(self) -> list[str]:
        rows = await (await self.db.execute("PRAGMA integrity_check")).fetchall()
        return [r[0] for r in rows]

    # -- audit chain -----------------------------------------------------------------

    def audit_soon(self, actor: str, role: str, action: str, decision: str,
                   detail: dict[str, Any] | None = None) -> None:
        """Queue an entry for a group commit a few ms later.

        Used for allowed read-only RPCs, where an fsync per call would dominate the cost of
        the call; refusals and privacy decisions use `audit()` and are durable on return.
        """
        self._pending_audit.append((actor, role, action, decision, detail or {}))
        self._flush_soon()

    def _flush_soon(self) -> None:
        if self._flush_task is None or self._flush_task.done():
            self._flush_task = asyncio.get_running_loop().create_task(self._flush_later())

    async def _flush_later(self) -> None:
        await asyncio.sleep(GROUP_COMMIT_S)
        try:
            await self.flush()
        except Exception:  # noqa: BLE001 - entries stay queued; the next write retries them
            structlog.get_logger("stimnetd.store").exception("audit group commit failed")

    async def flush(self) -> None:
        """Commit what is queued (audit entries, deferred bookkeeping) now."""
        if (self._pending_audit or self._deferred) and self._db is not None:
            # Durable when it carries audit entries; deferred rows alone are bookkeeping.
            await self._tx(lambda chain: None, durable=bool(self._pending_audit), flush=True)

    def _defer(self, fn: Callable[[_Chain], T]) -> asyncio.Future[T]:
        """Run `fn` inside the next transaction — whichever comes first: another write's
        (a query's job row rides in its own site's release), or a group commit within
        GROUP_COMMIT_S. For bookkeeping only: it is as durable as the transaction that
        carries it. It runs under a savepoint, so its failure (the future's exception)
        undoes only its own statements and audit entries, never its host's."""
        fut: asyncio.Future[T] = asyncio.get_running_loop().create_future()
        self._deferred.append((fn, fut))
        self._flush_soon()
        return fut

    async def audit(self, actor: str, role: str, action: str, decision: str,
                    detail: dict[str, Any] | None = None) -> int:
        """Append durably: returns once the entry is committed."""
        return await self._tx(lambda chain: chain.append(actor, role, action, decision,
                                                         detail or {}))

    async def _tx(self, fn: Callable[[_Chain], T], *, durable: bool = True,
                  flush: bool = False) -> T:
        """Run `fn` as one BEGIN IMMEDIATE … COMMIT on the database thread.

        `durable=False` is for bookkeeping no privacy decision rests on (a query job's row):
        the commit skips its fsync (`synchronous=NORMAL`, ~0.3 ms here). In WAL mode commits
        reach the disk in order, so the next durable commit (the release that follows)
        makes it durable too; a power cut before that loses only the row, never a release,
        a charge or a later audit entry, and the audit chain stays a consistent prefix.

        One hop to the thread per transaction instead of one per statement: under load the
        hops, not SQLite, dominated a release's latency. aiosqlite has no public "run this
        function on your thread"; `_execute` is its own queue (stable since 0.17), so
        ordering with the connection's other calls is preserved. Pending group-commit
        audit entries and deferred writes (`_defer`) ride along in the same transaction.
        `flush`: this is the group commit itself (`fn` does nothing).
        """
        async with self._write_lock:
            pending, self._pending_audit = self._pending_audit, []
            deferred, self._deferred = self._deferred, []
            outcomes: list[tuple[bool, Any]] = []
            chain = _Chain(self._last_seq, self._last_hash, self._clock)
            committed = False

            def run(conn: sqlite3.Connection) -> T:
                chain.conn = conn
                chain.append_many(pending)
                outcomes[:] = [_run_deferred(chain, d) for d, _ in deferred]
                return fn(chain)

            def on_commit() -> None:
                # Runs on the database thread right after COMMIT, so the chain head moves
                # with the data even if the awaiting task is cancelled meanwhile (a client
                # hanging up mid-RPC): a stale head would make every later append collide.
                nonlocal committed
                self._last_seq, self._last_hash = chain.seq, chain.head
                committed = True

            task = self._on_db_thread(
                functools.partial(_transaction, run, self.db._conn, on_commit, durable))
            try:
                return await asyncio.shield(task)
            except asyncio.CancelledError:
                # Keep the write lock until the database is done with this transaction.
                await asyncio.wait([task])
                raise
            finally:
                if not committed:
                    self._pending_audit[:0] = pending
                self._settle(deferred, outcomes if committed else None, task, flush)

    def _on_db_thread(self, fn: Callable[[], T]) -> asyncio.Future[T]:
        """`fn` on aiosqlite's thread, queued at once: a task around `_execute` would queue
        it only when it first runs, a loop iteration later (~0.15 ms of a small query's
        path on a busy loop). The queue is aiosqlite's own (`_tx`, as `_execute` uses it
        since 0.17), so `fn` keeps its place among the connection's other calls; should a
        later aiosqlite not have it, `_execute` it is."""
        queue = getattr(self.db, "_tx", None)
        if not callable(getattr(queue, "put_nowait", None)):
            return asyncio.ensure_future(self.db._execute(fn))
        fut: asyncio.Future[T] = asyncio.get_running_loop().create_future()
        queue.put_nowait((fut, fn))  # type: ignore[union-attr]
        return fut

    def _settle(self, deferred: list[tuple[Callable[[_Chain], Any], asyncio.Future[Any]]],
                outcomes: list[tuple[bool, Any]] | None, task: asyncio.Future[Any],
                flush: bool) -> None:
        """Tell deferred writes how their transaction went. One whose host failed for its
        own reasons (its `fn` raised) waits for the group commit; one whose group commit
        failed gets that error (a store that cannot write must not queue them forever)."""
        if outcomes is not None:
            for (_, fut), (ok, value) in zip(deferred, outcomes, strict=True):
                if not fut.done():
                    fut.set_result(value) if ok else fut.set_exception(value)
            return
        if not deferred:
            return
        if not flush:
            self._deferred[:0] = deferred
            self._flush_soon()
            return
        exc = task.exception() if task.done() and not task.cancelled() else None
        for _, fut in deferred:
            if not fut.done():
                fut.set_exception(exc or StimnetError("bookkeeping write not committed"))

    async def audit_rows(self, since: float = 0.0) -> list[AuditRow]:
        await self.flush()
        rows = await self.db.execute_fetchall(
            "SELECT seq, at, actor, role, action, decision, detail_json, prev_hash, hash "
            "FROM audit WHERE at >= ? ORDER BY rowid", (since,))
        return [AuditRow(*r) for r in rows]

    async def verify_audit(self) -> AuditVerification:
        return verify_rows(await self.audit_rows())

    # -- signed-request nonces -------------------------------------------------------

    async def remember_nonce(self, nonce: str, signer: str, max_age_s: float, *,
                             audit: tuple[str, str, str, str, dict[str, Any]] | None = None
                             ) -> bool:
        """True if the nonce is new (and is now remembered); False if it is a replay.

        `audit`, if given, is appended in the same transaction when the nonce is new.
        """
        return await self.claim_nonce(NonceClaim(nonce, signer, max_age_s, audit))

    async def claim_nonce(self, claim: NonceClaim,
                          audit: tuple[str, str, str, str, dict[str, Any]] | None = None) -> bool:
        """Remember `claim` now (with its accepted entry, then `audit`); False on replay."""
        now = self._clock()

        def tx(chain: _Chain) -> bool:
            if not _insert_nonce(chain, claim, now):
                return False
            if audit is not None:
                chain.append(*audit)
            return True

        fresh = await self._tx(tx)
        claim.consumed = True
        if fresh:
            self._remember_nonce(claim.nonce, now, claim.max_age_s)
        return fresh

    def nonce_seen(self, nonce: str) -> bool:
        """Whether a committed transaction has remembered `nonce` (a replay, answered at
        once). A concurrent copy still in flight is stopped by the inserting transaction."""
        return nonce in self._nonces

    def _remember_nonce(self, nonce: str, now: float, max_age_s: float) -> None:
        # As in the table: nonces older than twice the freshness window are forgotten.
        while self._nonce_order and self._nonce_order[0][0] < now - 2 * max_age_s:
            self._nonces.discard(self._nonce_order.popleft()[1])
        self._nonces.add(nonce)
        self._nonce_order.append((now, nonce))

    # -- jobs ------------------------------------------------------------------------

    async def create_job(self, job: JobRecord, *, audit: tuple[str, str, str] | None = None,
                         nonce: tuple[str, float] | None = None, durable: bool = True,
                         pending_limit: int | None = None, defer: bool = False) -> bool:
        """Insert the job (and its audit entry) — refusing a replayed nonce in the same
        transaction when `nonce` = (nonce, max_age_s) is given. False means replay.
        `durable`: see `_tx` (a script's queued job must survive a power cut; a query's
        row is bookkeeping). `pending_limit`: raise Overloaded, inserting nothing, when
        the owner already has that many script jobs queued, running or awaiting approval
        (counted in this transaction, so concurrent submissions cannot all pass).
        `defer`: written with the next transaction (`_defer`), for bookkeeping rows."""
        now = self._clock()

        def tx(chain: _Chain) -> bool:
            conn = chain.conn
            if pending_limit is not None:
                (pending,) = conn.execute(
                    "SELECT count(*) FROM jobs WHERE owner = ? AND kind = 'script' AND state IN"
                    " ('queued', 'running', 'awaiting_approval')", (job.owner,)).fetchone()
                if pending >= pending_limit:
                    raise Overloaded(
                        f"you have {pending} script jobs queued, running or awaiting approval "
                        f"at this site, its limit (max_pending_per_researcher = "
                        f"{pending_limit}); wait for some to finish or cancel them")
            if nonce is not None:
                conn.execute("DELETE FROM nonces WHERE seen_at < ?", (now - 2 * nonce[1],))
                try:
                    conn.execute("INSERT INTO nonces (nonce, signer, seen_at) VALUES (?, ?, ?)",
                                 (nonce[0], job.owner, now))
                except sqlite3.IntegrityError:
                    return False
            conn.execute(
                "INSERT INTO jobs (id, kind, scope, catalog, owner, state, detail, created_at,"
                " updated_at, request_id, origin, payload, signature, signer_cert, script,"
                " script_sha256, sites_json) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
                (job.id, job.kind, job.scope, job.catalog, job.owner, job.state, job.detail,
                 job.created_at, job.updated_at, job.request_id, job.origin, job.payload,
                 job.signature, job.signer_cert, job.script, job.script_sha256,
                 json.dumps(job.sites)))
            if audit is not None:
                actor, role, action = audit
                chain.append(actor, role, action, "accepted",
                             {"job": job.id, "catalog": job.catalog, "kind": job.kind,
                              "scope": job.scope, "request_id": job.request_id})
            return True

        created = await (self._defer(tx) if defer else self._tx(tx, durable=durable))
        if created and nonce is not None:
            self._remember_nonce(nonce[0], now, nonce[1])
        return created

    async def update_job(self, job_id: str, *, state: str | None = None, detail: str | None = None,
                         sites: list[dict[str, Any]] | None = None, result: bytes | None = None,
                         bump_attempts: bool = False, durable: bool = True,
                         defer: bool = False) -> JobRecord:
        record = await self.update_job_if(job_id, None, state=state, detail=detail, sites=sites,
                                          result=result, bump_attempts=bump_attempts,
                                          durable=durable, defer=defer)
        if record is None:
            raise StimnetError(f"job {job_id} vanished")
        return record

    async def update_job_if(self, job_id: str, expect_state: str | None, *,
                            state: str | None = None, detail: str | None = None,
                            sites: list[dict[str, Any]] | None = None,
                            result: bytes | None = None, bump_attempts: bool = False,
                            durable: bool = True, defer: bool = False) -> JobRecord | None:
        """`update_job` only if the job is in `expect_state` (any state if None), checked
        and changed in one statement: of two racing decisions (approve and cancel, or two
        approvals) exactly one applies. None: not in that state (or no such job)."""
        sets, args = ["updated_at = ?"], list[Any]([self._clock()])
        for col, val in (("state", state), ("detail", detail), ("result", result)):
            if val is not None:
                sets.append(f"{col} = ?")
                args.append(val)
        if sites is not None:
            sets.append("sites_json = ?")
            args.append(json.dumps(sites))
        if bump_attempts:
            sets.append("attempts = attempts + 1")

        where, keys = "id = ?", [job_id]
        if expect_state is not None:
            where, keys = "id = ? AND state = ?", [job_id, expect_state]

        def tx(chain: _Chain) -> Any:
            changed = chain.conn.execute(f"UPDATE jobs SET {', '.join(sets)} WHERE {where}",
                                         (*args, *keys)).rowcount
            if not changed:
                return None
            return chain.conn.execute(f"SELECT {JobRecord.COLUMNS} FROM jobs WHERE id = ?",
                                      (job_id,)).fetchone()

        row = await (self._defer(tx) if defer else self._tx(tx, durable=durable))
        return JobRecord.from_row(row) if row is not None else None

    async def get_job(self, job_id: str) -> JobRecord | None:
        rows = await self.db.execute_fetchall(
            f"SELECT {JobRecord.COLUMNS} FROM jobs WHERE id = ?", (job_id,))
        rows = list(rows)
        return JobRecord.from_row(rows[0]) if rows else None

    async def list_jobs(self, *, owner: str | None = None, states: Iterable[str] | None = None,
                        limit: int = 100) -> list[JobRecord]:
        where, args = [], []
        if owner is not None:
            where.append("owner = ?")
            args.append(owner)
        if states is not None:
            states = list(states)
            where.append(f"state IN ({','.join('?' * len(states))})")
            args.extend(states)
        clause = f"WHERE {' AND '.join(where)}" if where else ""
        rows = await self.db.execute_fetchall(
            f"SELECT {JobRecord.COLUMNS} FROM jobs {clause} ORDER BY created_at DESC LIMIT ?",
            (*args, limit))
        return [JobRecord.from_row(r) for r in rows]

    async def prune_jobs(self, finished_before: float, *, batch: int = 1000) -> int:
        """Delete finished jobs (TERMINAL_STATES) last changed before `finished_before`, in
        transactions of at most `batch` rows so releases are never held up for long; how
        many went. Jobs still queued, running or awaiting approval are never deleted, nor
        is anything a privacy decision rests on (releases, ledger, cohorts, audit)."""
        states = sorted(TERMINAL_STATES)
        total = 0
        while True:
            def tx(chain: _Chain) -> int:
                return chain.conn.execute(
                    "DELETE FROM jobs WHERE rowid IN (SELECT rowid FROM jobs WHERE updated_at < ?"
                    f" AND state IN ({','.join('?' * len(states))}) LIMIT ?)",
                    (finished_before, *states, batch)).rowcount

            deleted = await self._tx(tx, durable=False)
            total += deleted
            if deleted < batch:
                return total

    async def count_jobs_by_state(self) -> dict[str, int]:
        # Kept by triggers (schema v2): the metrics read it every few seconds, and counting
        # the jobs table itself grows with every job ever run (50 ms per million). Deferred
        # rows (a query's final state) are committed first, so the counts include them.
        await self.flush()
        rows = await self.db.execute_fetchall("SELECT state, n FROM job_counts WHERE n > 0")
        return {s: int(n) for s, n in rows}

    # -- privacy ledger --------------------------------------------------------------

    async def spent(self, researcher: str, catalog: str) -> float:
        rows = await self.db.execute_fetchall(
            "SELECT COALESCE(SUM(epsilon), 0) FROM ledger WHERE researcher = ? AND catalog = ?",
            (researcher, catalog))
        return float(list(rows)[0][0])

    async def spent_by_catalog(self) -> dict[str, float]:
        rows = await self.db.execute_fetchall(
            "SELECT catalog, SUM(epsilon) FROM ledger GROUP BY catalog")
        return {c: float(e) for c, e in rows}

    async def release(self, release: Release, *, budget: float,
                      guard: Callable[[frozenset[str], list[frozenset[str]]], None] | None = None,
                      guard_window: int = 0, audit_actor: tuple[str, str],
                      nonce: NonceClaim | None = None,
                      union_guard: Callable[[list[frozenset[str]], list[list[frozenset[str]]]],
                                            None] | None = None) -> Release:
        """Record a release, charge its epsilon and audit it, in one transaction.

        Idempotent per job: a job released before (e.g. re-run after a crash) returns the
        stored release without charging again. `guard(cohort, earlier)` sees each cohort the
        release discloses (`Release.disclosed`: the query's, or each released group's) with
        the researcher's earlier released cohorts, inside the transaction, so two racing
        queries cannot both pass it; only cohorts that could be within `guard_window` of
        that one (by size and by sketch, see `_near_cohorts`) are loaded, so the guard must
        refuse nothing farther than that (check_overlap with window k_min - 1 does not).
        `union_guard(cells, earlier)` then sees the release's cells (`Release.atoms`, or
        its one cohort) with the earlier queries' cells whose unions could be within
        `guard_window` of unions of these (`_near_families`), each earlier query's cells
        as one list. Each disclosed cohort is then recorded, and a grouped release's cells
        as a family. A refusal
        commits its audit entry (and nothing else, but for the sketches of pre-v3 cohorts
        it had to load) before it is raised. With `nonce`, the
        request's nonce is remembered first, in this transaction; a duplicate raises
        `Replayed` and nothing is released.
        """
        digest = release.cohort_key or cohort_digest(release.cohort)
        base = {"job": release.job_id, "catalog": release.catalog}
        now = self._clock()

        def tx(chain: _Chain) -> Release | StimnetError:
            conn = chain.conn
            if nonce is not None and not _insert_nonce(chain, nonce, now):
                return Replayed("replayed request: this signed job was already run at this site")
            existing = conn.execute(_RELEASE_SELECT + " WHERE job_id = ?",
                                    (release.job_id,)).fetchone()
            if existing is not None:
                return Release.from_row(existing)
            if release.epsilon:
                (spent,) = conn.execute(
                    "SELECT COALESCE(SUM(epsilon), 0) FROM ledger WHERE researcher = ? "
                    "AND catalog = ?", (release.researcher, release.catalog)).fetchone()
                if spent + release.epsilon > budget + 1e-12:
                    chain.append(*audit_actor, "release", "refused",
                                 {**base, "policy": "budget", "epsilon": release.epsilon,
                                  "budget": budget})
                    return PrivacyBudgetExhausted(
                        f"privacy budget exhausted on catalog {release.catalog!r}: this query "
                        f"needs epsilon {release.epsilon:g}, {max(budget - spent, 0):g} of "
                        f"{budget:g} remains for you at this site")
            disclosed = release.disclosed() if release.decision != "suppressed" else ()
            sketches: dict[str, bytes] = {}
            if guard is not None and disclosed:
                sized = _sized_cohorts(conn, release, [len(m) for m, _ in disclosed],
                                       guard_window)
                for members, key in disclosed:
                    try:
                        guard(members, _near_cohorts(conn, release, members, key, guard_window,
                                                     sketches, sized))
                    except StimnetError as refusal:
                        chain.append(*audit_actor, "release", "refused",
                                     {**base, "policy": "overlap", "reason": str(refusal)})
                        return refusal
            if union_guard is not None and disclosed:
                atoms = release.atoms or disclosed[:1]
                try:
                    union_guard([m for m, _ in atoms],
                                _near_families(conn, release, atoms, guard_window, sketches))
                except StimnetError as refusal:
                    chain.append(*audit_actor, "release", "refused",
                                 {**base, "policy": "overlap", "reason": str(refusal)})
                    return refusal
            if release.epsilon:
                conn.execute(
                    "INSERT INTO ledger (researcher, catalog, job_id, epsilon, at) VALUES (?,?,?,?,?)",
                    (release.researcher, release.catalog, release.job_id, release.epsilon,
                     release.at))
            conn.execute(
                "INSERT INTO releases (job_id, researcher, catalog, decision, epsilon,"
                " cohort_digest, partials, at) VALUES (?,?,?,?,?,?,?,?)",
                (release.job_id, release.researcher, release.catalog, release.decision,
                 release.epsilon, digest, release.partials, release.at))
            for members, key in disclosed:
                if conn.execute(
                        "SELECT 1 FROM cohorts WHERE researcher = ? AND catalog = ? AND digest = ?",
                        (release.researcher, release.catalog, key)).fetchone() is None:
                    conn.execute(
                        "INSERT INTO cohorts (researcher, catalog, digest, size, members_json)"
                        " VALUES (?,?,?,?,?)", (release.researcher, release.catalog, key,
                                                len(members), json.dumps(sorted(members))))
                    _save_sketch(conn, release, key, sketches.get(key) or cohort_sketch(members))
            if len(release.atoms) > 1 and release.decision != "suppressed":
                conn.execute(
                    "INSERT OR IGNORE INTO cohort_families (researcher, catalog, digest,"
                    " sizes_json, atoms_json) VALUES (?,?,?,?,?)",
                    (release.researcher, release.catalog, _family_digest(release.atoms),
                     json.dumps([len(m) for m, _ in release.atoms]),
                     json.dumps([d for _, d in release.atoms])))
            chain.append(*audit_actor, "release", release.decision,
                         {**base, "epsilon": release.epsilon, "researcher": release.researcher,
                          **release.audit_detail})
            return release

        outcome = await self._tx(tx)
        if nonce is not None:
            nonce.consumed = True
            if not isinstance(outcome, Replayed):
                self._remember_nonce(nonce.nonce, now, nonce.max_age_s)
        if isinstance(outcome, StimnetError):
            raise outcome
        return outcome

    async def get_release(self, job_id: str) -> Release | None:
        rows = await self.db.execute_fetchall(_RELEASE_SELECT + " WHERE job_id = ?", (job_id,))
        return Release.from_row(list(rows)[0]) if rows else None

    # -- gossip members --------------------------------------------------------------

    async def load_members(self) -> list[MemberRecord]:
        rows = await self.db.execute_fetchall(
            "SELECT name, address, incarnation, status, last_heard, catalogs_json FROM members")
        return [MemberRecord.from_row(r) for r in rows]

    async def save_members(self, members: Iterable[MemberRecord]) -> None:
        rows = [m.to_row() for m in members]

        def tx(chain: _Chain) -> None:
            chain.conn.execute("DELETE FROM members")
            chain.conn.executemany(
                "INSERT INTO members (name, address, incarnation, status, last_heard, catalogs_json)"
                " VALUES (?,?,?,?,?,?)", rows)

        await self._tx(tx)

    # -- script approvals and site secret ------------------------------------------

    async def approve_script(self, sha256: str, by: str) -> None:
        now = self._clock()
        await self._tx(lambda chain: chain.conn.execute(
            "INSERT OR REPLACE INTO approvals (script_sha256, approved_by, at) VALUES (?,?,?)",
            (sha256, by, now)))

    async def is_script_approved(self, sha256: str) -> bool:
        rows = await self.db.execute_fetchall(
            "SELECT 1 FROM approvals WHERE script_sha256 = ?", (sha256,))
        return bool(list(rows))

    async def site_secret(self) -> bytes:
        """A per-site random key (e.g. for HMAC'd cohort fingerprints); made on first use."""
        def tx(chain: _Chain) -> bytes:
            row = chain.conn.execute("SELECT value FROM meta WHERE key = 'site_secret'").fetchone()
            if row:
                return bytes(row[0])
            secret = secrets.token_bytes(32)
            chain.conn.execute("INSERT INTO meta (key, value) VALUES ('site_secret', ?)", (secret,))
            return secret

        return await self._tx(tx)


def _spans(sizes: Iterable[int], window: int) -> list[list[int]]:
    """[size - window, size + window] for each size, overlapping ones merged, in order."""
    spans: list[list[int]] = []
    for size in sorted(set(sizes)):
        if spans and size - window <= spans[-1][1] + 1:
            spans[-1][1] = size + window
        else:
            spans.append([size - window, size + window])
    return spans


@dataclasses.dataclass
class _Sized:
    """Earlier cohorts of the sizes a release's cohorts are near (`_sized_cohorts`)."""

    digests: list[str]
    sizes: np.ndarray
    sketches: np.ndarray  # one row per cohort (zeros where it has none)
    sketched: np.ndarray  # stored with a sketch (schema v3 on)


def _sized_cohorts(conn: sqlite3.Connection, release: Release, sizes: Iterable[int],
                   window: int) -> _Sized:
    """The researcher's earlier cohorts on the catalog within `window` of any of `sizes`:
    read, and their sketches decoded, once for all the cohorts a release discloses (a
    grouped query's cells are often of similar size)."""
    rows: list[tuple[str, int, bytes | None]] = []
    for lo, hi in _spans(sizes, window):
        rows += conn.execute(
            "SELECT c.digest, c.size, s.sketch FROM cohorts c LEFT JOIN cohort_sketches s"
            " USING (researcher, catalog, digest) WHERE c.researcher = ? AND c.catalog = ?"
            " AND c.size BETWEEN ? AND ?", (release.researcher, release.catalog, lo, hi)
        ).fetchall()
    blank = bytes(4 * SKETCH_BUCKETS)
    blobs = b"".join(sk if sk is not None and len(sk) == len(blank) else blank
                     for _, _, sk in rows)
    return _Sized([d for d, _, _ in rows], np.array([n for _, n, _ in rows], np.int64),
                  np.frombuffer(blobs, dtype="<u4").reshape(len(rows), SKETCH_BUCKETS)
                  .astype(np.int64),
                  np.array([sk is not None and len(sk) == len(blank) for _, _, sk in rows],
                           bool))


def _near_cohorts(conn: sqlite3.Connection, release: Release, members: frozenset[str], key: str,
                  window: int, sketches: dict[str, bytes], sized: _Sized) -> list[frozenset[str]]:
    """The researcher's earlier cohorts on the catalog that could be within `window`
    subjects of `members`: first by size (|A xor B| >= ||A| - |B||; `sized` holds those
    of the sizes concerned), then by sketch (records.cohort_sketch); only those are
    parsed. A row without a sketch (stored before schema v3) is parsed and sketched.
    `sketches` caches the new cohorts' own sketches."""
    candidates = [i for i in np.flatnonzero(np.abs(sized.sizes - len(members)) <= window).tolist()
                  if sized.digests[i] != key]  # the same cohort again discloses nothing new
    if not candidates:
        return []
    mine = sketches.get(key) or sketches.setdefault(key, cohort_sketch(members))
    own = np.frombuffer(mine, dtype="<u4").astype(np.int64)
    distances = np.abs(sized.sketches[candidates] - own).sum(axis=1)
    near = []
    for i, d in zip(candidates, distances.tolist(), strict=True):
        digest = sized.digests[i]
        if sized.sketched[i] and d > window:
            continue
        cohort = _members(conn, release, digest)
        if not sized.sketched[i]:
            _save_sketch(conn, release, digest, cohort_sketch(cohort))
        near.append(cohort)
    return near


def _members(conn: sqlite3.Connection, release: Release, digest: str) -> frozenset[str]:
    """An earlier cohort's members (empty if it is not stored: nothing to compare)."""
    row = conn.execute("SELECT members_json FROM cohorts WHERE researcher = ? AND catalog = ?"
                       " AND digest = ?", (release.researcher, release.catalog, digest)).fetchone()
    return frozenset(json.loads(row[0])) if row else frozenset()


def _family_digest(atoms: tuple[tuple[frozenset[str], str], ...]) -> str:
    return hashlib.sha256(",".join(sorted(d for _, d in atoms)).encode()).hexdigest()


def _near_families(conn: sqlite3.Connection, release: Release,
                   atoms: tuple[tuple[frozenset[str], str], ...], window: int,
                   sketches: dict[str, bytes]) -> list[list[frozenset[str]]]:
    """The researcher's earlier queries on the catalog (each as its released cells) some
    union of whose cells could be within `window` subjects of some union of `atoms`:
    earlier grouped queries (`cohort_families`) and, for three or more new cells, earlier
    single cohorts near a union of some but not all of them (the others are `_near_cohorts`'
    work). Ruled out by sizes, then by sketches; only the rest are parsed."""
    sizes = [len(m) for m, _ in atoms]
    by_size = UnionSizes(sizes)
    own = {d for _, d in atoms}
    # Families have two or more cells: an ungrouped release (one) is never one of them.
    own_family = _family_digest(atoms) if len(atoms) > 1 else None
    found: list[tuple[list[str], str]] = []  # (cell digests, their sizes as JSON)
    near_by_sizes: dict[str, bool] = {}  # researchers repeat groupings: judge each once
    for digest, sizes_json, atoms_json in conn.execute(
            "SELECT digest, sizes_json, atoms_json FROM cohort_families"
            " WHERE researcher = ? AND catalog = ?", (release.researcher, release.catalog)):
        if digest == own_family:
            continue
        if sizes_json not in near_by_sizes:
            near_by_sizes[sizes_json] = by_size.near(UnionSizes(json.loads(sizes_json)), window)
        if near_by_sizes[sizes_json]:
            found.append((json.loads(atoms_json), sizes_json))
    picks = unions(len(atoms))
    middle = picks[(picks.sum(axis=1) > 1) & (picks.sum(axis=1) < len(atoms))]
    # Earlier cohorts near the middle unions' sizes (each cell's and all of theirs are
    # `_near_cohorts`').
    for lo, hi in _spans((middle @ np.asarray(sizes, np.int64)).tolist(), window):
        for digest, size in conn.execute(
                "SELECT digest, size FROM cohorts WHERE researcher = ? AND catalog = ?"
                " AND size BETWEEN ? AND ?", (release.researcher, release.catalog, lo, hi)):
            if digest not in own:
                found.append(([digest], f"[{size}]"))
    if not found:
        return []
    members: dict[str, frozenset[str]] = {}

    def load(digest: str) -> frozenset[str]:
        if digest not in members:
            members[digest] = _members(conn, release, digest)
        return members[digest]

    stored: dict[str, bytes] = {}
    wanted = sorted({d for digests, _ in found for d in digests})
    for lo in range(0, len(wanted), 500):  # SQLite's bound-variable limit
        chunk = wanted[lo:lo + 500]
        stored.update(conn.execute(
            "SELECT digest, sketch FROM cohort_sketches WHERE researcher = ? AND catalog = ?"
            f" AND digest IN ({','.join('?' * len(chunk))})",
            (release.researcher, release.catalog, *chunk)).fetchall())
    for d in wanted:
        if len(stored.get(d) or b"") != 4 * SKETCH_BUCKETS:  # before schema v3 (or damaged)
            stored[d] = cohort_sketch(load(d))
            _save_sketch(conn, release, d, stored[d])

    def matrix(blobs: list[bytes]) -> np.ndarray:
        return np.frombuffer(b"".join(blobs), dtype="<u4").reshape(len(blobs), -1)

    mine = UnionSizes(sizes, matrix([sketches.get(d) or sketches.setdefault(d, cohort_sketch(m))
                                     for m, d in atoms]))
    parsed: dict[str, list[int]] = {}
    near = near_families(mine, [(parsed.get(their) or parsed.setdefault(their, json.loads(their)),
                                 matrix([stored[d] for d in digests]))
                                for digests, their in found], window)
    return [[load(d) for d in digests] for (digests, _), hit in zip(found, near, strict=True)
            if hit]


def _save_sketch(conn: sqlite3.Connection, release: Release, digest: str, sketch: bytes) -> None:
    conn.execute("INSERT OR REPLACE INTO cohort_sketches (researcher, catalog, digest, sketch)"
                 " VALUES (?,?,?,?)", (release.researcher, release.catalog, digest, sketch))


_RELEASE_SELECT = ("SELECT job_id, researcher, catalog, decision, epsilon, cohort_digest, "
                   "partials, at FROM releases")


def _insert_nonce(chain: _Chain, claim: NonceClaim, now: float) -> bool:
    # Nonces older than twice the freshness window can never be replayed (the timestamp
    # check refuses them first), so they need not be kept.
    chain.conn.execute("DELETE FROM nonces WHERE seen_at < ?", (now - 2 * claim.max_age_s,))
    try:
        chain.conn.execute("INSERT INTO nonces (nonce, signer, seen_at) VALUES (?, ?, ?)",
                           (claim.nonce, claim.signer, now))
    except sqlite3.IntegrityError:
        return False
    if claim.accepted is not None:
        chain.append(*claim.accepted)
    return True


class _Chain:
    """Appends hash-chained audit rows inside one transaction (on the database thread)."""

    def __init__(self, seq: int, head: str, clock: Callable[[], float]) -> None:
        self.seq = seq
        self.head = head
        self._clock = clock
        self.conn: sqlite3.Connection = None  # type: ignore[assignment]

    _INSERT = ("INSERT INTO audit (seq, at, actor, role, action, decision, detail_json, "
               "prev_hash, hash) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)")

    def _row(self, actor: str, role: str, action: str, decision: str,
             detail: dict[str, Any]) -> tuple[Any, ...]:
        seq = self.seq + 1
        at = self._clock()
        detail_json = json.dumps(detail, sort_keys=True, separators=(",", ":"), default=str)
        h = chain_hash(self.head, seq, at, actor, role, action, decision, detail_json)
        row = (seq, at, actor, role, action, decision, detail_json, self.head, h)
        self.seq, self.head = seq, h
        return row

    def append(self, actor: str, role: str, action: str, decision: str,
               detail: dict[str, Any]) -> int:
        self.conn.execute(self._INSERT, self._row(actor, role, action, decision, detail))
        return self.seq

    def append_many(self, entries: list[tuple[str, str, str, str, dict[str, Any]]]) -> None:
        """A group commit's queued entries, in one statement (one per entry costs ~2x)."""
        if entries:
            self.conn.executemany(self._INSERT, [self._row(*e) for e in entries])


def _run_deferred(chain: _Chain, fn: Callable[[_Chain], Any]) -> tuple[bool, Any]:
    """One deferred write inside its host's transaction, undone alone if it fails."""
    conn, seq, head = chain.conn, chain.seq, chain.head
    conn.execute("SAVEPOINT deferred")
    try:
        value = fn(chain)
    except Exception as exc:  # noqa: BLE001 - the write's own failure, handed to its caller
        conn.execute("ROLLBACK TO deferred")
        conn.execute("RELEASE deferred")
        chain.seq, chain.head = seq, head  # its audit rows were undone with it
        return False, exc
    conn.execute("RELEASE deferred")
    return True, value


def _transaction(fn: Callable[[sqlite3.Connection], T], conn: sqlite3.Connection,
                 on_commit: Callable[[], None], durable: bool = True) -> T:
    # Runs on aiosqlite's thread. The pragma cannot change inside a transaction, so a
    # bookkeeping commit switches it around its own BEGIN … COMMIT.
    if not durable:
        conn.execute("PRAGMA synchronous = NORMAL")
    try:
        conn.execute("BEGIN IMMEDIATE")
        try:
            result = fn(conn)
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")
    finally:
        if not durable:
            conn.execute("PRAGMA synchronous = FULL")
    on_commit()
    return result


async def _exec_script(db: aiosqlite.Connection, script: str) -> None:
    # executescript() would COMMIT our open transaction; run statements one by one instead
    # (a trigger's body holds semicolons: a statement ends where SQLite says it is complete).
    stmt = ""
    for piece in script.split(";"):
        stmt += piece + ";"
        if sqlite3.complete_statement(stmt):
            if stmt.strip(" \n;"):
                await db.execute(stmt)
            stmt = ""
    if stmt.strip(" \n;"):
        raise StoreCorrupt(f"incomplete statement in a migration: {stmt.strip()[:80]}")
