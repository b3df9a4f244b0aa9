"""The SQLite store's release-rule reads and cohort bookkeeping, run on a PostgreSQL
transaction.

A release rule (privacy/release.decide) is synchronous and reads the ledger and the cohort
history through a `LedgerView` while it decides, inside the release's transaction. The
overlap guard and exact auditing (store/cohorts.py, store/linear.py, store/ledger.py) are
written against a DB-API connection. Rather than keep a second copy of that privacy logic,
which could come to decide differently, the PostgreSQL store runs the same functions in a
worker thread over `SyncConnection`: each statement is handed to the event loop, which runs
it on the release's asyncpg connection (the loop is free: it is awaiting that thread).

Only the statements those modules issue are translated (`?` placeholders, and the two
SQLite upserts named in `_UPSERTS`); any other SQLite-only form raises, so a new one cannot
silently mean something else on PostgreSQL.
"""

from __future__ import annotations

import asyncio
import functools
import re
from collections.abc import Iterator
from typing import Any

import asyncpg

from stimnet.errors import StimnetError

# SQLite upsert → PostgreSQL, per table: (conflict target, what a REPLACE overwrites).
_UPSERTS = {
    "cohort_sketches": ("researcher, catalog, digest", "sketch = EXCLUDED.sketch"),
    "cohort_families": ("researcher, catalog, digest", None),
}
_UPSERT = re.compile(r"^\s*INSERT OR (IGNORE|REPLACE) INTO (\w+)")
_SQLITE_ONLY = re.compile(r"\browid\b|\bINSERT OR\b|\bPRAGMA\b", re.IGNORECASE)


class UntranslatedStatement(StimnetError):
    code = "INTERNAL"


@functools.lru_cache(maxsize=256)
def translate(sql: str) -> str:
    """`sql` (as store/cohorts.py, linear.py and ledger.py write it) for PostgreSQL."""
    # linear_cohorts keeps its insertion order in `id` (PostgreSQL has no rowid).
    sql = sql.replace("ORDER BY l.rowid", "ORDER BY l.id")
    upsert = _UPSERT.match(sql)
    if upsert is not None:
        kind, table = upsert.groups()
        if table not in _UPSERTS:
            raise UntranslatedStatement(f"no PostgreSQL form for INSERT OR {kind} on {table}")
        target, replace = _UPSERTS[table]
        sql = sql[:upsert.start()] + f"INSERT INTO {table}" + sql[upsert.end():]
        action = f"DO UPDATE SET {replace}" if kind == "REPLACE" and replace else "DO NOTHING"
        sql += f" ON CONFLICT ({target}) {action}"
    if _SQLITE_ONLY.search(sql):
        raise UntranslatedStatement(f"statement has no PostgreSQL form here: {sql[:80]}")
    parts = sql.split("?")
    out = parts[0]
    for i, part in enumerate(parts[1:], start=1):
        out += f"${i}{part}"
    return out


class Rows:
    """What `SyncConnection.execute` returns: the rows as tuples, and the row count."""

    def __init__(self, rows: list[tuple[Any, ...]], rowcount: int) -> None:
        self._rows = rows
        self.rowcount = rowcount

    def fetchone(self) -> tuple[Any, ...] | None:
        return self._rows[0] if self._rows else None

    def fetchall(self) -> list[tuple[Any, ...]]:
        return list(self._rows)

    def __iter__(self) -> Iterator[tuple[Any, ...]]:
        return iter(self._rows)


class SyncConnection:
    """A blocking `execute(sql, params)` over an asyncpg connection, for a worker thread
    while the event loop `loop` awaits that thread."""

    def __init__(self, conn: asyncpg.Connection, loop: asyncio.AbstractEventLoop) -> None:
        self._conn = conn
        self._loop = loop

    def execute(self, sql: str, params: tuple[Any, ...] = ()) -> Rows:
        return asyncio.run_coroutine_threadsafe(self._run(translate(sql), params),
                                                self._loop).result()

    async def _run(self, sql: str, params: tuple[Any, ...]) -> Rows:
        if sql.lstrip().upper().startswith("SELECT") or " RETURNING " in sql.upper():
            rows = [tuple(r) for r in await self._conn.fetch(sql, *params)]
            return Rows(rows, len(rows))
        status = await self._conn.execute(sql, *params)
        tail = status.rsplit(" ", 1)[-1]
        return Rows([], int(tail) if tail.isdigit() else 0)
