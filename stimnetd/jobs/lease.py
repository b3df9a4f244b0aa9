"""A script job's hold on the queue that a site's replicas share (a PostgreSQL store:
store/pg_jobs.py). The replica whose slot frees first claims a queued job (`claim_job`,
queued → running in one statement, so one replica runs it) and renews its lease while it
runs; a job whose lease ran out is its replica's that stopped (jobs/recovery.py). On the
SQLite store, one process per node, there is no lease."""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import socket
from collections.abc import AsyncIterator

import structlog

from stimnetd.store import SiteStore
from stimnetd.store.contract import SharedQueue

log = structlog.get_logger("stimnetd.jobs")

LEASE_S = 30.0
# This process among the site's replicas (hostname and pid for the operator reading rows).
REPLICA = f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(4)}"


def shared(store: SiteStore) -> SharedQueue | None:
    """`store` as a queue replicas share, or None (the SQLite store)."""
    return store if isinstance(store, SharedQueue) else None


@contextlib.asynccontextmanager
async def held(queue: SharedQueue, job_id: str, lease_s: float = LEASE_S) -> AsyncIterator[None]:
    """Renew this replica's lease on `job_id` every third of `lease_s` while inside."""
    task = asyncio.create_task(_renew(queue, job_id, lease_s), name=f"lease-{job_id}")
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def _renew(queue: SharedQueue, job_id: str, lease_s: float) -> None:
    while True:
        await asyncio.sleep(lease_s / 3)
        try:
            if not await queue.renew_lease(job_id, REPLICA, lease_s):
                log.warning("job lease lost: another replica recovered it", job=job_id)
                return
        except Exception:  # noqa: BLE001 - a missed renewal is retried; two cost the lease
            log.exception("job lease renewal failed", job=job_id)
