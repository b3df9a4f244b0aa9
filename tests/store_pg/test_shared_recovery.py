"""A replica's start-up recovery on the shared PostgreSQL store touches only what no live
replica holds: a script job under another replica's live lease and a running query are
left alone, one whose lease ran out is re-queued (or interrupted) per `on_restart`, and
queued script jobs are offered to this replica's runner, where the claim decides who runs
each (exactly one of two claimers)."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator
from typing import Any

import pytest

from stimnetd.jobs import lease
from stimnetd.jobs.recovery import recover
from stimnetd.site.policy import ScriptPolicy
from stimnetd.store.pg import PgStore
from tests.store.contract import job_row


@dataclasses.dataclass
class StartedJobs:
    """Stands in for the JobRunner: notes which jobs recovery starts."""

    started: list[str] = dataclasses.field(default_factory=list)

    def start(self, record: Any, job: Any) -> None:
        self.started.append(record.id)


@pytest.fixture
async def store(pg_url: str) -> AsyncIterator[PgStore]:
    s = PgStore(pg_url)
    await s.open()
    try:
        yield s
    finally:
        await s.close()


@pytest.mark.parametrize(("on_restart", "expired_state"), [("requeue", "queued"),
                                                           ("interrupt", "interrupted")])
async def test_recovery_leaves_live_replicas_jobs_alone(store: PgStore, on_restart: str,
                                                        expired_state: str) -> None:
    """Live lease and running query untouched; expired lease recovered per policy; queued
    script jobs (and a re-queued one) offered to the runner."""
    for job in ("live", "expired", "waiting"):
        await store.create_job(job_row(job, kind="script", state="queued"))
    await store.create_job(job_row("query", state="running"))
    assert await store.claim_job("live", "replica-a", lease_s=600.0) is not None
    assert await store.claim_job("expired", "replica-b", lease_s=-1.0) is not None
    runner = StartedJobs()
    interrupted = await recover(store, runner, ScriptPolicy(on_restart=on_restart),  # type: ignore[arg-type]
                                restore=lambda record: record)
    states = {j: (await store.get_job(j)).state for j in ("live", "expired", "waiting", "query")}  # type: ignore[union-attr]
    assert states == {"live": "running", "expired": expired_state, "waiting": "queued",
                      "query": "running"}
    assert interrupted == (expired_state == "interrupted")
    assert sorted(runner.started) == sorted(["waiting"] + (["expired"] if expired_state == "queued"
                                                           else []))


async def test_of_two_replicas_claiming_one_queued_job_one_runs_it(store: PgStore) -> None:
    """Both replicas offered the same queued job: exactly one claim succeeds, and the lease
    it holds is renewable by it alone."""
    await store.create_job(job_row("j", kind="script", state="queued"))
    claims = await asyncio.gather(store.claim_job("j", "replica-a", 30.0),
                                  store.claim_job("j", "replica-b", 30.0))
    winners = [c.state for c in claims if c is not None]
    assert winners == ["running"]
    holder = "replica-a" if claims[0] is not None else "replica-b"
    other = "replica-b" if holder == "replica-a" else "replica-a"
    assert await store.renew_lease("j", holder, 30.0)
    assert not await store.renew_lease("j", other, 30.0)


async def test_a_held_job_keeps_its_lease_renewed(store: PgStore) -> None:
    """While inside `lease.held`, this replica's lease is renewed, so it never expires
    under a recovering replica; after it, renewal stops."""
    await store.create_job(job_row("j", kind="script", state="queued"))
    assert await store.claim_job("j", lease.REPLICA, lease_s=1.5) is not None
    async with lease.held(store, "j", lease_s=1.5):
        for _ in range(4):
            await asyncio.sleep(0.5)
            assert await store.recover_expired("interrupt", by="replica-b") == []
    await asyncio.sleep(2.0)
    assert await store.recover_expired("interrupt", by="replica-b") == ["j"]
