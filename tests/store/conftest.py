"""The store contract suite's fixtures: each test runs against every implementation."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from stimnetd.store import Store
from tests.store.contract import IMPLEMENTATIONS, StoreFactory


@pytest.fixture(params=IMPLEMENTATIONS, ids=lambda f: f.name)
def factory(request: pytest.FixtureRequest) -> StoreFactory:
    return request.param  # type: ignore[no-any-return]


@pytest.fixture
async def store(factory: StoreFactory, tmp_path: Path) -> AsyncIterator[Store]:
    s = await factory.open(tmp_path / "state" / "node.sqlite3")
    try:
        yield s
    finally:
        await s.close()
