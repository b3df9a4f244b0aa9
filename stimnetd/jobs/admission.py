"""Admission: a researcher's signed job accepted at this node (its entry), recorded, started.

A job is recorded in the store before the researcher learns its id: `submit` returns once
its signed request is written (durably for scripts), so a restart can resume or mark it.
A query followed in the same call (RunJob) has no id to lose: its row, bookkeeping (the
privacy decisions are the sites' durable releases), is written while it fans out — in
this site's own release transaction when it holds a share — and before its id is first
shown.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

from stimnet.errors import Conflict, PermissionDenied
from stimnet.pki import Identity
from stimnet.signing import SignedJob, VerifiedJob
from stimnet.states import JobState
from stimnetd.federation.fanout import Fanout
from stimnetd.jobs.access import REPLAYED, JobVerifier
from stimnetd.jobs.events import ActiveJob, JobEventHub
from stimnetd.jobs.quota import QueryQuota
from stimnetd.jobs.review import ScriptGate
from stimnetd.jobs.running import JobRunner
from stimnetd.site import LocalSite
from stimnetd.store import SiteStore
from stimnetd.store.records import JobRecord


class Admission:
    def __init__(self, *, node: str, store: SiteStore, hub: JobEventHub, runner: JobRunner,
                 site: LocalSite, fanout: Fanout, scripts: ScriptGate, quota: QueryQuota,
                 verify: JobVerifier, max_age_s: float,
                 clock: Callable[[], float] = time.time) -> None:
        self._node = node
        self._store = store
        self._hub = hub
        self._runner = runner
        self._site = site
        self._fanout = fanout
        self._scripts = scripts
        self._quota = quota
        self._verify = verify
        self._max_age = max_age_s
        self._clock = clock

    async def submit(self, signed: SignedJob, caller: Identity, request_id: str, *,
                     follow: bool = False) -> JobRecord:
        """`follow`: the caller watches the job in the same call (RunJob) and learns of it
        only through `watch`, so a query's row need not be written before it starts."""
        job = self._verify(signed)
        if (job.researcher.name, job.researcher.role) != (caller.name, caller.role):
            raise PermissionDenied(f"job is signed by {job.researcher} but submitted by {caller}; "
                                   "researchers submit their own jobs")
        req = job.request
        if req.entry != self._node:
            raise PermissionDenied(f"job is signed for entry node {req.entry!r}, but this node is "
                                   f"{self._node!r}: submit it there, or sign it for this node")
        if req.kind != "query":
            return await self._admit(job, caller, request_id, follow)
        owner = job.researcher.name
        # Reserved before the first await, so concurrent submissions cannot pass together;
        # the running job holds it from then on (the runner gives it back).
        self._quota.reserve(owner)
        try:
            record = await self._admit(job, caller, request_id, follow)
        except BaseException:
            self._quota.unreserve(owner)
            raise
        self._quota.hold(record.id, owner)
        return record

    async def _admit(self, job: VerifiedJob, caller: Identity, request_id: str,
                     follow: bool) -> JobRecord:
        req = job.request
        # A query starts at once: recorded as running in its submit transaction, saving a
        # commit on every query's path (a restart interrupts queued and running alike).
        state: JobState = "running" if req.kind == "query" else "queued"
        detail = ""
        if req.kind == "script" and req.scope == "local":
            state, detail = await self._scripts.admit(req.script_sha256)
        if req.scope == "local":
            await self._site.precheck(job)
        elif self._site is not None:  # each site checks its own share; this node keeps
            await self._site.check_storage(job.researcher.name)  # the combined answer
        record = self._record(job, state, detail, request_id)
        followed_query = req.kind == "query" and follow
        create = self._store.create_job(
            record, audit=(caller.name, caller.role, "submit"), nonce=(req.nonce, self._max_age),
            durable=req.kind != "query",
            pending_limit=self._scripts.policy.max_pending_per_researcher
            if req.kind == "script" else None,
            # Rides in this site's own release (or refusal) of the query, which comes within
            # a millisecond: a transaction, and a trip to the database thread, fewer per
            # query. Without a share here there is nothing to ride in, and waiting for the
            # group commit would hold the answer up.
            defer=followed_query and (req.scope == "local"
                                      or self._fanout.holds_catalog(req.catalog)))
        # A query's row is bookkeeping (its privacy decisions are the sites' durable
        # releases, and a replay is stopped there too): no fsync of its own (SiteStore._tx).
        if followed_query:
            # Nor does the fan-out wait for it. A replay is refused here from memory (the
            # job id derives from the nonce; the store reloads its nonces at start); the
            # row's own check, which cannot be bypassed, fails the job before any answer
            # or id is shown.
            if record.id in self._hub or self._store.nonce_seen(req.nonce):
                create.close()
                raise Conflict(REPLAYED)
            self._hub.open(record.id, ActiveJob(unwritten=record,
                                                created=asyncio.ensure_future(create)))
            self._runner.start(record, job)
            return record
        if not await create:
            raise Conflict(REPLAYED)
        self._hub.open(record.id)
        if state in ("queued", "running"):
            self._runner.start(record, job)
        return record

    def _record(self, job: VerifiedJob, state: JobState, detail: str,
                request_id: str) -> JobRecord:
        req, signed = job.request, job.signed
        now = self._clock()
        return JobRecord(
            id=req.job_id, kind=req.kind, scope=req.scope, catalog=req.catalog,
            owner=job.researcher.name, state=state, detail=detail, created_at=now,
            updated_at=now, request_id=request_id, origin="client", payload=signed.payload,
            signature=signed.signature, signer_cert=signed.signer_cert_pem,
            script=signed.script or None, script_sha256=req.script_sha256)
