"""One write transaction, as the statements inside it see it; and where sqlite3's errors stop.

Every write the store makes is a function of a `Transaction`, run whole on the writer's
thread between `BEGIN IMMEDIATE` and `COMMIT` (store/groupcommit.py). Nothing here awaits.
"""

from __future__ import annotations

import contextlib
import json
import sqlite3
from collections.abc import Callable, Iterator, Mapping
from typing import Any, TypeVar

from stimnet.errors import Conflict, StimnetError, StorageFull
from stimnetd.store.audit import INSERT_ROW, chain_hash

T = TypeVar("T")

# (actor, role, action, decision, detail): one audit entry before it is chained.
AuditEntry = tuple[str, str, str, str, dict[str, Any]]

# What a caller of the store may see of sqlite3: a constraint the write broke (a job id
# taken) is the caller's conflict. Anything else is the store's own failure and stays
# as it is, to be logged as an internal error.
SQLITE_ERRORS: Mapping[type[Exception], type[StimnetError]] = {sqlite3.IntegrityError: Conflict}


@contextlib.contextmanager
def translate(mapping: Mapping[type[Exception], type[StimnetError]]) -> Iterator[None]:
    """Raise the mapped StimnetError (with the library's message) in place of a library's."""
    try:
        yield
    except tuple(mapping) as exc:
        for library, ours in mapping.items():
            if isinstance(exc, library):
                raise ours(str(exc)) from exc
        raise


class Transaction:
    """An open write transaction: its connection (`conn`) and the audit chain's head
    (`seq`, `head`) as this transaction's appends move it. The head is the store's only
    once the transaction has committed."""

    def __init__(self, conn: sqlite3.Connection, seq: int, head: str,
                 clock: Callable[[], float]) -> None:
        self.conn = conn
        self.seq = seq
        self.head = head
        self._clock = clock

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
        """Chain one audit entry; its sequence number."""
        self.conn.execute(INSERT_ROW, self._row(actor, role, action, decision, detail))
        return self.seq

    def append_many(self, entries: list[AuditEntry]) -> None:
        """A group commit's queued entries, in one statement (one per entry costs twice
        as much)."""
        if entries:
            self.conn.executemany(INSERT_ROW, [self._row(*e) for e in entries])


def run_body(fn: Callable[[Transaction], T], tx: Transaction) -> T:
    """`fn(tx)`, with sqlite3's errors translated (SQLITE_ERRORS): the one place they stop."""
    with translate(SQLITE_ERRORS):
        return fn(tx)


def run_deferred(tx: Transaction, fn: Callable[[Transaction], Any]) -> tuple[bool, Any]:
    """One deferred write inside its host's transaction, undone alone if it fails:
    (True, its value) or (False, its exception)."""
    conn, seq, head = tx.conn, tx.seq, tx.head
    conn.execute("SAVEPOINT deferred")
    try:
        value = run_body(fn, tx)
    except Exception as exc:  # noqa: BLE001 - the write's own failure, handed to its caller
        conn.execute("ROLLBACK TO deferred")
        conn.execute("RELEASE deferred")
        tx.seq, tx.head = seq, head  # its audit rows were undone with it
        return False, exc
    conn.execute("RELEASE deferred")
    return True, value


def run_transaction(fn: Callable[[], T], conn: sqlite3.Connection,
                    on_commit: Callable[[], None], durable: bool = True) -> T:
    """BEGIN IMMEDIATE, `fn`, COMMIT (or ROLLBACK if `fn` raises), then `on_commit`, on the
    writer's thread. `durable=False` commits without an fsync (synchronous=NORMAL); the
    pragma cannot change inside a transaction, so it is switched around this one."""
    try:
        if not durable:
            conn.execute("PRAGMA synchronous = NORMAL")
        try:
            conn.execute("BEGIN IMMEDIATE")
            try:
                result = fn()
                conn.execute("COMMIT")
            except BaseException:
                _rollback(conn)
                raise
        finally:
            if not durable:
                conn.execute("PRAGMA synchronous = FULL")
    except sqlite3.OperationalError as exc:
        if is_disk_full(exc):
            # Nothing of this transaction is kept (and its audit entries are queued again by
            # the writer), so whoever waits for it hears that nothing was done.
            raise StorageFull(NO_SPACE) from None
        raise
    on_commit()
    return result


NO_SPACE = ("no space left on the state volume: this node cannot record new work until "
            "its operator frees space (reads, status and audit still work)")


def is_disk_full(exc: sqlite3.Error) -> bool:
    code = getattr(exc, "sqlite_errorcode", None)
    return code == sqlite3.SQLITE_FULL or "disk is full" in str(exc) \
        or "No space left" in str(exc)


def _rollback(conn: sqlite3.Connection) -> None:
    # A COMMIT that failed for want of space may have rolled back already.
    if conn.in_transaction:
        try:
            conn.execute("ROLLBACK")
        except sqlite3.Error:
            pass
