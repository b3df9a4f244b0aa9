"""What the store contract suite runs against, and the records its tests build.

Every test in tests/store takes the `store` (or `factory`) fixture, which is parametrized
over the implementations below, so each test runs against each (Flower's StateTest: one
abstract factory, a subclass per implementation).

SQLite `:memory:` is not one of them: the store's reads and its writer use two connections
(store/groupcommit.py), and each connection to `:memory:` is a database of its own. The
SQLite implementations are the two ways a store file comes to be: made fresh at the current
schema, or written by the first schema and upgraded in place by the migrations. The third
is the PostgreSQL store (store/pg.py) on a real server (tests/store_pg/fixtures.py), a
database per store path a test opens. Every verb must behave the same on all three. What
only a file has (WAL mode, mode 0600, the group-commit writer, corruption checks, a file
backup) is tested on the SQLite implementations alone: those modules override `factory`
with `SQLITE_IMPLEMENTATIONS`.
"""

from __future__ import annotations

import abc
import dataclasses
import functools
import sqlite3
from pathlib import Path
from typing import Any

from stimnetd.privacy.policy import PrivacyPolicy
from stimnetd.privacy.release import decide
from stimnetd.store import Store
from stimnetd.store.pg import PgStore
from stimnetd.store.records import (
    Disclosed,
    JobRecord,
    LedgerView,
    RefusalRecord,
    Release,
    ReleaseRule,
    cohort_digest,
)
from stimnetd.store.schema import MIGRATIONS

ALICE = ("alice", "researcher")


class StoreFactory(abc.ABC):
    """Opens a store at a path, first making the file there if there is none."""

    name: str

    @abc.abstractmethod
    def make_file(self, path: Path) -> None:
        """Leave the implementation's kind of store file at `path` (which does not exist)."""

    async def open(self, path: Path, **kwargs: Any) -> Any:
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            self.make_file(path)
        store = Store(path, **kwargs)
        await store.open()
        return store

    async def rows(self, store: Any, sql: str) -> list[tuple[Any, ...]]:
        """What `sql` (portable SQL) reads from `store`, behind the store's back."""
        return [tuple(r) for r in await store.db.execute_fetchall(sql)]

    async def run(self, store: Any, sql: str) -> None:
        """Change `store` with `sql` (portable SQL) behind the store's back."""
        await store.db.execute(sql)


class FreshFile(StoreFactory):
    """A store the Store itself creates: the current schema from the start."""

    name = "fresh-file"

    def make_file(self, path: Path) -> None:
        return None


class UpgradedFromFirstSchema(StoreFactory):
    """A file written by the first schema (in WAL mode), which opening migrates in place."""

    name = "upgraded-from-schema-1"

    def make_file(self, path: Path) -> None:
        write_first_schema(path)


def write_first_schema(path: Path) -> sqlite3.Connection:
    """A store file at schema version 1; the open connection, for adding rows."""
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA journal_mode = WAL")
    for stmt in MIGRATIONS[0].split(";"):
        if stmt.strip():
            conn.execute(stmt)
    conn.execute("PRAGMA user_version = 1")
    return conn


class PostgreSQL(StoreFactory):
    """A PostgreSQL store: a fresh database for each store path a test opens (the same
    one again when it reopens a path), dropped after the test (`bound`, `drop_all`)."""

    name = "postgresql"

    def __init__(self, server: Any = None) -> None:
        self._server = server
        self._urls: dict[Path, str] = {}

    def bound(self, server: Any) -> PostgreSQL:
        return PostgreSQL(server)

    def make_file(self, path: Path) -> None:
        return None

    async def open(self, path: Path, **kwargs: Any) -> Any:
        from tests.store_pg.fixtures import new_database

        if path not in self._urls:
            self._urls[path] = new_database(self._server)
        store = PgStore(self._urls[path], **kwargs)
        await store.open()
        return store

    async def rows(self, store: Any, sql: str) -> list[tuple[Any, ...]]:
        return [tuple(r) for r in await store.pool.fetch(sql)]

    async def run(self, store: Any, sql: str) -> None:
        await store.pool.execute(sql)

    def drop_all(self) -> None:
        from tests.store_pg.fixtures import drop_database

        for url in self._urls.values():
            drop_database(self._server, url)


SQLITE_IMPLEMENTATIONS: list[StoreFactory] = [FreshFile(), UpgradedFromFirstSchema()]
IMPLEMENTATIONS: list[StoreFactory] = [*SQLITE_IMPLEMENTATIONS, PostgreSQL()]


def rules(*, budget: float = 1.0, k_min: int | None = None) -> ReleaseRule:
    """The site's release rules: the budget, and the overlap guard when `k_min` is given."""
    policy = PrivacyPolicy(k_min=k_min or 5, budget_epsilon=budget)
    return functools.partial(decide, policy=policy, overlap_guard=k_min is not None)


@dataclasses.dataclass
class LoggedView:
    """A store's LedgerView that keeps what each `near_cohorts` returned."""

    view: LedgerView
    seen: list[list[frozenset[str]]]

    def spent(self) -> float:
        return self.view.spent()

    def spent_delta(self) -> float:
        return self.view.spent_delta()

    def catalog_spent(self) -> float:
        return self.view.catalog_spent()

    def near_cohorts(self, members: frozenset[str], digest: str,
                     window: int) -> list[frozenset[str]]:
        near = self.view.near_cohorts(members, digest, window)
        self.seen.append(near)
        return near

    def near_families(self, atoms: Disclosed, window: int) -> list[list[frozenset[str]]]:
        return self.view.near_families(atoms, window)


def logged(rule: ReleaseRule, seen: list[list[frozenset[str]]]) -> ReleaseRule:
    """`rule`, noting in `seen` the earlier cohorts the store handed it."""

    def run(view: LedgerView, release: Release) -> RefusalRecord | None:
        return rule(LoggedView(view, seen), release)

    return run


def release(job: str, eps: float | None = None,
            cohort: frozenset[str] = frozenset({"a"})) -> Release:
    return Release(job_id=job, researcher="alice", catalog="c", decision="released", epsilon=eps,
                   cohort=cohort, partials=b"p", at=1.0)


def disclosing(job: str, *cohorts: str) -> Release:
    """A release disclosing each of `cohorts` (one letter a subject)."""
    sets = [frozenset(c) for c in cohorts]
    return dataclasses.replace(release(job, cohort=frozenset().union(*sets)),
                               guarded=tuple((c, cohort_digest(c)) for c in sets))


def grouped(job: str, *cells: frozenset[str]) -> Release:
    """A grouped release as the site builds it: each cell and their union disclosed, the
    cells as its atoms."""
    union = frozenset().union(*cells)
    disclosed = [(c, cohort_digest(c)) for c in cells]
    if len(cells) > 1:
        disclosed.append((union, cohort_digest(union)))
    return dataclasses.replace(release(job, cohort=union), guarded=tuple(disclosed),
                               atoms=tuple(disclosed[:len(cells)]) if len(cells) > 1 else ())


def job_row(job_id: str, *, kind: str = "query", scope: str = "local", state: str = "running",
            at: float = 1.0, owner: str = "alice", request_id: str = "r") -> JobRecord:
    return JobRecord(id=job_id, kind=kind, scope=scope, catalog="c", owner=owner, state=state,
                     detail="", created_at=at, updated_at=at, request_id=request_id,
                     origin="client", payload=b"{}", signature=b"", signer_cert=b"",
                     script=b"x" * 1000 if kind == "script" else None,
                     script_sha256="0" * 64 if kind == "script" else "")


async def job_ids(store: Any) -> set[str]:
    return {r.id for r in await store.list_jobs(limit=100)}
