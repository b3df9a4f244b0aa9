"""Jobs at the node a researcher talks to: accept, run (locally or fanned out), watch, result.

A job is durable from the moment `submit` returns: its signed request is in the store, so
a restart can resume or mark it. Watchers get a snapshot (state, per-site events, result)
and then live events; events are deduplicated by (site, state) so a watcher that joins
mid-job sees each transition once.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import structlog

from stimnetd import codec
from stimnetd.errors import Conflict, InvalidRequest, NotFound, PermissionDenied
from stimnetd.federation.fanout import Coordinator, FanoutResult
from stimnetd.jobs.signing import SignedJob, VerifiedJob
from stimnetd.jobs.site import SiteExecutor
from stimnetd.pki import Identity
from stimnetd.query.combine import combine
from stimnetd.query.errors import IncompatiblePartials
from stimnetd.query.result import finalize
from stimnetd.query.spec import QuerySpec
from stimnetd.store import Store
from stimnetd.store.records import TERMINAL_STATES, JobRecord

log = structlog.get_logger("stimnetd.jobs")


@dataclass(frozen=True)
class JobUpdate:
    """One thing a watcher sees: a state change, a site event, a log line or the result."""

    kind: str                          # state | site | log | result
    job: JobRecord | None = None
    site: dict[str, Any] | None = None
    line: str = ""
    result: tuple[dict[str, Any], dict[str, np.ndarray]] | None = None


@dataclass
class _Live:
    watchers: set[asyncio.Queue[JobUpdate]] = field(default_factory=set)
    sites: list[dict[str, Any]] = field(default_factory=list)
    task: asyncio.Task[None] | None = None


class JobService:
    def __init__(self, *, node: str, store: Store, executor: SiteExecutor,
                 coordinator: Coordinator, verify: Callable[[SignedJob], VerifiedJob],
                 clock: Callable[[], float] = time.time) -> None:
        self._node = node
        self._store = store
        self._executor = executor
        self._coordinator = coordinator
        self._verify = verify
        self._clock = clock
        self._live: dict[str, _Live] = {}

    # -- accept ------------------------------------------------------------------------

    async def submit(self, signed: SignedJob, caller: Identity, request_id: str) -> JobRecord:
        job = self._verify(signed)
        if (job.researcher.name, job.researcher.role) != (caller.name, caller.role):
            raise PermissionDenied(f"job is signed by {job.researcher} but submitted by {caller}; "
                                   "researchers submit their own jobs")
        req = job.request
        if req.kind == "script":
            raise InvalidRequest("script jobs are not enabled on this node yet")
        if req.scope == "local":
            await self._executor.precheck(job)
        now = self._clock()
        record = JobRecord(
            id=req.job_id, kind=req.kind, scope=req.scope, catalog=req.catalog,
            owner=job.researcher.name, state="queued", detail="", created_at=now, updated_at=now,
            request_id=request_id, origin="client", payload=signed.payload,
            signature=signed.signature, signer_cert=signed.signer_cert_pem,
            script=signed.script or None, script_sha256=req.script_sha256)
        if not await self._store.create_job(record, audit=(caller.name, caller.role, "submit"),
                                           nonce=(req.nonce, self._max_age())):
            raise Conflict("replayed request: this signed job was already submitted")
        live = self._live.setdefault(record.id, _Live())
        live.task = asyncio.create_task(self._run(record, job), name=f"job-{record.id}")
        return record

    def _max_age(self) -> float:
        return getattr(self._verify, "max_age_s", 300.0)

    # -- run ---------------------------------------------------------------------------

    async def _run(self, record: JobRecord, job: VerifiedJob) -> None:
        live = self._live[record.id]
        try:
            await self._set_state(record.id, "running", "")
            if record.scope == "federated":
                fan = await self._coordinator.run(job, record.request_id, self._site_sink(record.id))
            else:
                outcome = await self._executor.run(job, self._local_sink(record.id))
                await self._site_event(record.id, outcome.site, outcome.state, outcome.detail,
                                       outcome.n)
                fan = FanoutResult([outcome])
            state, detail, blob = self._finish(job, fan)
            await self._set_state(record.id, state, detail, sites=live.sites, result=blob)
            if blob:
                await self._publish(record.id, JobUpdate("result", result=codec.unpack(blob)))
        except asyncio.CancelledError:
            await asyncio.shield(self._set_state(record.id, "cancelled", "cancelled by request"))
            raise
        except Exception:  # noqa: BLE001 - a job failure is the job's state, not a crash
            log.exception("job failed", job=record.id)
            await self._set_state(record.id, "failed", "internal error (see the node's logs)")
        finally:
            self._live.pop(record.id, None)
            for q in list(live.watchers):
                q.put_nowait(JobUpdate("end"))

    def _finish(self, job: VerifiedJob, fan: FanoutResult) -> tuple[str, str, bytes | None]:
        req = job.request
        contributors = fan.contributors
        manifest = fan.manifest()
        if len(contributors) < req.min_sites:
            why = "; ".join(f"{o.site}: {o.state}{' (' + o.detail + ')' if o.detail else ''}"
                            for o in fan.outcomes if o.state != "done") or "no site holds it"
            return ("failed", f"only {len(contributors)} site(s) contributed, "
                    f"min_sites is {req.min_sites} — {why}", None)
        spec = QuerySpec.from_dict(req.spec)
        try:
            combined = combine([o.partials for o in contributors])
        except IncompatiblePartials as exc:
            return "failed", f"sites returned incompatible results: {exc}", None
        result = finalize(spec, combined)
        privacy = [{"site": o.site, "epsilon": o.epsilon, "mechanism": o.mechanism}
                   for o in contributors]
        doc = {"result": result.to_dict(), "manifest": manifest, "privacy": privacy,
               "query": req.spec, "scope": req.scope}
        return "succeeded", f"{len(contributors)} site(s) contributed", codec.pack(doc, result.arrays)

    def _site_sink(self, job_id: str):  # type: ignore[no-untyped-def]
        async def sink(site: str, state: str, detail: str, n: int) -> None:
            await self._site_event(job_id, site, state, detail, n)
        return sink

    def _local_sink(self, job_id: str):  # type: ignore[no-untyped-def]
        async def sink(state: str, detail: str) -> None:
            await self._site_event(job_id, self._executor.site, state, detail, 0)
        return sink

    async def _site_event(self, job_id: str, site: str, state: str, detail: str, n: int) -> None:
        event = {"site": site, "state": state, "detail": detail, "n": n, "at": self._clock()}
        live = self._live.get(job_id)
        if live is not None:
            live.sites.append(event)
        await self._publish(job_id, JobUpdate("site", site=event))

    async def _set_state(self, job_id: str, state: str, detail: str,
                         sites: list[dict[str, Any]] | None = None,
                         result: bytes | None = None) -> None:
        record = await self._store.update_job(job_id, state=state, detail=detail, sites=sites,
                                              result=result)
        await self._publish(job_id, JobUpdate("state", job=record))

    async def _publish(self, job_id: str, update: JobUpdate) -> None:
        live = self._live.get(job_id)
        if live is None:
            return
        for q in list(live.watchers):
            q.put_nowait(update)

    # -- read ----------------------------------------------------------------------------

    async def get(self, job_id: str, caller: Identity) -> JobRecord:
        record = await self._store.get_job(job_id)
        if record is None or not _may_see(record, caller):
            raise NotFound(f"no job {job_id!r} visible to you on this node")
        live = self._live.get(job_id)
        if live is not None and not record.sites:
            record = _with_sites(record, live.sites)
        return record

    async def list(self, caller: Identity, limit: int) -> list[JobRecord]:
        owner = None if caller.role == "admin" else caller.name
        return await self._store.list_jobs(owner=owner, limit=max(1, min(limit or 50, 500)))

    async def result(self, job_id: str, caller: Identity) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        record = await self.get(job_id, caller)
        if record.owner != caller.name:
            raise PermissionDenied("only the researcher who submitted a job may read its result")
        if record.result is None:
            raise Conflict(f"job {job_id} has no result (state: {record.state}"
                           f"{', ' + record.detail if record.detail else ''})")
        return codec.unpack(record.result)

    async def cancel(self, job_id: str, caller: Identity) -> JobRecord:
        record = await self.get(job_id, caller)
        if caller.role != "admin" and record.owner != caller.name:
            raise PermissionDenied("only the job's owner or an admin may cancel it")
        live = self._live.get(job_id)
        if record.terminal or live is None or live.task is None:
            raise Conflict(f"job {job_id} is {record.state}; nothing to cancel")
        live.task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await live.task
        return await self.get(job_id, caller)

    async def watch(self, job_id: str, caller: Identity) -> AsyncIterator[JobUpdate]:
        queue: asyncio.Queue[JobUpdate] = asyncio.Queue()
        live = self._live.get(job_id)
        if live is not None:
            live.watchers.add(queue)
        try:
            record = await self.get(job_id, caller)
            seen: set[tuple[str, str]] = set()
            yield JobUpdate("state", job=record)
            snapshot = record.sites if record.terminal or live is None else list(live.sites)
            for ev in snapshot:
                seen.add((ev["site"], ev["state"]))
                yield JobUpdate("site", site=ev)
            if record.terminal or live is None:
                if record.result is not None and record.owner == caller.name:
                    yield JobUpdate("result", result=codec.unpack(record.result))
                return
            while True:
                update = await queue.get()
                if update.kind == "end":
                    return
                if update.kind == "site":
                    key = (update.site["site"], update.site["state"])  # type: ignore[index]
                    if key in seen:
                        continue
                    seen.add(key)
                if update.kind == "result" and record.owner != caller.name:
                    continue
                yield update
        finally:
            if live is not None:
                live.watchers.discard(queue)

    # -- lifecycle -------------------------------------------------------------------------

    async def recover(self) -> int:
        """After a restart: jobs that were queued or running are marked interrupted.

        A query's signed request may have gone stale since, and re-running it silently
        would surprise the researcher; they resubmit (each site's release is idempotent
        per job, so nothing is charged twice if a site had already released).
        """
        stale = await self._store.list_jobs(states=("queued", "running"), limit=10_000)
        for record in stale:
            await self._store.update_job(record.id, state="interrupted",
                                         detail="the node restarted while this job ran; resubmit")
        return len(stale)

    async def shutdown(self) -> None:
        tasks = [live.task for live in self._live.values() if live.task is not None]
        for t in tasks:
            t.cancel()
        for t in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t


def _may_see(record: JobRecord, caller: Identity) -> bool:
    return caller.role == "admin" or record.owner == caller.name


def _with_sites(record: JobRecord, sites: list[dict[str, Any]]) -> JobRecord:
    from dataclasses import replace

    return replace(record, sites=list(sites))


def new_request_id() -> str:
    return uuid.uuid4().hex[:16]


__all__ = ["JobService", "JobUpdate", "TERMINAL_STATES", "new_request_id"]
