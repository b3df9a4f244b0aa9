"""The node's store: one SQLite file in WAL mode, its schema, and the storage verbs.

`Store` offers reads and writes and returns domain dataclasses (records.py); it decides
nothing. The rules a release must pass come in as a function (privacy/release.decide) that
it runs inside the release's transaction. Writes go through one writer (groupcommit.py),
reads through an aiosqlite connection of their own. Each table's SQL lives with it:
jobs.py, releases.py, ledger.py, cohorts.py, nonces.py, node.py and audit.py.
"""

from __future__ import annotations

import asyncio
import functools
import os
import sqlite3
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import aiosqlite

from stimnet.errors import Replayed, StimnetError, StorageFull
from stimnetd.store import blobs, identity, jobs, ledger, node, nonces, releases
from stimnetd.store.audit import SELECT_ROWS, AuditRow, AuditVerification, verify_rows
from stimnetd.store.groupcommit import GROUP_COMMIT_S, Writer
from stimnetd.store.lock import StateDirLock
from stimnetd.store.records import JobRecord, MemberRecord, NonceClaim, Release, ReleaseRule
from stimnetd.store.schema import MIGRATIONS
from stimnetd.store.transaction import AuditEntry, Transaction

RESTORE = "restore it from a backup (stimnetd backup) before serving"


class StoreCorrupt(StimnetError):
    code = "INTERNAL"


class Store:
    """The node's durable state, as storage verbs: jobs, releases and the privacy ledger,
    the audit chain, signed-request nonces, gossip members, script approvals.

    Args:
        path: the SQLite file (created, with its directory, on first open).
        clock: wall time for rows and audit entries.
        group_commit_s: how long queued audit entries and deferred writes wait for a
            transaction to ride in (groupcommit.py).
    """

    def __init__(self, path: Path, *, clock: Callable[[], float] = time.time,
                 group_commit_s: float = GROUP_COMMIT_S) -> None:
        self.path = path
        self._clock = clock
        self._writer = Writer(clock, group_commit_s)
        self._db: aiosqlite.Connection | None = None
        self._nonces = nonces.NonceMirror()
        self._dir_lock = StateDirLock(path.parent)

    @property
    def where(self) -> str:
        return f"store {self.path}"

    @property
    def state_dir(self) -> Path:
        return self.path.parent

    def lock_state_dir(self) -> None:
        """Hold the store's directory for this process (lock.py) until `close`; raises
        StateDirLocked, naming the holder, if another daemon holds it."""
        self._dir_lock.acquire()

    # -- lifecycle -------------------------------------------------------------------

    async def open(self, *, integrity_check: bool = True, lock_dir: bool = False,
                   check_identity: bool = False) -> None:
        """Open (creating the file and migrating its schema), after a quick integrity check.
        `lock_dir`: first hold the store's directory for this process (lock_state_dir).
        `check_identity`: refuse a store that is not the one this node ran on before
        (identity.py), and re-verify the whole audit chain.

        Raises:
            StoreCorrupt: the file is not a usable store, or was written by a newer stimnetd,
                or its audit chain does not verify.
            StoreReplaced: missing, empty or another store, on a node that has run before.
            StateDirLocked: another daemon holds the directory.
        """
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if lock_dir:
            self.lock_state_dir()
        if check_identity:
            identity.check_file_present(self.path)
        try:
            await self._writer.open(self.path)
        except sqlite3.Error as exc:
            raise StoreCorrupt(f"store {self.path} cannot be opened: {exc}") from None
        try:
            await self._writer.call(functools.partial(_prepare, self.path, integrity_check,
                                                      check_identity))
            await self._writer.load_head()
            self._nonces.load(await self._writer.call(nonces.load))
            self._db = await aiosqlite.connect(self.path, isolation_level=None)
            await self._db.execute("PRAGMA busy_timeout = 5000")
        except sqlite3.DatabaseError as exc:
            await self._disconnect()
            raise StoreCorrupt(f"store {self.path} is not a usable SQLite database: {exc}; "
                               "restore it from a backup before serving") from None
        except BaseException:
            await self._disconnect()
            raise
        os.chmod(self.path, 0o600)

    async def _disconnect(self) -> None:
        db, self._db = self._db, None
        try:
            await self._writer.close()
        finally:
            if db is not None:
                await db.close()

    async def keep_identity(self, *, replace: bool = False) -> None:
        """Write the store's identity (its first audit entry's hash) next to it, once that
        entry is committed; `replace`: over an earlier one (init-store --force)."""
        if identity.read(self.path) is not None and not replace:
            return
        await self.flush()
        store_id = await self._writer.call(identity.first_hash)
        if store_id is not None:
            identity.write(self.path, store_id)

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
            raise StoreCorrupt(f"store {path} failed its integrity check ({rows[0][0]}); {RESTORE}")
        _check_version(path, version)

    async def close(self) -> None:
        """Commit what is queued, then close (and let go of the directory); idempotent."""
        try:
            await self._disconnect()
        finally:
            self._dir_lock.release()

    @property
    def db(self) -> aiosqlite.Connection:
        """The connection reads use (writes go through the store's verbs)."""
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

        For allowed read-only RPCs, where an fsync per call would dominate the cost of the
        call; refusals and privacy decisions use `audit()` and are durable on return.
        """
        self._writer.audit_soon((actor, role, action, decision, detail or {}))

    async def flush(self) -> None:
        """Commit what is queued (audit entries, deferred bookkeeping) now."""
        await self._writer.flush()

    async def audit(self, actor: str, role: str, action: str, decision: str,
                    detail: dict[str, Any] | None = None) -> int:
        """Append durably: returns (the entry's sequence number) once it is committed."""
        return await self._writer.run(lambda tx: tx.append(actor, role, action, decision,
                                                           detail or {}))

    async def _flush_if_room(self) -> None:
        """Before a read that should include what is queued: flushed, unless the state
        volume is full, when the read shows what is on disk (reads keep working)."""
        try:
            await self.flush()
        except StorageFull:
            pass

    async def audit_rows(self, since: float = 0.0) -> list[AuditRow]:
        await self._flush_if_room()
        return [AuditRow(*r) for r in await self.db.execute_fetchall(SELECT_ROWS, (since,))]

    async def verify_audit(self) -> AuditVerification:
        return verify_rows(await self.audit_rows())

    # -- signed-request nonces -------------------------------------------------------

    async def remember_nonce(self, nonce: str, signer: str, max_age_s: float, *,
                             audit: AuditEntry | None = None) -> bool:
        """True if the nonce is new (and is now remembered); False if it is a replay.

        `audit`, if given, is appended in the same transaction when the nonce is new.
        """
        return await self.claim_nonce(NonceClaim(nonce, signer, max_age_s, audit))

    async def claim_nonce(self, claim: NonceClaim, audit: AuditEntry | None = None) -> bool:
        """Remember `claim` now (with its accepted entry, then `audit`); False on replay."""
        now = self._clock()

        def tx(t: Transaction) -> bool:
            if not nonces.insert(t, claim, now):
                return False
            if audit is not None:
                t.append(*audit)
            return True

        fresh = await self._writer.run(tx)
        claim.consumed = True
        if fresh:
            self._nonces.add(claim.nonce)
        return fresh

    def nonce_seen(self, nonce: str) -> bool:
        """Whether a committed transaction has remembered `nonce` (a replay, answered at
        once). A concurrent copy still in flight is stopped by the inserting transaction."""
        return nonce in self._nonces

    async def nonce_seen_now(self, nonce: str) -> bool:
        """Whether the table still holds `nonce`: exact, where `nonce_seen`'s fixed-size
        mirror may have let an old one go (nonces.NonceMirror)."""
        return bool(await self.db.execute_fetchall("SELECT 1 FROM nonces WHERE nonce = ?",
                                                   (nonce,)))

    # -- jobs ------------------------------------------------------------------------

    async def create_job(self, job: JobRecord, *, audit: tuple[str, str, str] | None = None,
                         nonce: tuple[str, float] | None = None, durable: bool = True,
                         pending_limit: int | None = None, defer: bool = False) -> bool:
        """Insert the job (and its audit entry) — refusing a replayed nonce in the same
        transaction when `nonce` = (nonce, max_age_s) is given. False means replay.

        Args:
            durable: see `Writer.run` (a script's queued job must survive a power cut; a
                query's row is bookkeeping).
            pending_limit: raise Overloaded, inserting nothing, when the owner already has
                that many script jobs queued, running or awaiting approval (counted in
                this transaction, so concurrent submissions cannot all pass).
            defer: written with the next transaction (`Writer.defer`), for bookkeeping rows.
        Raises:
            Conflict: a job with this id exists.
        """
        now = self._clock()
        tx = jobs.insert(job, audit, nonce, pending_limit, now)
        created = await (self._writer.defer(tx) if defer else self._writer.run(tx, durable=durable))
        if created and nonce is not None:
            self._nonces.add(nonce[0])
        return created

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
        """`update_job` only if the job is in `expect_state` (any state if None), checked
        and changed in one statement: of two racing decisions (approve and cancel, or two
        approvals) exactly one applies. None: not in that state (or no such job)."""
        stored = await compacted(result)
        changes = {col: val for col, val in (("state", state), ("detail", detail),
                                             ("result", stored), ("sites", sites))
                   if val is not None}
        tx = jobs.update(job_id, expect_state, changes, bump_attempts, self._clock(),
                         bump_requeues=bump_requeues)
        row = await (self._writer.defer(tx) if defer else self._writer.run(tx, durable=durable))
        return JobRecord.from_row(row) if row is not None else None

    async def get_job(self, job_id: str) -> JobRecord | None:
        return await jobs.get(self.db, job_id)

    async def list_jobs(self, *, owner: str | None = None, states: Iterable[str] | None = None,
                        limit: int = 100) -> list[JobRecord]:
        return await jobs.listed(self.db, owner, states, limit)

    async def prune_jobs(self, finished_before: float, *, batch: int = 1000) -> int:
        """Delete finished jobs (TERMINAL_STATES) last changed before `finished_before`, in
        transactions of at most `batch` rows so releases are never held up for long; how
        many went. Jobs still queued, running or awaiting approval are never deleted, nor
        is anything a privacy decision rests on (releases, ledger, cohorts, audit). Releases
        made before it keep their decision and charge but drop their partials (kept only to
        re-deliver a job's share, and that job is gone)."""
        while await self._writer.run(releases.drop_partials(finished_before, batch),
                                     durable=False) >= batch:
            pass
        total = 0
        while True:
            deleted = await self._writer.run(jobs.prune(finished_before, batch), durable=False)
            total += deleted
            if deleted < batch:
                return total

    async def count_jobs_by_state(self) -> dict[str, int]:
        """Read from counts kept by triggers: the metrics read them every few seconds, and
        counting the jobs table grows with every job ever run. Deferred rows (a query's
        final state) are committed first, so the counts include them (unless the state
        volume is full: then the counts are what is on disk)."""
        await self._flush_if_room()
        return await jobs.counts_by_state(self.db)

    # -- releases and the privacy ledger ---------------------------------------------

    async def spent(self, researcher: str, catalog: str) -> float:
        return await ledger.spent(self.db, researcher, catalog)

    async def spent_delta(self, researcher: str, catalog: str) -> float:
        return await ledger.spent_delta(self.db, researcher, catalog)

    async def spent_by_catalog(self) -> dict[str, float]:
        return await ledger.spent_by_catalog(self.db)

    async def release(self, release: Release, *, decide: ReleaseRule,
                      audit_actor: tuple[str, str], nonce: NonceClaim | None = None) -> Release:
        """Record a release, charge its epsilon and audit it, in one transaction, if
        `decide` (privacy/release.decide with the site's policy) does not refuse it.

        Idempotent per job: a job released before (e.g. re-run after a crash) returns the
        stored release without charging or deciding again. `decide` reads the ledger
        (records.LedgerView) inside the transaction, so two racing releases cannot both
        pass it. Each cohort the release discloses (`Release.disclosed`) is then recorded,
        and a grouped release's cells as a family. A refusal commits its audit entry (and
        nothing else, but for the sketches of pre-v3 cohorts it had to load) before its
        error is raised. With `nonce`, the request's nonce is remembered first, in this
        transaction; a duplicate raises `Replayed` and nothing is released.
        """
        now = self._clock()
        stored = await compacted(release.partials)
        outcome = await self._writer.run(releases.record(release, decide, audit_actor, nonce,
                                                         now, stored))
        if nonce is not None:
            nonce.consumed = True
            if not isinstance(outcome, Replayed):
                self._nonces.add(nonce.nonce)
        if isinstance(outcome, Exception):
            raise outcome
        return outcome

    @property
    def out_of_space(self) -> bool:
        """The last write failed for want of space on the state volume, and none has
        committed since."""
        return self._writer.out_of_space

    async def stored_bytes(self, researcher: str) -> int:
        """Bytes of answers kept for `researcher`: released partials and job answers, as
        stored (compressed). length() of a BLOB reads its size, not its pages."""
        rows: Any = await self.db.execute_fetchall(
            "SELECT (SELECT coalesce(sum(length(partials)), 0) FROM releases"
            " WHERE researcher = ?) + (SELECT coalesce(sum(length(result)), 0) FROM jobs"
            " WHERE owner = ?)", (researcher, researcher))
        return int(list(rows)[0][0])

    async def get_release(self, job_id: str) -> Release | None:
        return await releases.get(self.db, job_id)

    async def refund(self, job_id: str, *, audit_actor: tuple[str, str], reason: str) -> float:
        """Refund `job_id`'s charge, durably and audited (releases.refund); the ε refunded."""
        return await self._writer.run(releases.refund(job_id, audit_actor, reason,
                                                      self._clock()))

    # -- gossip members, script approvals and the site secret ------------------------

    async def load_members(self) -> list[MemberRecord]:
        return await node.load_members(self.db)

    async def save_members(self, members: Iterable[MemberRecord]) -> None:
        await self._writer.run(node.replace_members(members))

    async def approve_script(self, sha256: str, by: str) -> None:
        await self._writer.run(node.approve_script(sha256, by, self._clock()))

    async def is_script_approved(self, sha256: str) -> bool:
        return await node.is_script_approved(self.db, sha256)

    async def site_secret(self) -> bytes:
        """A per-site random key (e.g. for HMAC'd cohort fingerprints); made on first use."""
        return await self._writer.run(node.site_secret)

    async def installation_id(self) -> str:
        """A random id for this installation (e.g. in container labels); made on first use."""
        return await self._writer.run(node.installation_id)


# Below this a blob is compressed where it is: a thread hop costs more than zlib does.
_INLINE_COMPACT = 64 * 1024


async def compacted(blob: bytes | None) -> bytes | None:
    """`blob` as the store keeps it (blobs.py), compressed off the event loop and off the
    writer's thread when it is large, so neither stalls behind a released map."""
    if blob is None:
        return None
    if len(blob) <= _INLINE_COMPACT:
        return blobs.compact(blob)
    return await asyncio.to_thread(blobs.compact, blob)


def _prepare(path: Path, integrity_check: bool, check_identity: bool,
             conn: sqlite3.Connection) -> None:
    """Pragmas, the integrity check and migrations, on the writer's connection."""
    conn.execute("PRAGMA busy_timeout = 5000")
    conn.execute("PRAGMA journal_mode = WAL")
    conn.execute("PRAGMA synchronous = FULL")
    conn.execute("PRAGMA foreign_keys = ON")
    if integrity_check:
        rows = conn.execute("PRAGMA quick_check").fetchall()
        if [r[0] for r in rows] != ["ok"]:
            raise StoreCorrupt(f"store {path} failed its integrity check ({rows[0][0]}); {RESTORE}")
    _migrate(conn, path)
    if check_identity:
        identity.check_store(path, conn)
        problem = identity.chain_problem(conn)
        if problem is not None:
            raise StoreCorrupt(f"store {path} failed its audit-chain check at start ({problem}); "
                               f"{RESTORE}")


def _check_version(path: Path, version: int) -> None:
    if version > len(MIGRATIONS):
        raise StoreCorrupt(f"store {path} has schema version {version}, newer than this "
                           f"stimnetd understands ({len(MIGRATIONS)}); upgrade stimnetd")


def _migrate(conn: sqlite3.Connection, path: Path) -> None:
    """Apply the migrations the file lacks, each in its own transaction."""
    (version,) = conn.execute("PRAGMA user_version").fetchone()
    _check_version(path, version)
    for i in range(version, len(MIGRATIONS)):
        conn.execute("BEGIN IMMEDIATE")
        try:
            _exec_script(conn, MIGRATIONS[i])
            conn.execute(f"PRAGMA user_version = {i + 1}")
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise


def _exec_script(conn: sqlite3.Connection, script: str) -> None:
    # executescript() would COMMIT the open transaction; run statements one by one instead
    # (a trigger's body holds semicolons: a statement ends where SQLite says it is complete).
    stmt = ""
    for piece in script.split(";"):
        stmt += piece + ";"
        if sqlite3.complete_statement(stmt):
            if stmt.strip(" \n;"):
                conn.execute(stmt)
            stmt = ""
    if stmt.strip(" \n;"):
        raise StoreCorrupt(f"incomplete statement in a migration: {stmt.strip()[:80]}")
