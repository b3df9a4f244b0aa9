"""Jobs at the node a researcher talks to: accept, run (locally or fanned out), watch, result.

A job is recorded in the store before the researcher learns its id: `submit` returns once
its signed request is written (durably for scripts), so a restart can resume or mark it. A
query followed in the same call (RunJob) has no id to lose: its row, bookkeeping (the
privacy decisions are the sites' durable releases), is written while it fans out — in
this site's own release transaction when it holds a share — and before its id is first
shown. A query's final state is shown before it is written (with the next transaction, a
group commit at the latest), so neither write is on the answer's path, nor a transaction
of its own; until a write lands, readers see the job from memory. Watchers get a snapshot
(state, per-site events, result) and then live events; events are deduplicated by (site,
state) so a watcher that joins mid-job sees each transition once.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import hashlib
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import structlog

from stimnetd import codec
from stimnetd.errors import (
    Conflict,
    NotFound,
    Overloaded,
    PermissionDenied,
    Refused,
    StimnetError,
)
from stimnetd.federation.fanout import Coordinator, FanoutResult
from stimnetd.jobs.scripts import spec_from_partials
from stimnetd.jobs.signing import SignedJob, VerifiedJob
from stimnetd.jobs.site import SiteExecutor
from stimnetd.pki import Identity
from stimnetd.query.combine import combine
from stimnetd.query.errors import IncompatiblePartials
from stimnetd.query.result import finalize
from stimnetd.store import Store
from stimnetd.store.records import TERMINAL_STATES, JobRecord

log = structlog.get_logger("stimnetd.jobs")

# How long a job's own submitter (RunJob) hears nothing: see JobService.watch.
QUIET_START_S = 0.05
_REPLAYED = "replayed request: this signed job was already submitted"


@dataclass(frozen=True)
class ScriptPolicy:
    policy: str = "review"        # auto | review | deny
    concurrency: int = 1
    on_restart: str = "interrupt"  # interrupt | requeue
    max_pending_per_researcher: int = 16


@dataclass(frozen=True)
class JobUpdate:
    """One thing a watcher sees: a state change, a site event, a log line or the result."""

    # state (the final one may carry the result) | site | sites (several at once) | log | result
    kind: str
    job: JobRecord | None = None
    site: dict[str, Any] | None = None
    sites: list[dict[str, Any]] = field(default_factory=list)
    line: str = ""
    result: bytes | None = None  # the answer as stored (codec.pack): streamed as it is


@dataclass
class _Live:
    watchers: set[asyncio.Queue[JobUpdate]] = field(default_factory=set)
    sites: list[dict[str, Any]] = field(default_factory=list)
    task: asyncio.Task[None] | None = None
    # The job as it is now, while the store does not have it yet (a query's row being
    # created, or its final state being written): what readers are shown meanwhile.
    unwritten: JobRecord | None = None
    # A followed query's row being created (see `submit`): False if it was a replay.
    created: asyncio.Future[bool] | None = None


class JobService:
    def __init__(self, *, node: str, store: Store, executor: SiteExecutor,
                 coordinator: Coordinator, verify: Callable[[SignedJob], VerifiedJob],
                 script_policy: ScriptPolicy | None = None, request_max_age_s: float = 300.0,
                 retention_days: float = 0.0, max_queries_per_researcher: int = 32,
                 clock: Callable[[], float] = time.time) -> None:
        self._node = node
        # Queries running per researcher (entry side), and which job counts for whom.
        self._max_queries = max_queries_per_researcher
        self._queries: collections.Counter[str] = collections.Counter()
        self._counted: dict[str, str] = {}
        # Said when a job is not found: it may have finished long ago and been deleted.
        self._kept = (f" (finished jobs are kept for {retention_days:g} days)"
                      if retention_days else "")
        self._scripts = script_policy or ScriptPolicy()
        # Sandbox runs are heavy: at most `concurrency` at once; queries are not queued.
        self._script_slots = asyncio.Semaphore(self._scripts.concurrency)
        self._store = store
        self._executor = executor
        self._coordinator = coordinator
        self._verify = verify
        self._max_age = request_max_age_s
        self._clock = clock
        self._live: dict[str, _Live] = {}
        self._stopping = False

    # -- accept ------------------------------------------------------------------------

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
            return await self._submit(job, caller, request_id, follow)
        owner = job.researcher.name
        if self._queries[owner] >= self._max_queries:
            raise Overloaded(f"you have {self._queries[owner]} queries running with this node "
                             f"as their entry, its limit per researcher "
                             f"(max_queries_per_researcher = {self._max_queries}); wait for one "
                             "to finish")
        # Reserved before the first await, so concurrent submissions cannot pass together;
        # the running job holds it from then on (`_run` gives it back).
        self._queries[owner] += 1
        try:
            record = await self._submit(job, caller, request_id, follow)
        except BaseException:
            self._release_query(owner)
            raise
        self._counted[record.id] = owner
        return record

    async def _submit(self, job: VerifiedJob, caller: Identity, request_id: str,
                      follow: bool) -> JobRecord:
        req, signed = job.request, job.signed
        # A query starts at once: recorded as running in its submit transaction, saving a
        # commit on every query's path (a restart interrupts queued and running alike).
        state, detail = ("running" if req.kind == "query" else "queued"), ""
        if req.kind == "script" and req.scope == "local":
            state, detail = await self._script_admission(req.script_sha256)
        if req.scope == "local":
            await self._executor.precheck(job)
        now = self._clock()
        record = JobRecord(
            id=req.job_id, kind=req.kind, scope=req.scope, catalog=req.catalog,
            owner=job.researcher.name, state=state, detail=detail, created_at=now,
            updated_at=now,
            request_id=request_id, origin="client", payload=signed.payload,
            signature=signed.signature, signer_cert=signed.signer_cert_pem,
            script=signed.script or None, script_sha256=req.script_sha256)
        followed_query = req.kind == "query" and follow
        create = self._store.create_job(
            record, audit=(caller.name, caller.role, "submit"), nonce=(req.nonce, self._max_age),
            durable=req.kind != "query",
            pending_limit=self._scripts.max_pending_per_researcher if req.kind == "script"
            else None,
            # Rides in this site's own release (or refusal) of the query, which comes within
            # a millisecond: a transaction, and a trip to the database thread, fewer per
            # query. Without a share here there is nothing to ride in, and waiting for the
            # group commit would hold the answer up.
            defer=followed_query and (req.scope == "local"
                                      or self._coordinator.holds_catalog(req.catalog)))
        # A query's row is bookkeeping (its privacy decisions are the sites' durable
        # releases, and a replay is stopped there too): no fsync of its own (store/groupcommit.Writer.run).
        if followed_query:
            # Nor does the fan-out wait for it. A replay is refused here from memory (the
            # job id derives from the nonce; the store reloads its nonces at start); the
            # row's own check, which cannot be bypassed, fails the job before any answer
            # or id is shown.
            if record.id in self._live or self._store.nonce_seen(req.nonce):
                create.close()
                raise Conflict(_REPLAYED)
            live = self._live[record.id] = _Live(unwritten=record,
                                                 created=asyncio.ensure_future(create))
            live.task = asyncio.create_task(self._run(record, job), name=f"job-{record.id}")
            return record
        if not await create:
            raise Conflict(_REPLAYED)
        live = self._live.setdefault(record.id, _Live())
        if state in ("queued", "running"):
            live.task = asyncio.create_task(self._run(record, job), name=f"job-{record.id}")
        return record

    def _uncount_query(self, job_id: str) -> None:
        if (owner := self._counted.pop(job_id, None)) is not None:
            self._release_query(owner)

    def _release_query(self, owner: str) -> None:
        self._queries[owner] -= 1
        if not self._queries[owner]:
            del self._queries[owner]

    async def _local_script_refusal(self, record: JobRecord, job: VerifiedJob) -> str | None:
        """This site's own share of a federated script is under this site's script policy,
        as each peer's is under its own: None to run it, else why it is refused. Under
        'review' an unapproved script answers at once, as at a peer, leaving a request an
        admin can approve (remembered) before the researcher resubmits."""
        try:
            state, _ = await self._script_admission(record.script_sha256 or "")
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

    async def _script_admission(self, sha256: str) -> tuple[str, str]:
        """The site's script policy: run, hold for an admin, or refuse (with why)."""
        if self._scripts.policy == "deny":
            raise Refused("this site's script policy is 'deny': it does not run researcher "
                          "scripts (queries are still accepted)")
        if self._scripts.policy == "review" and not await self._store.is_script_approved(sha256):
            return ("awaiting_approval",
                    f"site policy 'review': an admin must approve script sha256 {sha256[:16]}…")
        return "queued", ""

    # -- review ----------------------------------------------------------------------------

    async def approve(self, job_id: str, admin: Identity, remember: bool) -> JobRecord:
        record = await self._pending(job_id)
        job = self._restore(record) if record.origin == "client" else None
        # The decision is one conditional update: of two racing approvals, or an approval
        # racing the researcher's cancel, exactly one applies (the job runs at most once).
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
        live = self._live.setdefault(job_id, _Live())
        live.task = asyncio.create_task(self._run(updated, job), name=f"job-{job_id}")
        await self._publish(job_id, JobUpdate("state", job=updated))
        return updated

    async def deny(self, job_id: str, admin: Identity) -> JobRecord:
        await self._pending(job_id)
        updated = await self._decide(job_id, "failed", f"denied by site admin {admin.name}")
        await self._store.audit(admin.name, admin.role, "approve", "denied", {"job": job_id})
        await self._end_pending(job_id, updated)
        return updated

    async def _decide(self, job_id: str, state: str, detail: str) -> JobRecord:
        updated = await self._store.update_job_if(job_id, "awaiting_approval", state=state,
                                                  detail=detail)
        if updated is None:
            raise Conflict(f"job {job_id} is no longer awaiting approval (decided or "
                           "cancelled meanwhile)")
        return updated

    async def _end_pending(self, job_id: str, updated: JobRecord) -> None:
        """A job decided while awaiting approval (denied, cancelled): its watchers get the
        final state and their streams end; nothing of it stays in memory."""
        await self._publish(job_id, JobUpdate("state", job=updated))
        live = self._live.pop(job_id, None)
        for q in list(live.watchers if live else ()):
            q.put_nowait(JobUpdate("end"))

    async def _pending(self, job_id: str) -> JobRecord:
        record = await self._store.get_job(job_id)
        if record is None:
            raise NotFound(f"no job {job_id!r} on this node{self._kept}")
        if record.state != "awaiting_approval":
            raise Conflict(f"job {job_id} is {record.state}, not awaiting approval")
        return record

    def _restore(self, record: JobRecord) -> VerifiedJob:
        """A stored job's signed request, re-verified (chain, revocation, signature) but not
        for freshness: it was fresh when accepted and has waited in our queue since."""
        from stimnetd.jobs.signing import SignedJob as Signed

        signed = Signed(record.payload, record.signature, record.signer_cert, record.script or b"")
        return self._verify(signed, fresh=False)  # type: ignore[call-arg]

    # -- run ---------------------------------------------------------------------------

    async def _run(self, record: JobRecord, job: VerifiedJob) -> None:
        live = self._live[record.id]
        slot = self._script_slots if record.kind == "script" else contextlib.nullcontext()
        try:
            async with slot:
                await self._run_inner(record, job, live)
        except asyncio.CancelledError:
            # On shutdown the job stays `running` in the store; recover() decides at the
            # next start (interrupted, or re-queued by policy). Otherwise a user cancelled.
            if not self._stopping:
                await asyncio.shield(self._cancelled(record, live.created))
            raise
        finally:
            self._live.pop(record.id, None)
            self._uncount_query(record.id)
            for q in list(live.watchers):
                q.put_nowait(JobUpdate("end"))

    async def _cancelled(self, record: JobRecord, created: asyncio.Future[bool] | None) -> None:
        if not await _has_row(created):
            return  # a replay, or its row could not be written: nothing of its own to mark
        await self._set_state(record.id, "cancelled", "cancelled by request")

    async def _run_inner(self, record: JobRecord, job: VerifiedJob, live: _Live) -> None:
        try:
            if record.state != "running":
                await self._set_state(record.id, "running", "")
            if record.scope == "federated":
                refusal = await self._local_script_refusal(record, job) \
                    if record.kind == "script" else None
                fan = await self._coordinator.run(job, record.request_id, self._site_sink(record.id),
                                                  resumed=record.attempts > 0,
                                                  local_refusal=refusal)
            else:
                outcome = await self._executor.run(job, self._local_sink(record.id),
                                                   resumed=record.attempts > 0)
                await self._site_event(record.id, outcome.site, outcome.state, outcome.detail,
                                       outcome.n)
                fan = FanoutResult([outcome])
            if live.created is not None and not await live.created:
                # The row's own nonce check refused it (the nonce was in the database but
                # not in memory): a replay. Its row is the first submission's; nothing of
                # this one is shown or kept.
                await self._publish(record.id, JobUpdate("state", job=replace(
                    record, state="failed", detail=_REPLAYED, updated_at=self._clock(),
                    sites=list(live.sites))))
                return
            state, detail, answer = self._finish(job, fan)
            blob = codec.pack(*answer) if answer is not None else None
            # The final state carries the answer: watchers get both in one update.
            if record.kind == "query":
                # Shown first, written after: the row is bookkeeping, and readers see the
                # final state from memory until it lands.
                final = live.unwritten = replace(
                    record, state=state, detail=detail, updated_at=self._clock(),
                    sites=list(live.sites), result=blob)
                await self._publish(record.id, JobUpdate("state", job=final, result=blob))
                # Its researcher has the answer and may ask the next question now.
                self._uncount_query(record.id)
                await self._record_final(final)
            else:
                await self._set_state(record.id, state, detail, sites=live.sites, result=blob)
        except asyncio.CancelledError:
            raise
        except Exception:  # noqa: BLE001 - a job failure is the job's state, not a crash
            log.exception("job failed", job=record.id)
            failed = ("failed", "internal error (see the node's logs)")
            if await _has_row(live.created):
                await self._set_state(record.id, *failed)
            else:  # its row could not be written: the failure is shown from memory only
                await self._publish(record.id, JobUpdate("state", job=replace(
                    record, state=failed[0], detail=failed[1], updated_at=self._clock(),
                    sites=list(live.sites))))

    async def _record_final(self, final: JobRecord) -> None:
        """Write a query's final state, already shown to its watchers. A failure leaves
        the row 'running' (a restart marks it interrupted); the answer stands."""
        try:
            # With the next transaction (a group commit at the latest): the job stays
            # in memory, where readers see it, until then.
            await self._store.update_job(final.id, state=final.state, detail=final.detail,
                                         sites=final.sites, result=final.result,
                                         durable=False, defer=True)
        except Exception:  # noqa: BLE001 - the answer is out; the row is bookkeeping
            log.exception("query's final state not recorded", job=final.id)

    def _finish(self, job: VerifiedJob, fan: FanoutResult
                ) -> tuple[str, str, tuple[dict[str, Any], dict[str, np.ndarray]] | None]:
        req = job.request
        contributors = fan.contributors
        manifest = fan.manifest()
        if len(contributors) < req.min_sites:
            why = "; ".join(f"{o.site}: {o.state}{' (' + o.detail + ')' if o.detail else ''}"
                            for o in fan.outcomes if o.state != "done") or (
                f"no site this node knows of holds catalog {req.catalog!r} (`stimctl "
                "catalogs` lists the federation's)")
            return ("failed", f"only {len(contributors)} site(s) contributed, "
                    f"min_sites is {req.min_sites} — {why}", None)
        try:
            combined = combine([o.partials for o in contributors], [o.site for o in contributors])
            spec = req.query_spec if req.kind == "query" \
                else spec_from_partials(req.catalog, combined)
        except (IncompatiblePartials, StimnetError) as exc:
            return "failed", f"sites returned incompatible results: {exc}", None
        result = finalize(spec, combined)
        privacy = [{"site": o.site, "epsilon": o.epsilon, "mechanism": o.mechanism}
                   for o in contributors]
        doc = {"result": result.to_dict(), "manifest": manifest, "privacy": privacy,
               "query": req.spec, "scope": req.scope, "kind": req.kind,
               "script_sha256": req.script_sha256 or None}
        return "succeeded", f"{len(contributors)} site(s) contributed", (doc, result.arrays)

    def _site_sink(self, job_id: str):  # type: ignore[no-untyped-def]
        async def sink(site: str, state: str, detail: str, n: int) -> None:
            await self._site_event(job_id, site, state, detail, n)
        return sink

    def _local_sink(self, job_id: str):  # type: ignore[no-untyped-def]
        async def sink(state: str, detail: str) -> None:
            await self._site_event(job_id, self._executor.site, state, detail, 0)
        return sink

    async def _site_event(self, job_id: str, site: str, state: str, detail: str, n: int) -> None:
        if state == "log":
            # Log lines the site's log policy let through; not a state of the site.
            await self._publish(job_id, JobUpdate("log", line=f"{site}: {detail}"))
            return
        event = {"site": site, "state": state, "detail": detail, "n": n, "at": self._clock()}
        live = self._live.get(job_id)
        if live is not None:
            live.sites.append(event)
        await self._publish(job_id, JobUpdate("site", site=event))

    async def _set_state(self, job_id: str, state: str, detail: str,
                         sites: list[dict[str, Any]] | None = None,
                         result: bytes | None = None, durable: bool = True) -> None:
        record = await self._store.update_job(job_id, state=state, detail=detail, sites=sites,
                                              result=result, durable=durable)
        await self._publish(job_id, JobUpdate("state", job=record, result=result))

    async def _publish(self, job_id: str, update: JobUpdate) -> None:
        live = self._live.get(job_id)
        if live is None:
            return
        for q in list(live.watchers):
            q.put_nowait(update)

    # -- read ----------------------------------------------------------------------------

    async def get(self, job_id: str, caller: Identity) -> JobRecord:
        live = self._live.get(job_id)
        record = _as_now(live.unwritten if live is not None and live.unwritten is not None
                         else await self._store.get_job(job_id), live)
        if record is None or not _may_see(record, caller):
            raise NotFound(f"no job {job_id!r} visible to you on this node{self._kept}")
        return record

    async def list(self, caller: Identity, limit: int) -> list[JobRecord]:
        """The caller's jobs (an admin's: all), newest first — as `get` shows them: a
        query whose row is not written yet, or whose final state is not, as it is now."""
        owner = None if caller.role == "admin" else caller.name
        limit = max(1, min(limit or 50, 500))
        records = {r.id: r for r in await self._store.list_jobs(owner=owner, limit=limit)}
        for job_id, live in list(self._live.items()):
            record = _as_now(live.unwritten or records.get(job_id), live)
            if record is not None and _may_see(record, caller):
                records[job_id] = record
        return sorted(records.values(), key=lambda r: r.created_at, reverse=True)[:limit]

    async def result(self, job_id: str, caller: Identity) -> bytes:
        """The job's answer as stored (codec.pack), for streaming as it is."""
        record = await self.get(job_id, caller)
        if not _owns(record, caller):
            raise PermissionDenied("only the researcher who submitted a job may read its result")
        if record.result is None:
            raise Conflict(f"job {job_id} has no result (state: {record.state}"
                           f"{', ' + record.detail if record.detail else ''})")
        return record.result

    async def cancel(self, job_id: str, caller: Identity) -> JobRecord:
        record = await self.get(job_id, caller)
        if caller.role != "admin" and not _owns(record, caller):
            raise PermissionDenied("only the job's owner or an admin may cancel it")
        live = self._live.get(job_id)
        if record.state == "awaiting_approval":
            updated = await self._decide(job_id, "cancelled", f"cancelled by {caller.name}")
            await self._end_pending(job_id, updated)
            return updated
        if record.terminal or live is None or live.task is None:
            raise Conflict(f"job {job_id} is {record.state}; nothing to cancel")
        live.task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await live.task
        return await self.get(job_id, caller)

    async def watch(self, job_id: str, caller: Identity,
                    submitted: JobRecord | None = None) -> AsyncIterator[JobUpdate]:
        """`submitted`: the record `submit` just returned to this caller (RunJob), which
        spares a read. Such a watcher hears nothing for QUIET_START_S: a job that ends by
        then is one message, its final state (which lists every site's event); a longer one
        then reports what it held back (its state, the site events as one update) and
        continues live. Per-message cost, not bytes, dominates a small federated query."""
        queue: asyncio.Queue[JobUpdate] = asyncio.Queue()
        live = self._live.get(job_id)
        if live is not None:
            live.watchers.add(queue)
        try:
            if submitted is not None and submitted.id == job_id and _owns(submitted, caller):
                record = submitted
            else:
                record = await self.get(job_id, caller)
            seen: set[tuple[str, str]] = set()
            quiet = record is submitted and live is not None
            if record.terminal:
                # A finished job is one update, as a live job's end is: its final state
                # (listing every site's event) carrying its answer, if the caller's.
                yield JobUpdate("state", job=record,
                                result=record.result if _owns(record, caller) else None)
                return
            if not quiet:
                yield JobUpdate("state", job=record)
                snapshot = record.sites if live is None else list(live.sites)
                for ev in snapshot:
                    seen.add((ev["site"], ev["state"]))
                    yield JobUpdate("site", site=ev)
            if live is None:
                return
            held: collections.deque[JobUpdate] = collections.deque()

            def fresh_site(u: JobUpdate) -> bool:
                key = (u.site["site"], u.site["state"])  # type: ignore[index]
                if key in seen:
                    return False
                seen.add(key)
                return True

            def pending() -> JobUpdate | None:
                if held:
                    return held.popleft()
                return None if queue.empty() else queue.get_nowait()

            if quiet:
                early, final = await _quiet_start(queue, QUIET_START_S)
                if final is not None:
                    # A quick job: its final state lists every site's event. Log lines
                    # are not in it, so those still go out first.
                    for u in early:
                        if u.kind == "log":
                            yield u
                    held.append(final)
                else:
                    # The job's id is shown only once its row is there; a replay's (the
                    # first submission's id) never is: its failure follows.
                    if await _has_row(live.created):
                        yield JobUpdate("state", job=record)
                    held.extend(early)

            while True:
                update = pending() or await queue.get()
                if update.kind == "end":
                    return
                if update.kind == "site":
                    if not fresh_site(update):
                        continue
                    # Site events that arrived meanwhile go out together: one message
                    # instead of one per event.
                    batch = [update.site]
                    while (nxt := pending()) is not None:
                        if nxt.kind != "site":
                            held.appendleft(nxt)
                            break
                        if fresh_site(nxt):
                            batch.append(nxt.site)
                    if len(batch) > 1:
                        yield JobUpdate("sites", sites=batch)  # type: ignore[arg-type]
                        continue
                if update.result is not None and not _owns(record, caller):
                    # Only the researcher who asked sees the answer.
                    if update.kind == "result":
                        continue
                    update = JobUpdate(update.kind, job=update.job, site=update.site,
                                       line=update.line)
                yield update
                if update.kind == "state" and update.job is not None and update.job.terminal:
                    # Nothing follows a final state: the stream ends now, not when the
                    # job's task does (a query's final write is still on its way).
                    return
        finally:
            if live is not None:
                live.watchers.discard(queue)

    # -- lifecycle -------------------------------------------------------------------------

    async def recover(self) -> int:
        """After a restart no job is lost and none runs twice:

        - queries that were queued or running → interrupted (the researcher resubmits;
          each site's release is idempotent per job, so nothing is charged twice);
        - script jobs that were running → interrupted, or re-queued if the site's
          `on_restart` policy says so (a re-run that already released returns the stored
          release without running the container again);
        - queued script jobs run; jobs awaiting approval keep waiting.
        Returns how many jobs were interrupted.
        """
        interrupted = 0
        for record in await self._store.list_jobs(states=("queued", "running"), limit=10_000):
            requeue = record.kind == "script" and record.scope == "local" and (
                record.state == "queued" or self._scripts.on_restart == "requeue")
            if not requeue:
                await self._store.update_job(
                    record.id, state="interrupted",
                    detail="the node restarted while this job ran; resubmit")
                interrupted += 1
                continue
            try:
                job = self._restore(record)
            except StimnetError as exc:
                await self._store.update_job(record.id, state="failed",
                                             detail=f"cannot resume after restart: {exc}")
                continue
            updated = await self._store.update_job(record.id, state="queued",
                                                   detail="re-queued after a restart",
                                                   bump_attempts=True)
            live = self._live.setdefault(record.id, _Live())
            live.task = asyncio.create_task(self._run(updated, job), name=f"job-{record.id}")
        return interrupted

    async def shutdown(self) -> None:
        self._stopping = True
        tasks = [live.task for live in self._live.values() if live.task is not None]
        for t in tasks:
            t.cancel()
        for t in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t


async def _quiet_start(queue: asyncio.Queue[JobUpdate], window_s: float
                       ) -> tuple[list[JobUpdate], JobUpdate | None]:
    """Updates that arrive within `window_s`, and the final state if the job ended by then
    (or None). Stops early at the final state or the end of the job."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + window_s
    early: list[JobUpdate] = []
    while (left := deadline - loop.time()) > 0:
        getter = asyncio.ensure_future(queue.get())
        try:
            done, _ = await asyncio.wait({getter}, timeout=left)
        finally:
            if not getter.done():
                # Cancelled before it completed (the window closed, or the watcher went
                # away), so it has taken nothing from the queue.
                getter.cancel()
        if getter not in done:
            break
        got = getter.result()
        if got.kind == "state" and got.job is not None and got.job.terminal:
            return early, got
        early.append(got)
        if got.kind == "end":
            break
    return early, None


async def _has_row(created: asyncio.Future[bool] | None) -> bool:
    """Whether a job's row exists: always, but for a followed query whose row's creation
    (see `JobService.submit`) refused it as a replay or failed."""
    if created is None:
        return True
    try:
        return await asyncio.shield(created)
    except asyncio.CancelledError:
        raise
    except Exception:  # noqa: BLE001 - logged by the job's own failure path
        return False


def _owns(record: JobRecord, caller: Identity) -> bool:
    """Jobs are researchers' (their signer's): an admin or a node certificate that happens
    to carry a researcher's name owns nothing of theirs."""
    return caller.role == "researcher" and record.owner == caller.name


def _may_see(record: JobRecord, caller: Identity) -> bool:
    return caller.role == "admin" or _owns(record, caller)


def _as_now(record: JobRecord | None, live: _Live | None) -> JobRecord | None:
    """A job's record with the site events it has so far (a running job's row has none)."""
    if record is None or live is None or record.sites or not live.sites:
        return record
    return replace(record, sites=list(live.sites))


def new_request_id() -> str:
    return uuid.uuid4().hex[:16]


__all__ = ["JobService", "JobUpdate", "TERMINAL_STATES", "new_request_id"]
