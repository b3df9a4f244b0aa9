"""Fixtures for the PostgreSQL store: one real server per test session (pgserver.py), a
fresh database per test. Without server binaries the tests skip locally and FAIL under
CI=true. Registered for every test directory by tests/conftest.py (the store contract
suite, tests/store_pg and the daemon tests use them)."""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
import uuid
from collections.abc import Iterator

import asyncpg
import pytest

from tests.store_pg.pgserver import PgServer


@pytest.fixture(scope="session")
def pg_server() -> Iterator[PgServer]:
    try:
        server = PgServer.start()
    except (FileNotFoundError, OSError) as exc:
        message = f"no PostgreSQL server could be started: {exc}"
        if os.environ.get("CI") == "true":
            pytest.fail(message + " (CI=true: the PostgreSQL store tests must run)")
        pytest.skip(message)
    except Exception as exc:  # noqa: BLE001 - initdb/pg_ctl failures carry their output
        message = f"PostgreSQL failed to start: {exc} {getattr(exc, 'stderr', b'')!r}"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    try:
        yield server
    finally:
        server.stop()


def admin(server: PgServer, sql: str) -> None:
    """One statement on the server's `postgres` database, on a loop of its own (the
    fixture that asks is sync, so both sync and async fixtures can use it)."""

    async def run() -> None:
        conn = await asyncpg.connect(server.url("postgres"))
        try:
            await conn.execute(sql)
        finally:
            await conn.close()

    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        pool.submit(asyncio.run, run()).result(timeout=60)


@pytest.fixture
def pg_url(pg_server: PgServer) -> Iterator[str]:
    """A fresh database on the session's server, dropped after the test."""
    name = f"t_{uuid.uuid4().hex[:12]}"
    admin(pg_server, f"CREATE DATABASE {name}")
    try:
        yield pg_server.url(name)
    finally:
        admin(pg_server, f"DROP DATABASE {name} WITH (FORCE)")


def new_database(server: PgServer) -> str:
    """A fresh database on `server`, its URL (the caller drops it: `drop_database`)."""
    name = f"t_{uuid.uuid4().hex[:12]}"
    admin(server, f"CREATE DATABASE {name}")
    return server.url(name)


def drop_database(server: PgServer, url: str) -> None:
    admin(server, f"DROP DATABASE {url.rsplit('/', 1)[1]} WITH (FORCE)")
