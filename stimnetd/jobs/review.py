"""Scripts under review: the entry's script policy, and an admin's decision on a job that
waits for one (approve — perhaps remembering the script's hash — or deny)."""

from __future__ import annotations

import contextlib
import hashlib
import time
from collections.abc import Callable

from stimnet.errors import Conflict, NotFound, Refused
from stimnet.pki import Identity
from stimnet.signing import VerifiedJob
from stimnet.states import JobState
from stimnetd.jobs.events import JobEventHub, JobUpdate
from stimnetd.site.policy import ScriptPolicy
from stimnetd.store import SiteStore
from stimnetd.store.records import JobRecord


class ScriptGate:
    """This site's script policy for the jobs it is the entry of: run, hold for an admin,
    or refuse (saying why)."""

    def __init__(self, *, node: str, policy: ScriptPolicy, store: SiteStore,
                 clock: Callable[[], float] = time.time) -> None:
        self._node = node
        self.policy = policy
        self._store = store
        self._clock = clock

    async def admit(self, sha256: str) -> tuple[JobState, str]:
        """The state a script job starts in, and why it waits if it does."""
        if self.policy.review == "deny":
            raise Refused("this site's script policy is 'deny': it does not run researcher "
                          "scripts (queries are still accepted)")
        if await self.policy.needs_review(self._store, sha256):
            return ("awaiting_approval",
                    f"site policy 'review': an admin must approve script sha256 {sha256[:16]}…")
        return "queued", ""

    async def local_share_refusal(self, record: JobRecord, job: VerifiedJob) -> str | None:
        """This site's own share of a federated script is under this site's script policy,
        as each peer's is under its own: None to run it, else why it is refused. Under
        'review' an unapproved script answers at once, as at a peer, leaving a request an
        admin can approve (remembered) before the researcher resubmits."""
        try:
            state, _ = await self.admit(record.script_sha256 or "")
        except Refused as exc:
            return str(exc)
        if state != "awaiting_approval":
            return None
        now = self._clock()
        pending = hashlib.sha256(f"{record.id}:local-share".encode()).hexdigest()[:24]
        with contextlib.suppress(Conflict):  # a resumed run: already pending
            await self._store.create_job(JobRecord(
                id=pending, kind="script", scope="federated", catalog=record.catalog,
                owner=record.owner, state="awaiting_approval",
                detail=f"this site's share of federated job {record.id}", created_at=now,
                updated_at=now, request_id=record.request_id, origin=self._node,
                payload=record.payload, signature=record.signature,
                signer_cert=record.signer_cert, script=record.script,
                script_sha256=record.script_sha256),
                audit=(job.researcher.name, job.researcher.role, "submit"))
        return (f"awaiting approval: site policy 'review' — an admin here must approve script "
                f"sha256 {(record.script_sha256 or '')[:16]}… (job {pending}); resubmit once "
                "approved")


class JobReview:
    """Decisions on jobs awaiting approval. Each is one conditional update: of two racing
    approvals, or an approval racing the researcher's cancel, exactly one applies (the job
    runs at most once, never after its cancel)."""

    def __init__(self, *, store: SiteStore, hub: JobEventHub,
                 start: Callable[[JobRecord, VerifiedJob], None],
                 restore: Callable[[JobRecord], VerifiedJob], not_found_note: str = "") -> None:
        self._store = store
        self._hub = hub
        self._start = start
        self._restore = restore
        self._not_found_note = not_found_note

    async def approve(self, job_id: str, admin: Identity, remember: bool) -> JobRecord:
        record = await self._pending(job_id)
        job = self._restore(record) if record.origin == "client" else None
        if job is None:
            # A peer's request (or this site's share of a federated script) was answered
            # "awaiting approval" at once; the researcher resubmits and the remembered
            # approval lets it run.
            updated = await self._decide(job_id, "cancelled",
                                         f"approved by {admin.name} (remembered); the "
                                         "researcher resubmits")
        else:
            updated = await self._decide(job_id, "queued", f"approved by {admin.name}")
        await self._store.audit(admin.name, admin.role, "approve", "approved",
                                {"job": job_id, "script_sha256": record.script_sha256,
                                 "remember": remember})
        if remember or job is None:
            await self._store.approve_script(record.script_sha256, admin.name)
        if job is None:
            return updated
        self._start(updated, job)
        self._hub.publish(job_id, JobUpdate("state", job=updated))
        return updated

    async def deny(self, job_id: str, admin: Identity) -> JobRecord:
        await self._pending(job_id)
        updated = await self._decide(job_id, "failed", f"denied by site admin {admin.name}")
        await self._store.audit(admin.name, admin.role, "approve", "denied", {"job": job_id})
        self._end(job_id, updated)
        return updated

    async def cancel(self, job_id: str, caller: Identity) -> JobRecord:
        """The researcher (or an admin) withdraws a job before an admin decided on it."""
        updated = await self._decide(job_id, "cancelled", f"cancelled by {caller.name}")
        self._end(job_id, updated)
        return updated

    async def _decide(self, job_id: str, state: JobState, detail: str) -> JobRecord:
        updated = await self._store.update_job_if(job_id, "awaiting_approval", state=state,
                                                  detail=detail)
        if updated is None:
            raise Conflict(f"job {job_id} is no longer awaiting approval (decided or "
                           "cancelled meanwhile)")
        return updated

    def _end(self, job_id: str, updated: JobRecord) -> None:
        """A job decided while awaiting approval (denied, cancelled): its watchers get the
        final state and their streams end; nothing of it stays in memory."""
        self._hub.publish(job_id, JobUpdate("state", job=updated))
        self._hub.close(job_id)

    async def _pending(self, job_id: str) -> JobRecord:
        record = await self._store.get_job(job_id)
        if record is None:
            raise NotFound(f"no job {job_id!r} on this node{self._not_found_note}")
        if record.state != "awaiting_approval":
            raise Conflict(f"job {job_id} is {record.state}, not awaiting approval")
        return record
