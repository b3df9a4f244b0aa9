"""A peer's side of fan-out: verify the researcher's signed job, run it here, report back."""

from __future__ import annotations

import asyncio
import collections
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

from stimnetd.errors import Conflict, Overloaded, PermissionDenied, Refused, Replayed
from stimnetd.jobs.signing import SignedJob, VerifiedJob
from stimnetd.jobs.site import SiteExecutor, SiteOutcome
from stimnetd.pki import Identity
from stimnetd.store import NonceClaim, Store
from stimnetd.store.records import JobRecord

# A site whose answer takes longer than this reports "accepted" first (see run()).
ACCEPTED_AFTER_S = 0.05


@dataclass(frozen=True)
class SubJobEvent:
    state: str
    detail: str = ""
    n: int = 0
    outcome: SiteOutcome | None = None


class SubJobHandler:
    def __init__(self, *, executor: SiteExecutor, store: Store,
                 verify: Callable[[SignedJob], VerifiedJob], max_age_s: float,
                 script_policy: str = "review", max_per_entry: int = 256,
                 max_pending_scripts: int = 16,
                 clock: Callable[[], float] = time.time) -> None:
        self._max_pending_scripts = max_pending_scripts
        self._executor = executor
        # Sub-jobs running here per entry node: one node (or a runaway researcher behind
        # it) cannot take every slot of this site's loop and database.
        self._max_per_entry = max_per_entry
        self._running: collections.Counter[str] = collections.Counter()
        self._script_policy = script_policy
        self._clock = clock
        self._store = store
        self._verify = verify
        self._max_age = max_age_s

    async def run(self, signed: SignedJob, entry: Identity,
                  request_id: str) -> AsyncIterator[SubJobEvent]:
        if self._running[entry.name] >= self._max_per_entry:
            raise Overloaded(f"node {entry.name!r} has {self._running[entry.name]} sub-jobs "
                             f"running at this site, its limit (max_subjobs_per_entry = "
                             f"{self._max_per_entry}); try again when some have finished")
        self._running[entry.name] += 1
        counted = True

        def release() -> None:
            nonlocal counted
            if counted:
                counted = False
                self._running[entry.name] -= 1
                if not self._running[entry.name]:
                    del self._running[entry.name]

        try:
            async for ev in self._run(signed, entry, request_id):
                if ev.outcome is not None:
                    # The outcome ends the sub-job for the entry, which reads nothing after
                    # it: its next sub-job may arrive before this stream has closed.
                    release()
                yield ev
        finally:
            release()

    async def _run(self, signed: SignedJob, entry: Identity,
                   request_id: str) -> AsyncIterator[SubJobEvent]:
        # Verified here, at this site, with this site's CA and CRL: the entry node is only
        # a relay and cannot vouch for the researcher.
        job = self._verify(signed)
        if job.request.scope != "federated":
            # The researcher signed it for one node: a node relaying it to its peers would
            # spend the researcher's budget there and collect answers never asked for.
            raise PermissionDenied(f"job {job.request.job_id} was signed for scope "
                                   f"{job.request.scope!r}: only a federated job is answered "
                                   "for another node")
        if job.request.entry != entry.name:
            # Before its nonce is remembered: a node racing the chosen entry with a copy
            # cannot make the real request a "replay".
            raise PermissionDenied(f"job {job.request.job_id} was signed to enter the federation "
                                   f"at node {job.request.entry!r}, not {entry.name!r}: a site "
                                   "answers a job only from the entry node its researcher chose")
        await self._executor.precheck(job)
        if job.request.kind == "script":
            await self._admit_script(job, entry, request_id)
        accepted = (job.researcher.name, job.researcher.role, "subjob", "accepted",
                    {"job": job.request.job_id, "catalog": job.request.catalog,
                     "via": entry.name, "request_id": request_id})
        claim = NonceClaim(job.request.nonce, job.researcher.name, self._max_age, accepted)
        if job.request.kind == "script":
            # A container run is costly and not idempotent before its release: remember
            # the nonce durably before starting it, so a concurrent replay never runs.
            if not await self._store.claim_nonce(claim):
                raise Replayed("replayed request: this signed job was already run at this site")
        elif self._store.nonce_seen(claim.nonce):
            # Queries remember the nonce in their release (or refusal) transaction, which
            # also stops a concurrent replay; this look-up (in memory, no database round
            # trip) only answers a late one at once.
            raise Replayed("replayed request: this signed job was already run at this site")
        events: asyncio.Queue[SubJobEvent] = asyncio.Queue()

        async def sink(state: str, detail: str) -> None:
            events.put_nowait(SubJobEvent(state, detail))

        task = asyncio.create_task(self._executor.run(
            job, sink, nonce=None if claim.consumed else claim))
        # "accepted" is progress: a site that answers within ACCEPTED_AFTER_S reports its
        # outcome straight away (one message, not two); a slower one says it accepted.
        reported = False
        getter: asyncio.Task[SubJobEvent] | None = None
        try:
            while not task.done() or not events.empty():
                getter = asyncio.create_task(events.get())
                done, _ = await asyncio.wait({getter, task}, return_when=asyncio.FIRST_COMPLETED,
                                             timeout=None if reported else ACCEPTED_AFTER_S)
                got = getter.result() if getter in done else None
                if got is None:
                    # Before anything else (a yield suspends us): a getter cancelled now
                    # cannot have taken an event, so none is lost.
                    getter.cancel()
                if not reported and (not done or got is not None):
                    reported = True
                    yield SubJobEvent("accepted")
                if got is not None:
                    yield got
            outcome = task.result()
        finally:
            if not task.done():
                task.cancel()
            if getter is not None and not getter.done():  # the entry went away mid-wait
                getter.cancel()
        if not claim.consumed:
            # Failed without a release or a refusal: still remember the nonce (and that the
            # job was accepted) so that the request cannot be run here again.
            await self._store.claim_nonce(claim)
        yield SubJobEvent(outcome.state, outcome.detail, outcome.n, outcome)

    async def _admit_script(self, job: VerifiedJob, entry: Identity, request_id: str) -> None:
        """This site's script policy for a federated script: it cannot hold the entry
        node's stream open for an admin, so 'review' answers at once and keeps a pending
        request an admin can approve (remembered) before the researcher resubmits."""
        req = job.request
        if self._script_policy == "deny":
            raise Refused("this site's script policy is 'deny': it does not run researcher "
                          "scripts")
        if self._script_policy == "auto" or await self._store.is_script_approved(
                req.script_sha256):
            return
        now = self._clock()
        try:
            created = await self._store.create_job(JobRecord(
                id=req.job_id, kind="script", scope="federated", catalog=req.catalog,
                owner=job.researcher.name, state="awaiting_approval",
                detail=f"requested via {entry.name}", created_at=now, updated_at=now,
                request_id=request_id, origin=entry.name, payload=job.signed.payload,
                signature=job.signed.signature, signer_cert=job.signed.signer_cert_pem,
                script=job.signed.script, script_sha256=req.script_sha256),
                audit=(job.researcher.name, job.researcher.role, "subjob"),
                pending_limit=self._max_pending_scripts)
        except Conflict:  # the same signed job again: its request is pending
            created = False
        if not created:
            raise Replayed("replayed request: this signed job is already awaiting approval "
                           "at this site")
        raise Refused(f"awaiting approval: site policy 'review' — an admin here must approve "
                      f"script sha256 {req.script_sha256[:16]}… (job {req.job_id}); resubmit "
                      "once approved")
