"""A peer asked to resume a sub-job after its entry restarted: once, only a script job it
accepted before, never as a fresh run of someone else's request."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest

from stimnet.errors import PermissionDenied, Replayed
from stimnetd.federation.subjob import PeerSubJobs
from stimnetd.site.policy import ScriptPolicy
from stimnetd.store import Store
from tests.unit.test_subjob_events import FakeSite, _job

ENTRY = SimpleNamespace(name="site-a")
AUTO = ScriptPolicy(review="auto")


def _script(nonce: str) -> SimpleNamespace:
    job = _job(nonce)
    job.request.kind, job.request.script_sha256 = "script", "ab" * 32
    return job


class Verifier:
    """Passes every job, noting whether freshness was asked for."""

    def __init__(self) -> None:
        self.fresh: list[bool] = []

    def __call__(self, signed: SimpleNamespace, *, fresh: bool = True) -> SimpleNamespace:
        self.fresh.append(fresh)
        return signed


async def _outcomes(handler: PeerSubJobs, job: SimpleNamespace, resume: bool,
                    entry: SimpleNamespace = ENTRY) -> list[str]:
    return [ev.state async for ev in handler.run(job, entry, "r", resume=resume)  # type: ignore[arg-type]
            if hasattr(ev, "state")]


async def test_a_script_sub_job_is_resumed_once(tmp_path: Path) -> None:
    """Run, then resumed (not checked for freshness, run as resumed so a release it made
    is returned), then a second resume is a replay; the resume is audited."""
    store = Store(tmp_path / "node.sqlite3")
    await store.open()
    site, verify = FakeSite([]), Verifier()
    try:
        handler = PeerSubJobs(site=site, store=store, verify=verify,  # type: ignore[arg-type]
                              max_age_s=300, scripts=AUTO)
        job = _script("s1")
        assert await _outcomes(handler, job, resume=False) == ["done"]
        assert await _outcomes(handler, job, resume=True) == ["done"]
        with pytest.raises(Replayed, match="already resumed at this site once"):
            await _outcomes(handler, job, resume=True)
        with pytest.raises(Replayed, match="already run at this site"):
            await _outcomes(handler, job, resume=False)
        assert site.runs == [False, True]
        assert verify.fresh[:2] == [True, False]
        actions = [(r.action, r.decision) for r in await store.audit_rows()]
        assert ("subjob", "resumed") in actions
    finally:
        await store.close()


async def test_a_resume_of_a_job_never_seen_here_is_a_first_run(tmp_path: Path) -> None:
    """The entry's restart came before its sub-job reached this site: the resume is admitted
    as a first run (freshness checked), and it cannot be resumed again after that."""
    store = Store(tmp_path / "node.sqlite3")
    await store.open()
    site, verify = FakeSite([]), Verifier()
    try:
        handler = PeerSubJobs(site=site, store=store, verify=verify,  # type: ignore[arg-type]
                              max_age_s=300, scripts=AUTO)
        job = _script("s2")
        assert await _outcomes(handler, job, resume=True) == ["done"]
        assert site.runs == [False]
        assert verify.fresh == [False, True]
        assert await _outcomes(handler, job, resume=True) == ["done"]  # its one resume
        assert site.runs == [False, True]
    finally:
        await store.close()


async def test_only_the_signed_entry_may_resume(tmp_path: Path) -> None:
    """Another node asking to resume the job is refused before anything is remembered."""
    store = Store(tmp_path / "node.sqlite3")
    await store.open()
    site = FakeSite([])
    try:
        handler = PeerSubJobs(site=site, store=store, verify=Verifier(),  # type: ignore[arg-type]
                              max_age_s=300, scripts=AUTO)
        job = _script("s3")
        assert await _outcomes(handler, job, resume=False) == ["done"]
        with pytest.raises(PermissionDenied, match="not 'site-c'"):
            await _outcomes(handler, job, resume=True, entry=SimpleNamespace(name="site-c"))
        assert await _outcomes(handler, job, resume=True) == ["done"]
        assert site.runs == [False, True]
    finally:
        await store.close()


async def test_a_query_is_not_resumed(tmp_path: Path) -> None:
    """Only script jobs are re-run after a restart: a resumed query is a replay."""
    store = Store(tmp_path / "node.sqlite3")
    await store.open()
    try:
        handler = PeerSubJobs(site=FakeSite([]), store=store, verify=Verifier(),  # type: ignore[arg-type]
                              max_age_s=300, scripts=AUTO)
        job = _job("q1")
        assert await _outcomes(handler, job, resume=False) == ["done"]
        with pytest.raises(Replayed, match="already run at this site"):
            await _outcomes(handler, job, resume=True)
    finally:
        await store.close()
