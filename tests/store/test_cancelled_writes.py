"""A write whose caller is cancelled, even again and again (a shutdown cancels in-flight
handlers, then the loop's own teardown cancels what is left), still commits or rolls back
whole before any later write starts, and the audit chain's head moves with it."""

from __future__ import annotations

import asyncio
import threading

import pytest

from stimnetd.store import Store
from tests.store.contract import SQLITE_IMPLEMENTATIONS, StoreFactory


@pytest.fixture(params=SQLITE_IMPLEMENTATIONS, ids=lambda f: f.name)
def factory(request: pytest.FixtureRequest) -> StoreFactory:
    """SQLite only: its writer thread."""
    return request.param  # type: ignore[no-any-return]


async def test_a_write_cancelled_twice_does_not_stale_the_next_ones_head(store: Store) -> None:
    await store.audit("ops", "admin", "before", "ok")
    gate = threading.Event()
    # Holds the writer's thread, so the audited write below is queued behind it.
    busy = asyncio.ensure_future(store._writer.call(lambda conn: gate.wait(10)))  # noqa: SLF001
    first = asyncio.ensure_future(store.audit("ops", "admin", "cancelled-twice", "ok"))
    await asyncio.sleep(0.05)
    first.cancel()
    await asyncio.sleep(0.01)
    first.cancel()  # interrupts the wait for the transaction already handed to the thread
    await asyncio.sleep(0.01)
    after = asyncio.ensure_future(store.audit("ops", "admin", "after", "ok"))
    await asyncio.sleep(0.05)
    gate.set()
    await busy
    seq = await asyncio.wait_for(after, timeout=10)
    await asyncio.gather(first, return_exceptions=True)
    rows = await store.audit_rows()
    assert [r.action for r in rows][-3:] == ["before", "cancelled-twice", "after"]
    assert seq == rows[-1].seq
    assert (await store.verify_audit()).ok
