"""Group commit: the store's one writer, and the bookkeeping that rides in its transactions.

Every write is one `BEGIN IMMEDIATE … COMMIT` run as a single function on the writer's
thread (store/transaction.py), in the order an asyncio lock admits them, so a check and the
write that depends on it (budget then charge, nonce then accept) are atomic however many
RPCs race. `synchronous=FULL`: a commit that returned is on disk, which the privacy ledger
and the audit chain need (a crash must never un-spend epsilon). Audit entries queued by
`audit_soon` and writes queued by `defer` ride in the next transaction, whichever comes
first: another write's, or the group commit `group_commit_s` later.

The writer has its own thread and `sqlite3.Connection` (a one-thread executor,
`loop.run_in_executor`) instead of running on aiosqlite's. aiosqlite's public API runs one
statement per call (`execute`, `executemany`, …), each a hop to its thread; running a
function there with its `sqlite3.Connection` takes the private `Connection._execute` (or
its queue, `Connection._tx`) and `Connection._conn`. Statement by statement, a release
(nonce, budget, overlap guard, ledger, cohorts, audit) would hold the write lock across a
dozen hops, and the audit chain's head could not move on the database thread right after
COMMIT, which it must even if the awaiting task is cancelled (a stale head makes every
later append collide). aiosqlite serves the reads (`Store.db`): in WAL mode they see every
committed write.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import sqlite3
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

import structlog

from stimnet.errors import StimnetError, StorageFull
from stimnetd.store.audit import GENESIS, SELECT_HEAD
from stimnetd.store.transaction import (
    AuditEntry,
    Transaction,
    run_body,
    run_deferred,
    run_transaction,
)

T = TypeVar("T")

# How long an audit entry of an allowed call, or a deferred write, waits for a transaction
# to ride in before it is committed by itself.
GROUP_COMMIT_S = 0.02

Deferred = tuple[Callable[[Transaction], Any], asyncio.Future[Any]]


class Writer:
    """Runs the store's write transactions, one at a time, on its own thread."""

    def __init__(self, clock: Callable[[], float], group_commit_s: float = GROUP_COMMIT_S) -> None:
        self._clock = clock
        self._group_commit_s = group_commit_s
        self._thread: ThreadPoolExecutor | None = None
        self._conn: sqlite3.Connection | None = None
        self._lock = asyncio.Lock()
        self._seq, self._head = 0, GENESIS
        self._pending_audit: list[AuditEntry] = []
        self._deferred: list[Deferred] = []
        self._flush_task: asyncio.Task[None] | None = None
        # The last transaction failed for want of space (StorageFull), and none has
        # committed since: admission refuses new work at once (store/space.py).
        self.out_of_space = False

    async def open(self, path: Path) -> None:
        """Connect (sqlite3.Error if the file cannot be opened). Call `load_head` once the
        schema is in place."""
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="stimnetd-store")
        try:
            self._conn = await self._on_thread(
                functools.partial(sqlite3.connect, path, isolation_level=None))
        except BaseException:
            self._thread.shutdown(wait=False)
            self._thread = None
            raise

    async def load_head(self) -> None:
        row = await self.call(lambda conn: conn.execute(SELECT_HEAD).fetchone())
        self._seq, self._head = (int(row[0]), row[1]) if row else (0, GENESIS)

    async def close(self) -> None:
        """Commit what is queued, then close; idempotent."""
        if self._conn is None:
            return
        try:
            await self.flush()
        except StorageFull:
            # Closing must not hang or fail on a full volume; what could not be written is
            # said once. Only group-committed entries (of allowed calls, audit_soon) can be
            # queued here: releases, charges and refusals are committed before they answer.
            structlog.get_logger("stimnetd.store").error(
                "state volume full at close: queued audit entries not written",
                lost=len(self._pending_audit), deferred=len(self._deferred))
        finally:
            conn, self._conn = self._conn, None
            try:
                await self._on_thread(conn.close)
            finally:
                if self._thread is not None:
                    self._thread.shutdown(wait=False)
                    self._thread = None

    @property
    def conn(self) -> sqlite3.Connection:
        if self._conn is None:
            raise RuntimeError("store is not open")
        return self._conn

    def _on_thread(self, fn: Callable[[], T]) -> asyncio.Future[T]:
        # Queued at once (not when a task first runs), so calls keep the order they came in.
        return asyncio.get_running_loop().run_in_executor(self._thread, fn)

    async def call(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """`fn(conn)` on the writer's thread outside any transaction (pragmas, checks,
        migrations, which manage their own)."""
        conn = self.conn
        return await self._on_thread(lambda: fn(conn))

    def audit_soon(self, entry: AuditEntry) -> None:
        self._pending_audit.append(entry)
        self._flush_soon()

    def defer(self, fn: Callable[[Transaction], T]) -> asyncio.Future[T]:
        """Run `fn` inside the next transaction, or the group commit's. It runs under a
        savepoint, so its failure (the future's exception) undoes only its own statements
        and audit entries, never its host's."""
        fut: asyncio.Future[T] = asyncio.get_running_loop().create_future()
        self._deferred.append((fn, fut))
        self._flush_soon()
        return fut

    def _flush_soon(self) -> None:
        if self._flush_task is None or self._flush_task.done():
            self._flush_task = asyncio.get_running_loop().create_task(self._flush_later())

    async def _flush_later(self) -> None:
        await asyncio.sleep(self._group_commit_s)
        try:
            await self.flush()
        except StorageFull:
            # Queued still; retried by the next write. One line, not a traceback per entry.
            structlog.get_logger("stimnetd.store").warning(
                "audit group commit waits for space on the state volume",
                queued=len(self._pending_audit))
        except Exception:  # noqa: BLE001 - entries stay queued; the next write retries them
            structlog.get_logger("stimnetd.store").exception("audit group commit failed")

    async def flush(self) -> None:
        """Commit what is queued (audit entries, deferred writes) now: also what a commit
        in flight took from the queue, so a read after `flush` sees every entry queued
        before it (the group commit may have taken them a moment ago)."""
        if self._lock.locked() and not (self._pending_audit or self._deferred):
            async with self._lock:
                pass
        if (self._pending_audit or self._deferred) and self._conn is not None:
            # Durable when it carries audit entries; deferred rows alone are bookkeeping.
            await self.run(lambda tx: None, durable=bool(self._pending_audit), flush=True)

    async def run(self, fn: Callable[[Transaction], T], *, durable: bool = True,
                  flush: bool = False) -> T:
        """Run `fn` as one transaction, with the queued audit entries and deferred writes.

        `durable=False` is for bookkeeping no privacy decision rests on (a query job's row):
        its commit skips the fsync. In WAL mode commits reach the disk in order, so the next
        durable commit makes it durable too; a power cut before that loses only the row,
        never a release, a charge or a later audit entry, and the audit chain stays a
        consistent prefix. `flush`: this is the group commit itself (`fn` does nothing)."""
        async with self._lock:
            pending, self._pending_audit = self._pending_audit, []
            deferred, self._deferred = self._deferred, []
            outcomes: list[tuple[bool, Any]] = []
            tx = Transaction(self.conn, self._seq, self._head, self._clock)
            committed = False

            def body() -> T:
                # The head as the previous transaction on this thread left it: read here,
                # not when `tx` was made, so no interleaving of the event loop's tasks can
                # hand this transaction a stale head (a UNIQUE audit.seq at the next append).
                tx.seq, tx.head = self._seq, self._head
                tx.append_many(pending)
                outcomes[:] = [run_deferred(tx, d) for d, _ in deferred]
                return run_body(fn, tx)

            def on_commit() -> None:
                # On the writer's thread right after COMMIT, so the head moves with the data
                # even if the awaiting task is cancelled meanwhile (a client hanging up).
                nonlocal committed
                self._seq, self._head = tx.seq, tx.head
                committed = True
                self.out_of_space = False

            task = self._on_thread(
                functools.partial(run_transaction, body, tx.conn, on_commit, durable))
            try:
                return await asyncio.shield(task)
            except StorageFull:
                self.out_of_space = True
                raise
            except asyncio.CancelledError:
                # Keep the write lock until the database is done with this transaction,
                # however often the caller is cancelled meanwhile (a shutdown cancels
                # in-flight handlers, then the loop's teardown cancels what is left):
                # released early, the next transaction would start before this one ended
                # and requeue audit entries this one is committing.
                while not task.done():
                    with contextlib.suppress(asyncio.CancelledError):
                        await asyncio.wait([task])
                raise
            finally:
                if not committed:
                    self._pending_audit[:0] = pending
                self._settle(deferred, outcomes if committed else None, task, flush)

    def _settle(self, deferred: list[Deferred], outcomes: list[tuple[bool, Any]] | None,
                task: asyncio.Future[Any], flush: bool) -> None:
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
