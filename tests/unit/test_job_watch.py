"""What a job's watcher receives through JobService (with a real store): site events that
were ready at once go out together, in order, without duplicates, and an answer only ever
reaches the researcher who asked; decisions on a job awaiting approval apply once."""

from __future__ import annotations

import hashlib
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np

from stimnet import codec
from stimnet.pki import Identity
from stimnet.states import SiteEvent, SiteState
from stimnetd.jobs.events import JobUpdate
from stimnetd.jobs.review import ScriptGate
from stimnetd.jobs.service import JobService
from stimnetd.site.policy import ScriptPolicy
from stimnetd.store import Store
from stimnetd.store.records import JobRecord

ALICE = Identity(name="alice", role="researcher", serial=1,
                 not_after=datetime.now(UTC) + timedelta(days=1))
OPS = Identity(name="ops", role="admin", serial=2, not_after=datetime.now(UTC) + timedelta(days=1))


async def _service(tmp_path: Path) -> tuple[JobService, Store]:
    store = Store(tmp_path / "node.sqlite3")
    await store.open()
    jobs = JobService(node="node-a", store=store, site=None, fanout=None,  # type: ignore[arg-type]
                      verify=lambda signed: None)  # type: ignore[arg-type,return-value]
    await store.create_job(JobRecord(
        id="j1", kind="query", scope="federated", catalog="c", owner="alice", state="running",
        detail="", created_at=0.0, updated_at=0.0, request_id="r", origin="client",
        payload=b"{}", signature=b"", signer_cert=b""))
    jobs._hub.open("j1")
    return jobs, store


def _site(name: str, state: SiteState) -> SiteEvent:
    return SiteEvent(name, state)


async def test_ready_site_events_are_coalesced_in_order(tmp_path: Path) -> None:
    """Queued site events leave as one batch, in order, duplicates dropped; a lone one alone."""
    jobs, store = await _service(tmp_path)
    try:
        watch = jobs.watch("j1", ALICE)
        first = await watch.__anext__()
        assert first.kind == "state" and first.job is not None and first.job.state == "running"
        hub = jobs._hub
        for event in (_site("a", "accepted"), _site("b", "accepted"), _site("a", "accepted"),
                      "hello", _site("a", "done"), _site("b", "done")):
            if isinstance(event, str):
                hub.log("j1", "a", event)
            else:
                hub.site_event("j1", event)
        got = [await watch.__anext__() for _ in range(3)]
        assert [u.kind for u in got] == ["sites", "log", "sites"]
        assert [(s.site, s.state) for s in got[0].sites] == [("a", "accepted"),
                                                             ("b", "accepted")]
        assert got[1].line == "a: hello"
        assert [(s.site, s.state) for s in got[2].sites] == [("a", "done"), ("b", "done")]
        # A lone event stays a single one.
        hub.site_event("j1", _site("c", "failed"))
        lone = await watch.__anext__()
        assert lone.kind == "site" and lone.site is not None and lone.site.site == "c"
        hub.publish("j1", JobUpdate("end"))
        assert [u async for u in watch] == []
    finally:
        await store.close()


async def test_only_the_owner_receives_the_answer(tmp_path: Path) -> None:
    """The final state carries the answer; an admin watching the same job gets the state
    without it — also an admin whose certificate carries the researcher's name (jobs are
    researchers', so a name alone owns nothing)."""
    admin_alice = Identity(name="alice", role="admin", serial=3,
                           not_after=datetime.now(UTC) + timedelta(days=1))
    jobs, store = await _service(tmp_path)
    try:
        mine, theirs = jobs.watch("j1", ALICE), jobs.watch("j1", OPS)
        namesake = jobs.watch("j1", admin_alice)
        for w in (mine, theirs, namesake):
            await w.__anext__()
        record = await store.get_job("j1")
        answer = codec.pack({"result": {"n": 7}}, {"v": np.ones(2)})
        jobs._hub.publish("j1", JobUpdate("state", job=record, result=answer))
        jobs._hub.publish("j1", JobUpdate("end"))
        own = [u async for u in mine]
        other = [u async for u in theirs]
        same_name = [u async for u in namesake]
        assert own[0].kind == "state" and own[0].result is answer
        assert other[0].kind == "state" and other[0].result is None
        assert same_name[0].kind == "state" and same_name[0].result is None
    finally:
        await store.close()


async def _awaiting(store: Store, job_id: str, origin: str = "peer-x") -> None:
    await store.create_job(JobRecord(
        id=job_id, kind="script", scope="federated", catalog="c", owner="alice",
        state="awaiting_approval", detail="", created_at=0.0, updated_at=0.0, request_id="r",
        origin=origin, payload=b"{}", signature=b"", signer_cert=b"", script=b"x",
        script_sha256="ab" * 32))


async def test_decisions_on_a_job_awaiting_approval_apply_once(tmp_path: Path) -> None:
    """Approve, deny and cancel each change the state only if it is still 'awaiting
    approval', in one statement: of two racing approvals, or an approval racing the
    researcher's cancel, exactly one applies (the job could run twice, or after its
    cancel); the other is a Conflict saying why."""
    import asyncio

    import pytest

    from stimnet.errors import Conflict

    jobs, store = await _service(tmp_path)
    try:
        await _awaiting(store, "p1")
        results = await asyncio.gather(jobs.approve("p1", OPS, True), jobs.approve("p1", OPS, True),
                                       return_exceptions=True)
        assert sorted(type(r).__name__ for r in results) == ["Conflict", "JobRecord"]
        assert "no longer awaiting approval" in str(next(r for r in results
                                                         if isinstance(r, Conflict)))
        await _awaiting(store, "p2")
        cancelled, approved = await asyncio.gather(jobs.cancel("p2", ALICE),
                                                   jobs.approve("p2", OPS, False),
                                                   return_exceptions=True)
        assert isinstance(approved, Conflict) and cancelled.state == "cancelled"  # type: ignore[union-attr]
        assert (await store.get_job("p2")).state == "cancelled"  # type: ignore[union-attr]
        with pytest.raises(Conflict):
            await jobs.deny("p2", OPS)
    finally:
        await store.close()


async def test_cancelling_a_job_awaiting_approval_ends_its_watchers(tmp_path: Path) -> None:
    """A researcher watching a job that waits for an admin, then cancelling it: the watch
    gets the final state and ends, and nothing of the job stays in memory."""
    import asyncio

    jobs, store = await _service(tmp_path)
    try:
        await _awaiting(store, "p3", origin="client")
        jobs._hub.open("p3")
        watch = jobs.watch("p3", ALICE)
        first = await watch.__anext__()
        assert first.job is not None and first.job.state == "awaiting_approval"
        await jobs.cancel("p3", ALICE)

        async def drain() -> list[JobUpdate]:
            return [u async for u in watch]

        rest = await asyncio.wait_for(drain(), 5)  # a watch that never ends fails here
        assert [(u.kind, u.job.state if u.job else None) for u in rest] == [
            ("state", "cancelled")]
        assert jobs._hub.get("p3") is None
    finally:
        await store.close()


async def test_this_sites_share_of_a_federated_script_is_held_once_even_when_resumed(
        tmp_path: Path) -> None:
    """Under 'review' (the default script policy) the entry's own share of an unapproved
    federated script is refused with a pending request an admin can approve; a run resumed
    after a restart asks again and finds the same request (its insert raised
    IntegrityError, which means "already pending")."""
    from types import SimpleNamespace

    jobs, store = await _service(tmp_path)
    gate = ScriptGate(node="node-a", policy=ScriptPolicy(), store=store)
    try:
        await _awaiting(store, "f1", origin="client")
        record = await store.get_job("f1")
        assert record is not None
        job = SimpleNamespace(researcher=ALICE)
        first = await gate.local_share_refusal(record, job)  # type: ignore[arg-type]
        again = await gate.local_share_refusal(record, job)  # type: ignore[arg-type]
        pending_id = hashlib.sha256(b"f1:local-share").hexdigest()[:24]
        assert first == again == (
            "awaiting approval: site policy 'review' — an admin here must approve script "
            f"sha256 {('ab' * 32)[:16]}… (job {pending_id}); resubmit once approved")
        pending = [j for j in await store.list_jobs() if j.id not in ("f1", "j1")]
        assert [(j.id, j.state, j.detail) for j in pending] == [
            (pending_id, "awaiting_approval", "this site's share of federated job f1")]
    finally:
        await store.close()
