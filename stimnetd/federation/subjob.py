"""A peer's side of fan-out: verify the researcher's signed job, run it here, report back."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import time
from collections.abc import AsyncGenerator, Callable, Iterator
from dataclasses import dataclass
from typing import Protocol

import structlog

from stimnet.errors import Conflict, Overloaded, PermissionDenied, Refused, Replayed
from stimnet.pki import Identity
from stimnet.signing import SignedJob, VerifiedJob
from stimnet.states import SiteEvent
from stimnetd.site import LocalSite, ShareProgress, SiteOutcome
from stimnetd.site.policy import ScriptPolicy
from stimnetd.store import NonceClaim, SiteStore
from stimnetd.store.records import JobRecord

log = structlog.get_logger("stimnetd.subjob")

# A site whose answer takes longer than this reports "accepted" first (see _reported()).
ACCEPTED_AFTER_S = 0.05
_REPLAYED = "replayed request: this signed job was already run at this site"
_RESUMED_ONCE = ("replayed request: this signed job was already resumed at this site once "
                 "(after its entry node restarted); it is not run here again")
# Marks a signed job's one resume in the nonce table, next to (and pruned with) its nonce.
RESUME_PREFIX = "resume:"


class Verify(Protocol):
    def __call__(self, signed: SignedJob, *, fresh: bool = True) -> VerifiedJob:
        """Chain, revocation and signature; with `fresh`, the request's age too."""


@dataclass(frozen=True)
class LogLine:
    """A line of the share's log that this site's log policy lets through to the researcher."""

    line: str


# What a sub-job's stream carries back to its entry, in order: progress (this site's
# SiteEvents: "accepted", "running"), log lines, then the outcome, last.
SubJobEvent = SiteEvent | LogLine | SiteOutcome


class PeerSubJobs:
    """The sub-jobs entry nodes send this site: each verified here, admitted under this
    site's limits and script policy, run as this site's share, its events streamed back."""

    def __init__(self, *, site: LocalSite, store: SiteStore,
                 verify: Verify, max_age_s: float,
                 scripts: ScriptPolicy | None = None, max_per_entry: int = 256,
                 clock: Callable[[], float] = time.time) -> None:
        self._scripts = scripts or ScriptPolicy()
        self._max_pending_scripts = self._scripts.max_pending_per_researcher
        self._site = site
        # Sub-jobs running here per entry node: one node (or a runaway researcher behind
        # it) cannot take every slot of this site's loop and database.
        self._max_per_entry = max_per_entry
        self._running: collections.Counter[str] = collections.Counter()
        self._clock = clock
        self._store = store
        self._verify = verify
        self._max_age = max_age_s

    async def run(self, signed: SignedJob, entry: Identity, request_id: str, *,
                  round_no: int = 0, beta: list[float] | None = None, resume: bool = False
                  ) -> AsyncGenerator[SubJobEvent, None]:
        """`round_no` 2 or later: a later round of a multi-round job, at `beta`. `resume`:
        the entry restarted while the job ran and re-runs it (`_resume`)."""
        with self._slot(entry.name) as release:
            run = self._run(signed, entry, request_id, resume) if round_no <= 1 \
                else self._round(signed, entry, round_no, beta or [])
            async with contextlib.aclosing(run) as events:
                async for ev in events:
                    if isinstance(ev, SiteOutcome):
                        # The outcome ends the sub-job for the entry, which reads nothing
                        # after it: its next sub-job may arrive before this stream closes.
                        release()
                    yield ev

    @contextlib.contextmanager
    def _slot(self, entry: str) -> Iterator[Callable[[], None]]:
        """One of `entry`'s sub-job slots here, held until released or the block ends."""
        if self._running[entry] >= self._max_per_entry:
            raise Overloaded(f"node {entry!r} has {self._running[entry]} sub-jobs "
                             f"running at this site, its limit (max_subjobs_per_entry = "
                             f"{self._max_per_entry}); try again when some have finished")
        self._running[entry] += 1
        counted = True

        def release() -> None:
            nonlocal counted
            if counted:
                counted = False
                self._running[entry] -= 1
                if not self._running[entry]:
                    del self._running[entry]
        try:
            yield release
        finally:
            release()

    async def _run(self, signed: SignedJob, entry: Identity, request_id: str,
                   resume: bool) -> AsyncGenerator[SubJobEvent, None]:
        resumed = await self._resume(signed, entry, request_id) if resume else None
        job, claim = resumed or await self._admit(signed, entry, request_id)
        # A script's nonce is claimed durably at admission, so no copy of it runs here
        # again and a charge for its job is its own; a query's is claimed by its release,
        # which marks the claim (NonceClaim.released) only if it charged for this request,
        # not for a concurrent copy whose release commits meanwhile. A resumed job's
        # charge may be its first run's, whose partial may have left this site then: it is
        # never refunded (a charge is kept in doubt, never dropped).
        claimed_first = claim.consumed and resumed is None
        outcome: SiteOutcome | None = None
        handed = False
        try:
            async with contextlib.aclosing(self._reported(job, claim,
                                                          resumed is not None)) as events:
                async for ev in events:
                    if isinstance(ev, SiteOutcome):
                        outcome = ev
                    else:
                        yield ev
            assert outcome is not None
            if not claim.consumed:
                # Failed without a release or a refusal: still remember the nonce (and that
                # the job was accepted) so that the request cannot be run here again.
                await self._store.claim_nonce(claim)
            # The servicer turns the outcome into frames and hands them to the stream with
            # no wait in between: this is the last point at which this site knows that no
            # byte of its partial has left it. From here its charge is final.
            handed = True
            yield outcome
        finally:
            if not handed and (claimed_first or claim.released):
                await self._refund_unsent(job, entry)

    async def _refund_unsent(self, job: VerifiedJob, entry: Identity) -> None:
        """The sub-job ended (the entry cancelled it, its stream broke, its deadline passed)
        before its outcome was handed to the stream: refund the release's charge, if one
        was made (docs/privacy.md, "Charged only for what left the site"). Not refunded if
        the refund cannot be written: a charge is only ever kept in doubt, never dropped."""
        try:
            refunded = await asyncio.shield(self._store.refund(
                job.request.job_id, audit_actor=(job.researcher.name, job.researcher.role),
                reason=f"the sub-job from node {entry.name!r} ended before this site sent "
                       "any of its partial"))
        except Exception:  # noqa: BLE001 - the charge stands; the refusal to refund is logged
            log.warning("charge of an unsent partial not refunded", job=job.request.job_id,
                        exc_info=True)
            return
        if refunded:
            log.info("charge refunded: partial never sent", job=job.request.job_id,
                     epsilon=refunded, entry=entry.name)

    async def _round(self, signed: SignedJob, entry: Identity, round_no: int,
                     beta: list[float]) -> AsyncGenerator[SubJobEvent, None]:
        """A later round: the signed job verified again (so its catalog, cohort, model and
        family are the ones signed), its nonce already spent by round 1 here; the site's
        FitRounds decide whether this round at `beta` is owed."""
        job = self._verified(signed, entry)
        yield await self._site.run_round(job, round_no, beta)

    def _verified(self, signed: SignedJob, entry: Identity, *, fresh: bool = True) -> VerifiedJob:
        # Verified here, at this site, with this site's CA and CRL: the entry node is only
        # a relay and cannot vouch for the researcher.
        job = self._verify(signed, fresh=fresh)
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
        return job

    async def _admit(self, signed: SignedJob, entry: Identity,
                     request_id: str) -> tuple[VerifiedJob, NonceClaim]:
        """The job, if this site answers it for `entry`, and its nonce to remember."""
        job = self._verified(signed, entry)
        await self._site.precheck(job)
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
                raise Replayed(_REPLAYED)
        elif self._store.nonce_seen(claim.nonce):
            # Queries remember the nonce in their release (or refusal) transaction, which
            # also stops a concurrent replay; this look-up (in memory, no database round
            # trip) only answers a late one at once.
            raise Replayed(_REPLAYED)
        return job, claim

    async def _resume(self, signed: SignedJob, entry: Identity,
                      request_id: str) -> tuple[VerifiedJob, NonceClaim] | None:
        """A script job this site accepted before its entry restarted, admitted again once:
        its share then returns the release it made (charging nothing: releases are kept
        per job id), or runs again if it made none (the entry's restart cut it off). None:
        not one this site has accepted (never reached it, or so long ago that its nonce is
        forgotten), so it is admitted as a first run, freshness checked.

        Not checked for freshness: it was fresh when this site accepted it, and the entry
        may have been down for longer than the freshness window. Only the entry the
        researcher signed for can ask (`_verified`), and only once (a durable marker)."""
        job = self._verified(signed, entry, fresh=False)
        if job.request.kind != "script" or not await self._store.nonce_seen_now(
                job.request.nonce):
            return None
        if self._scripts.review == "deny":
            raise Refused("this site's script policy is 'deny': it does not run researcher "
                          "scripts")
        accepted = (job.researcher.name, job.researcher.role, "subjob", "resumed",
                    {"job": job.request.job_id, "catalog": job.request.catalog,
                     "via": entry.name, "request_id": request_id})
        claim = NonceClaim(RESUME_PREFIX + job.request.nonce, job.researcher.name,
                           self._max_age, accepted)
        if not await self._store.claim_nonce(claim):
            raise Replayed(_RESUMED_ONCE)
        return job, claim

    async def _reported(self, job: VerifiedJob, claim: NonceClaim,
                        resumed: bool = False) -> AsyncGenerator[SubJobEvent, None]:
        """The share's events as it runs here, its outcome last. "accepted" is progress: a
        site that answers within ACCEPTED_AFTER_S reports its outcome straight away (one
        message, not two); a slower one first says it accepted, before any other event."""
        events: asyncio.Queue[SiteEvent | LogLine] = asyncio.Queue()

        async def running() -> None:
            events.put_nowait(SiteEvent(self._site.name, "running"))

        async def logged(line: str) -> None:
            events.put_nowait(LogLine(line))

        task = asyncio.create_task(self._site.run(
            job, ShareProgress(running, logged), resumed=resumed,
            nonce=None if claim.consumed else claim))
        reported = False
        getter: asyncio.Task[SiteEvent | LogLine] | None = None
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
                    yield SiteEvent(self._site.name, "accepted")
                if got is not None:
                    yield got
            outcome = task.result()
        finally:
            if getter is not None and not getter.done():  # the entry went away mid-wait
                getter.cancel()
            if not task.done():
                task.cancel()
                # A release transaction it began commits anyway (the store shields it):
                # waited for, so that _run's refund finds the charge it has to undo.
                await asyncio.wait([task])
                if not task.cancelled():
                    task.exception()  # retrieved: it ended as it did, unasked
        yield outcome

    async def _admit_script(self, job: VerifiedJob, entry: Identity, request_id: str) -> None:
        """This site's script policy for a federated script: it cannot hold the entry
        node's stream open for an admin, so 'review' answers at once and keeps a pending
        request an admin can approve (remembered) before the researcher resubmits."""
        req = job.request
        if self._scripts.review == "deny":
            raise Refused("this site's script policy is 'deny': it does not run researcher "
                          "scripts")
        if not await self._scripts.needs_review(self._store, req.script_sha256):
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
