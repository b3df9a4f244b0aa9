"""The store contract suite's fixtures: each test runs against every implementation."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.store.contract import IMPLEMENTATIONS, PostgreSQL, StoreFactory


@pytest.fixture(params=IMPLEMENTATIONS, ids=lambda f: f.name)
def factory(request: pytest.FixtureRequest) -> Iterator[StoreFactory]:
    if not isinstance(request.param, PostgreSQL):
        yield request.param
        return
    bound = request.param.bound(request.getfixturevalue("pg_server"))
    try:
        yield bound
    finally:
        bound.drop_all()


@pytest.fixture
async def store(factory: StoreFactory, tmp_path: Path) -> AsyncIterator[Any]:
    s = await factory.open(tmp_path / "state" / "node.sqlite3")
    try:
        yield s
    finally:
        await s.close()
