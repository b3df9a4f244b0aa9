"""Jobs at the node a researcher talks to: accept, review, run (locally or fanned out),
watch, read, cancel, and resume after a restart.

JobService is the one object the servicer talks to; each concern is a module of its own:

    admission.py  submit: verify, admit, record, start (QueryQuota in quota.py)
    review.py     the script policy at the entry; an admin's approve / deny
    running.py    JobRunner: one task per job, local or fanned out
    answer.py     the answer assembled from the sites' outcomes (pure)
    events.py     JobEventHub: each job's events and watchers (de-duplicated there)
    watch.py      a watcher's stream: snapshot, quiet start, batching
    recovery.py   after a restart: interrupt or re-queue

A query's final state is shown before it is written (with the next transaction, a group
commit at the latest), so neither write is on the answer's path, nor a transaction of its
own; until a write lands, readers see the job from memory.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import replace
from functools import partial

from stimnet.errors import Conflict, NotFound, PermissionDenied
from stimnet.pki import Identity
from stimnet.signing import SignedJob
from stimnetd.federation.fanout import Fanout
from stimnetd.jobs import recovery
from stimnetd.jobs.access import JobVerifier, may_see, owns, restore
from stimnetd.jobs.admission import Admission
from stimnetd.jobs.events import ActiveJob, JobEventHub, JobUpdate
from stimnetd.jobs.quota import QueryQuota
from stimnetd.jobs.review import JobReview, ScriptGate
from stimnetd.jobs.running import JobRunner
from stimnetd.jobs.watch import watch as watch_job
from stimnetd.site import LocalSite
from stimnetd.site.policy import ScriptPolicy
from stimnetd.store import SiteStore
from stimnetd.store.records import JobRecord


class JobService:
    def __init__(self, *, node: str, store: SiteStore, site: LocalSite, fanout: Fanout,
                 verify: JobVerifier, script_policy: ScriptPolicy | None = None,
                 request_max_age_s: float = 300.0, retention_days: float = 0.0,
                 max_queries_per_researcher: int = 32,
                 clock: Callable[[], float] = time.time) -> None:
        self._store = store
        self._verify = verify
        self._scripts = script_policy or ScriptPolicy()
        # Said when a job is not found: it may have finished long ago and been deleted.
        self._kept = (f" (finished jobs are kept for {retention_days:g} days)"
                      if retention_days else "")
        self._hub = JobEventHub(clock)
        gate = ScriptGate(node=node, policy=self._scripts, store=store, clock=clock)
        quota = QueryQuota(max_queries_per_researcher)
        self._runner = JobRunner(hub=self._hub, store=store, site=site, fanout=fanout,
                                 scripts=gate, quota=quota, clock=clock)
        self._admission = Admission(node=node, store=store, hub=self._hub, runner=self._runner,
                                    site=site, fanout=fanout, scripts=gate, quota=quota,
                                    verify=verify, max_age_s=request_max_age_s, clock=clock)
        self._review = JobReview(store=store, hub=self._hub, start=self._runner.start,
                                 restore=partial(restore, verify=verify),
                                 not_found_note=self._kept)

    async def submit(self, signed: SignedJob, caller: Identity, request_id: str, *,
                     follow: bool = False) -> JobRecord:
        """Admit a job and start it; see jobs/admission.py (`follow`: RunJob)."""
        return await self._admission.submit(signed, caller, request_id, follow=follow)

    async def approve(self, job_id: str, admin: Identity, remember: bool) -> JobRecord:
        return await self._review.approve(job_id, admin, remember)

    async def deny(self, job_id: str, admin: Identity) -> JobRecord:
        return await self._review.deny(job_id, admin)

    async def get(self, job_id: str, caller: Identity) -> JobRecord:
        active = self._hub.get(job_id)
        record = _as_now(active.unwritten if active is not None and active.unwritten is not None
                         else await self._store.get_job(job_id), active)
        if record is None or not may_see(record, caller):
            raise NotFound(f"no job {job_id!r} visible to you on this node{self._kept}")
        return record

    async def list(self, caller: Identity, limit: int) -> list[JobRecord]:
        """The caller's jobs (an admin's: all), newest first — as `get` shows them: a
        query whose row is not written yet, or whose final state is not, as it is now."""
        owner = None if caller.role == "admin" else caller.name
        limit = max(1, min(limit or 50, 500))
        records = {r.id: r for r in await self._store.list_jobs(owner=owner, limit=limit)}
        for job_id, active in self._hub.active():
            record = _as_now(active.unwritten or records.get(job_id), active)
            if record is not None and may_see(record, caller):
                records[job_id] = record
        return sorted(records.values(), key=lambda r: r.created_at, reverse=True)[:limit]

    async def result(self, job_id: str, caller: Identity) -> bytes:
        """The job's answer as stored (codec.pack), for streaming as it is."""
        record = await self.get(job_id, caller)
        if not owns(record, caller):
            raise PermissionDenied("only the researcher who submitted a job may read its result")
        if record.result is None:
            raise Conflict(f"job {job_id} has no result (state: {record.state}"
                           f"{', ' + record.detail if record.detail else ''})")
        return record.result

    async def cancel(self, job_id: str, caller: Identity) -> JobRecord:
        record = await self.get(job_id, caller)
        if caller.role != "admin" and not owns(record, caller):
            raise PermissionDenied("only the job's owner or an admin may cancel it")
        if record.state == "awaiting_approval":
            return await self._review.cancel(job_id, caller)
        active = self._hub.get(job_id)
        if record.terminal or active is None or active.task is None:
            raise Conflict(f"job {job_id} is {record.state}; nothing to cancel")
        active.task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await active.task
        return await self.get(job_id, caller)

    def watch(self, job_id: str, caller: Identity,
              submitted: JobRecord | None = None) -> AsyncIterator[JobUpdate]:
        """The job's updates for `caller`; see jobs/watch.py (`submitted`: RunJob's)."""
        return watch_job(self._hub, job_id, caller, self.get, submitted)

    async def recover(self) -> int:
        """Resume or mark the jobs a stop left unfinished (jobs/recovery.py); returns how
        many were interrupted."""
        return await recovery.recover(self._store, self._runner, self._scripts,
                                      partial(restore, verify=self._verify))

    async def shutdown(self) -> None:
        await self._runner.shutdown()


def _as_now(record: JobRecord | None, active: ActiveJob | None) -> JobRecord | None:
    """A job's record with the site events it has so far (a running job's row has none)."""
    if record is None or active is None or record.sites or not active.sites:
        return record
    return replace(record, sites=active.site_dicts())


__all__ = ["JobService", "JobUpdate"]
