"""A query's job row is bookkeeping kept off the answer's path: the fan-out does not wait
for the row to be created, the answer is shown before its final state is written, and
readers see the job from memory meanwhile; replays are still refused."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pandas as pd
import pytest

from stimnet import codec
from stimnet.errors import Conflict
from stimnet.pki import Identity
from stimnet.query.sql import parse_sql
from stimnet.signing import JobRequest, SignedJob, VerifiedJob
from stimnetd.federation.fanout import FanoutResult
from stimnetd.jobs.service import JobService, JobUpdate
from stimnetd.query.engine import compute
from stimnetd.site import SiteOutcome
from stimnetd.store import Store
from tests.unit.fakes import FakeCatalog, numeric

ALICE = Identity(name="alice", role="researcher", serial=1,
                 not_after=datetime.now(UTC) + timedelta(days=1))
SPEC = parse_sql("SELECT count(*), avg(x) FROM c")
CATALOG = FakeCatalog(pd.DataFrame({"x": [float(v) for v in range(12)]}),
                      {"x": numeric("x", 0, 20)}, name="c")


class _Coordinator:
    """Answers for one site at once, noting whether the job's row existed by then."""

    def __init__(self, store: Store) -> None:
        self._store = store
        self.started = asyncio.Event()
        self.row_when_run: list[bool] = []

    def holds_catalog(self, catalog: str) -> bool:
        return True

    async def run(self, job: VerifiedJob, *_: Any, **__: Any) -> FanoutResult:
        self.started.set()
        self.row_when_run.append(await self._store.get_job(job.request.job_id) is not None)
        partials = compute(SPEC, CATALOG).partials
        return FanoutResult([SiteOutcome("site-a", "done", n=12, partials=partials)])


class _Gate:
    """Holds one store method's calls until opened."""

    def __init__(self, store: Store, method: str) -> None:
        self.open = asyncio.Event()
        self.waiting = asyncio.Event()
        original = getattr(store, method)

        async def gated(*args: Any, **kwargs: Any) -> Any:
            self.waiting.set()
            await self.open.wait()
            return await original(*args, **kwargs)
        setattr(store, method, gated)


def _signed(nonce: str = "n" * 32) -> SignedJob:
    req = JobRequest(kind="query", catalog="c", scope="federated", spec=SPEC.to_dict(),
                     issued_at=time.time(), nonce=nonce, entry="node-a")
    return SignedJob(req.to_payload(), b"sig", b"cert")


def _service(store: Store) -> tuple[JobService, _Coordinator]:
    coordinator = _Coordinator(store)
    jobs = JobService(node="node-a", store=store, site=None,  # type: ignore[arg-type]
                      fanout=coordinator,  # type: ignore[arg-type]
                      verify=lambda s: VerifiedJob(JobRequest.from_payload(s.payload), ALICE, s))
    return jobs, coordinator


async def _final(jobs: JobService, job_id: str) -> JobUpdate:
    async for update in jobs.watch(job_id, ALICE):
        if update.kind == "state" and update.job is not None and update.job.terminal:
            return update
    raise AssertionError("the watch ended without a final state")


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[Store]:
    node = Store(tmp_path / "node.sqlite3")
    await node.open()
    try:
        yield node
    finally:
        await asyncio.sleep(0.05)  # writes still under way (a query's final state)
        await node.close()


@pytest.fixture
def gate(store: Store) -> Iterator[Callable[[str], _Gate]]:
    """Holds a store method's calls; every gate opens at the end, so the store can close."""
    gates: list[_Gate] = []

    def make(method: str) -> _Gate:
        gates.append(_Gate(store, method))
        return gates[-1]
    yield make
    for g in gates:
        g.open.set()


async def test_the_fan_out_starts_before_the_querys_row_is_written(
        store: Store, gate: Callable[[str], _Gate]) -> None:
    """The sites are asked while the row is still being created; the job is readable from
    memory meanwhile, and its answer waits for the row (a replay must be ruled out first)."""
    held = gate("create_job")
    jobs, coordinator = _service(store)
    record = await asyncio.wait_for(jobs.submit(_signed(), ALICE, "r1", follow=True), 5)
    final = asyncio.ensure_future(_final(jobs, record.id))
    await asyncio.wait_for(coordinator.started.wait(), 5)
    await asyncio.sleep(0.05)
    assert (held.waiting.is_set(), coordinator.row_when_run) == (True, [False])
    assert (await jobs.get(record.id, ALICE)).state == "running"
    # Listed too (as GetJob shows it), though the store has no row yet.
    assert [(r.id, r.state) for r in await jobs.list(ALICE, 10)] == [(record.id, "running")]
    assert await store.list_jobs() == []
    assert final.done() is False
    held.open.set()
    update = await asyncio.wait_for(final, 5)
    assert update.job is not None and update.job.state == "succeeded"


async def test_a_querys_answer_is_shown_before_its_final_state_is_written(
        store: Store, gate: Callable[[str], _Gate]) -> None:
    """Watchers get the final state and answer while the row still says 'running';
    GetJob and GetResult show them from memory until the write lands, then from the store."""
    held = gate("update_job")
    jobs, _ = _service(store)
    record = await jobs.submit(_signed(), ALICE, "r1", follow=True)
    update = await asyncio.wait_for(_final(jobs, record.id), 5)
    assert update.job is not None and update.job.state == "succeeded"
    assert update.result is not None
    doc, _arrays = codec.unpack(update.result)
    assert doc["result"]["rows"] == [[12, 5.5]]
    await held.waiting.wait()
    stored = await store.get_job(record.id)
    assert stored is not None and stored.state == "running"
    shown = await jobs.get(record.id, ALICE)
    assert shown.state == "succeeded" and [s["site"] for s in shown.sites] == []
    assert [(r.id, r.state) for r in await jobs.list(ALICE, 10)] == [(record.id, "succeeded")]
    bob = Identity(name="bob", role="researcher", serial=2, not_after=ALICE.not_after)
    assert await jobs.list(bob, 10) == []  # another researcher's job, even from memory
    assert await jobs.result(record.id, ALICE) == update.result
    held.open.set()
    task = getattr(jobs._hub.get(record.id), "task", None)
    if task is not None:
        await asyncio.wait_for(task, 5)
    stored = await store.get_job(record.id)
    assert stored is not None and stored.state == "succeeded"
    assert stored.result == update.result
    assert (await jobs.get(record.id, ALICE)).state == "succeeded"


async def test_a_querys_stream_ends_with_its_final_state_not_its_final_write(
        store: Store, gate: Callable[[str], _Gate]) -> None:
    """Nothing follows a final state, so a watcher's stream (RunJob's) ends there: its
    status goes out while the row's write is still held."""
    held = gate("update_job")
    jobs, _ = _service(store)
    record = await jobs.submit(_signed(), ALICE, "r1", follow=True)

    async def kinds() -> list[str]:
        return [u.kind for u in [u async for u in jobs.watch(record.id, ALICE, record)]]

    assert await asyncio.wait_for(kinds(), 5) == ["state"]
    assert (held.waiting.is_set(), held.open.is_set()) == (True, False)
    stored = await store.get_job(record.id)
    assert stored is not None and stored.state == "running"


async def test_a_watcher_joining_a_finished_query_gets_one_final_state_with_its_answer(
        store: Store) -> None:
    """As a live job's end: the final state, listing its sites, carries the answer; no
    separate site or result updates follow it."""
    jobs, _ = _service(store)
    record = await jobs.submit(_signed(), ALICE, "r1", follow=True)
    ended = await asyncio.wait_for(_final(jobs, record.id), 5)
    task = getattr(jobs._hub.get(record.id), "task", None)
    if task is not None:
        await asyncio.wait_for(task, 5)
    updates = [u async for u in jobs.watch(record.id, ALICE)]
    assert [u.kind for u in updates] == ["state"]
    assert updates[0].job is not None and updates[0].job.state == "succeeded"
    assert updates[0].result == ended.result and updates[0].result is not None


async def test_a_replayed_query_is_refused_at_once_even_before_its_row_exists(
        store: Store, gate: Callable[[str], _Gate]) -> None:
    """The same signed query twice, the second before the first's row is written: the
    second is refused as a replay at submit, from memory."""
    held = gate("create_job")
    jobs, _ = _service(store)
    record = await asyncio.wait_for(jobs.submit(_signed(), ALICE, "r1", follow=True), 5)
    with pytest.raises(Conflict, match="replayed request"):
        await jobs.submit(_signed(), ALICE, "r2", follow=True)
    held.open.set()
    update = await asyncio.wait_for(_final(jobs, record.id), 5)
    assert update.job is not None and update.job.state == "succeeded"


async def test_a_submitted_querys_row_exists_when_its_id_is_returned(store: Store) -> None:
    """SubmitJob acknowledges a job id the researcher may follow later: the row is written
    first (a crash right after must not lose it), even for a query."""
    jobs, _ = _service(store)
    record = await jobs.submit(_signed(), ALICE, "r1")
    assert await store.get_job(record.id) is not None
    await asyncio.wait_for(_final(jobs, record.id), 5)


async def test_a_replay_after_a_restart_is_refused_at_once(tmp_path: Path) -> None:
    """The store reloads the nonces it remembers when it opens: after a restart the same
    signed query is still refused at submit, and the first submission's row is untouched."""
    path = tmp_path / "node.sqlite3"
    store = Store(path)
    await store.open()
    jobs, _ = _service(store)
    first = await jobs.submit(_signed(), ALICE, "r1", follow=True)
    assert (await asyncio.wait_for(_final(jobs, first.id), 5)).result is not None
    await asyncio.sleep(0.05)  # the first's final write
    await store.close()
    store = Store(path)
    await store.open()
    try:
        jobs, _ = _service(store)
        with pytest.raises(Conflict, match="replayed request"):
            await jobs.submit(_signed(), ALICE, "r2", follow=True)
        stored = await store.get_job(first.id)
        assert stored is not None and (stored.state, stored.request_id) == ("succeeded", "r1")
    finally:
        await store.close()


async def test_a_replay_only_the_database_knows_fails_without_an_answer(
        tmp_path: Path) -> None:
    """A nonce written to the database behind this node's back (not in its memory): the
    row's creation refuses it, and the job fails as a replay with no answer shown."""
    path = tmp_path / "node.sqlite3"
    store, other = Store(path), Store(path)
    await store.open()
    await other.open()
    try:
        first = await _service(other)[0].submit(_signed(), ALICE, "r1")
        await asyncio.sleep(0.05)  # its row
        jobs, _ = _service(store)
        again = await jobs.submit(_signed(), ALICE, "r2", follow=True)
        update = await asyncio.wait_for(_final(jobs, again.id), 5)
        assert update.job is not None and update.job.state == "failed"
        assert update.job.detail.startswith("replayed request") and update.result is None
        stored = await store.get_job(first.id)
        assert stored is not None and stored.request_id == "r1"
    finally:
        await asyncio.sleep(0.05)
        await other.close()
        await store.close()


async def test_a_query_whose_row_cannot_be_written_fails_from_memory(store: Store) -> None:
    """The row's creation raising (a database error, not a replay) fails the job: its
    watchers get the failure, with no answer, and nothing tries to mark a missing row."""
    async def broken(*_: Any, **__: Any) -> bool:
        raise OSError("disk I/O error")
    store.create_job = broken  # type: ignore[method-assign]
    jobs, _ = _service(store)
    record = await jobs.submit(_signed(), ALICE, "r1", follow=True)
    update = await asyncio.wait_for(_final(jobs, record.id), 5)
    assert update.job is not None and update.result is None
    assert (update.job.state, update.job.detail) == (
        "failed", "internal error (see the node's logs)")
    assert await store.get_job(record.id) is None
