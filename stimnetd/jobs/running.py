"""Running admitted jobs: one task each, locally or fanned out; the answer assembled, the
final state shown and written."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import structlog

from stimnet.errors import QueryError, StimnetError, StorageFull
from stimnet.query.spec import AggSpec
from stimnet.signing import VerifiedJob
from stimnet.states import JobState, SiteEvent
from stimnetd.federation.fanout import Fanout, FanoutResult
from stimnetd.jobs import lease
from stimnetd.jobs.access import REPLAYED
from stimnetd.jobs.answer import Answer, assemble
from stimnetd.jobs.events import ActiveJob, JobEventHub, JobUpdate
from stimnetd.jobs.fair import FairSlots
from stimnetd.jobs.models import fit_glm, pool_estimates
from stimnetd.jobs.quantiles import bisect_quantiles
from stimnetd.jobs.quota import QueryQuota
from stimnetd.jobs.review import ScriptGate
from stimnetd.query.models import is_multi_round
from stimnetd.site import LocalSite, ShareProgress, SiteOutcome
from stimnetd.store import SiteStore
from stimnetd.store.records import JobRecord

log = structlog.get_logger("stimnetd.jobs")

_INTERNAL = "internal error (see the node's logs)"
RERUN = "re-run: a restart interrupted its first run"


class JobRunner:
    def __init__(self, *, hub: JobEventHub, store: SiteStore, site: LocalSite, fanout: Fanout,
                 scripts: ScriptGate, quota: QueryQuota,
                 clock: Callable[[], float] = time.time) -> None:
        self._hub = hub
        self._store = store
        self._site = site
        self._fanout = fanout
        self._scripts = scripts
        self._quota = quota
        self._clock = clock
        # Sandbox runs are heavy: at most `concurrency` at once, shared fairly between
        # researchers (jobs/fair.py); queries are not queued.
        self._script_slots = FairSlots(scripts.policy.concurrency)
        self._stopping = False

    def start(self, record: JobRecord, job: VerifiedJob) -> None:
        active = self._hub.open(record.id)
        active.task = asyncio.create_task(self._run(record, job, active), name=f"job-{record.id}")

    async def shutdown(self) -> None:
        """Stop every job's task. Each stays as the store has it (`running`): the next
        start's recovery decides (interrupted, or re-queued by policy)."""
        self._stopping = True
        tasks = [active.task for _, active in self._hub.active() if active.task is not None]
        for t in tasks:
            t.cancel()
        for t in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t

    async def _run(self, record: JobRecord, job: VerifiedJob, active: ActiveJob) -> None:
        slot = (self._script_slots.slot(record.owner) if record.kind == "script"
                else contextlib.nullcontext())
        try:
            async with slot:
                queue = lease.shared(self._store) if record.kind == "script" else None
                if queue is None or record.state != "queued":
                    await self._run_inner(record, job, active)
                    return
                claimed = await queue.claim_job(record.id, lease.REPLICA, lease.LEASE_S,
                                                RERUN if record.requeues else "")
                if claimed is None:
                    return  # another replica of this site took it from the shared queue
                self._hub.publish(record.id, JobUpdate("state", job=claimed))
                async with lease.held(queue, record.id):
                    await self._run_inner(claimed, job, active)
        except asyncio.CancelledError:
            if not self._stopping:  # a user cancelled (see shutdown)
                await asyncio.shield(self._cancelled(record, active))
            raise
        finally:
            self._hub.close(record.id, active)
            self._quota.release(record.id)

    async def _cancelled(self, record: JobRecord, active: ActiveJob) -> None:
        if not await active.has_row():
            return  # a replay, or its row could not be written: nothing of its own to mark
        await self._set_state(record.id, "cancelled", "cancelled by request")

    async def _run_inner(self, record: JobRecord, job: VerifiedJob, active: ActiveJob) -> None:
        try:
            if record.state != "running":
                # A re-run says so until it ends (Job.requeues counts it for good).
                await self._set_state(record.id, "running",
                                      RERUN if record.requeues else "")
            fan = await self._gather_while_recordable(record, job, active)
            if active.created is not None and not await active.created:
                # The row's own nonce check refused it (the nonce was in the database but
                # not in memory): a replay. Its row is the first submission's; nothing of
                # this one is shown or kept.
                self._hub.publish(record.id, JobUpdate("state", job=self._shown(
                    record, active, "failed", REPLAYED)))
                return
            model = _model_of(job) if record.kind == "query" else None
            if model is not None:
                answer = await self._model_answer(record, job, model, fan)
            elif any(o.packed is not None and not o.partials for o in fan.contributors):
                # Large arrays (site/outcome.py's LEAN_BYTES): decoded and combined off the
                # loop, which keeps answering health checks and other jobs meanwhile.
                answer = await asyncio.to_thread(assemble, job, fan)
            else:
                answer = assemble(job, fan)
            # The final state carries the answer: watchers get both in one update.
            if record.kind == "query":
                await self._show_then_write(record, active, answer)
            else:
                await self._set_state(record.id, answer.state, answer.detail,
                                      sites=active.site_dicts(), result=answer.packed)
        except asyncio.CancelledError:
            raise
        except StorageFull as exc:
            log.warning("job failed: state volume full", job=record.id)
            await self._failed(record, active, str(exc))
        except Exception:  # noqa: BLE001 - a job failure is the job's state, not a crash
            log.exception("job failed", job=record.id)
            await self._failed(record, active, _INTERNAL)

    async def _failed(self, record: JobRecord, active: ActiveJob, detail: str) -> None:
        if await active.has_row():
            try:
                await self._set_state(record.id, "failed", detail)
                return
            except StorageFull:
                pass  # shown from memory, as below; a restart marks the row interrupted
        # Its row could not be written: the failure is shown from memory only.
        self._hub.publish(record.id, JobUpdate("state", job=self._shown(
            record, active, "failed", detail)))

    async def _gather_while_recordable(self, record: JobRecord, job: VerifiedJob,
                                       active: ActiveJob) -> FanoutResult:
        """`_gather`, unless the job's row fails to be written meanwhile (its state volume
        filled up after admission): then the sub-jobs still out are cancelled at once, and
        a peer that has not yet sent its partial refunds its charge (docs/privacy.md,
        "Charged only for what left the site") instead of being charged for a job that
        fails here. The row's error is raised by the caller's await of it."""
        created = active.created
        if created is None or record.scope != "federated":
            return await self._gather(record, job)
        gathering = asyncio.ensure_future(self._gather(record, job))
        try:
            either: set[asyncio.Future[Any]] = {gathering, created}
            await asyncio.wait(either, return_when=asyncio.FIRST_COMPLETED)
            if not gathering.done() and not created.cancelled() \
                    and created.exception() is not None:
                log.warning("job's row not recorded: its sub-jobs are cancelled", job=record.id)
                gathering.cancel()
                await asyncio.wait([gathering])  # (a cancel of this job still raises here)
                if not gathering.cancelled():
                    gathering.exception()  # retrieved: the job fails on its row
                return FanoutResult([])
            return await gathering
        finally:
            if not gathering.done():
                gathering.cancel()

    async def _gather(self, record: JobRecord, job: VerifiedJob) -> FanoutResult:
        """The sites' outcomes: every site holding the catalog's, or this site's alone."""
        resumed = record.attempts > 0
        if record.scope == "federated":
            refusal = await self._scripts.local_share_refusal(record, job) \
                if record.kind == "script" else None
            return await self._fanout.run(job, record.request_id,
                                          self._hub.fanout_events(record.id),
                                          resumed=resumed, local_refusal=refusal)
        outcome = await self._site.run(job, self._local_progress(record.id), resumed=resumed)
        self._hub.site_event(record.id, SiteEvent(outcome.site, outcome.state, outcome.detail,
                                                  outcome.n))
        return FanoutResult([outcome])

    async def _model_answer(self, record: JobRecord, job: VerifiedJob, model: AggSpec,
                            fan: FanoutResult) -> Answer:
        """A GLM's later rounds at the sites of its first (or a meta-analysis's pooling)."""
        if not is_multi_round(model):
            return pool_estimates(job, model, fan)

        async def rounds(round_no: int, beta: list[float], sites: list[str]
                         ) -> list[SiteOutcome]:
            if record.scope == "federated":
                return await self._fanout.run_round(job, record.request_id, round_no, beta,
                                                    sites, fan.targets)
            return [await self._site.run_round(job, round_no, beta)]

        async def progress(line: str) -> None:
            self._hub.log(record.id, self._site.name, line)

        async def dropped_out(o: SiteOutcome) -> None:
            self._hub.site_event(record.id, SiteEvent(o.site, o.state, o.detail, o.n))
        if model.func == "quantiles_bisect":
            return await bisect_quantiles(job, model, fan, rounds, progress, dropped_out,
                                          self._site.k_min)
        return await fit_glm(job, model, fan, rounds, progress, dropped_out)

    def _local_progress(self, job_id: str) -> ShareProgress:
        site = self._site.name

        async def running() -> None:
            self._hub.site_event(job_id, SiteEvent(site, "running"))

        async def logged(line: str) -> None:
            self._hub.log(job_id, site, line)
        return ShareProgress(running, logged)

    async def _show_then_write(self, record: JobRecord, active: ActiveJob,
                               answer: Answer) -> None:
        """A query's final state is shown first and written after: the row is bookkeeping,
        and readers see the final state from memory until it lands."""
        final = active.unwritten = replace(
            self._shown(record, active, answer.state, answer.detail), result=answer.packed)
        self._hub.publish(record.id, JobUpdate("state", job=final, result=answer.packed))
        # Its researcher has the answer and may ask the next question now.
        self._quota.release(record.id)
        try:
            # With the next transaction (a group commit at the latest): the job stays
            # in memory, where readers see it, until then. A failure leaves the row
            # 'running' (a restart marks it interrupted); the answer stands.
            await self._store.update_job(final.id, state=final.state, detail=final.detail,
                                         sites=final.sites, result=final.result,
                                         durable=False, defer=True)
        except StorageFull:
            log.warning("query's final state not recorded: state volume full", job=final.id)
        except Exception:  # noqa: BLE001 - the answer is out; the row is bookkeeping
            log.exception("query's final state not recorded", job=final.id)

    def _shown(self, record: JobRecord, active: ActiveJob, state: JobState,
               detail: str) -> JobRecord:
        """The job as it is now, for watchers and readers, before the store has it."""
        return replace(record, state=state, detail=detail, updated_at=self._clock(),
                       sites=active.site_dicts())

    async def _set_state(self, job_id: str, state: JobState, detail: str,
                         sites: list[dict[str, Any]] | None = None,
                         result: bytes | None = None) -> None:
        """Write the job's state, then publish it."""
        record = await self._store.update_job(job_id, state=state, detail=detail, sites=sites,
                                              result=result)
        self._hub.publish(job_id, JobUpdate("state", job=record, result=result))


def _model_of(job: VerifiedJob) -> AggSpec | None:
    """The job's glm()/meta() output, or None (also for a spec that is no query: every
    site refused it, and assemble() says so)."""
    try:
        return job.request.query_spec.model
    except (QueryError, StimnetError):
        return None
