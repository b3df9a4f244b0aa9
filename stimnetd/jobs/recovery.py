"""After a restart no job is lost and none runs twice.

- queries that were queued or running → interrupted (the researcher resubmits; each
  site's release is idempotent per job, so nothing is charged twice);
- script jobs that were running → interrupted, or re-queued if the site's `on_restart`
  policy says so, at most MAX_REQUEUES times: a job interrupted again during its re-run
  is interrupted for good (it may be what brings the node down). A re-run that already
  released returns the stored release without running the container again; a federated
  one asks each peer to resume its share (federation/subjob.py), which a peer does once
  and which never charges it twice;
- queued script jobs run; jobs awaiting approval keep waiting.
"""

from __future__ import annotations

from collections.abc import Callable

from stimnet.errors import StimnetError
from stimnet.signing import VerifiedJob
from stimnet.states import MAX_REQUEUES, UNFINISHED_STATES
from stimnetd.jobs import lease
from stimnetd.jobs.running import JobRunner
from stimnetd.site.policy import ScriptPolicy
from stimnetd.store import SiteStore
from stimnetd.store.contract import SharedQueue
from stimnetd.store.records import JobRecord

MAX_RECOVERED = 10_000  # unfinished jobs read at a start

INTERRUPTED = "the node restarted while this job ran; resubmit"
INTERRUPTED_TWICE = ("interrupted twice: the node restarted while this job ran and again "
                     "while its re-run ran; not re-run again (resubmit it if the restarts "
                     "were not its doing)")
REQUEUED = "re-queued after a restart: the node restarted while this job ran"
RESUMED = "waiting for a slot after a restart"


def verdict(record: JobRecord, on_restart: str) -> str | None:
    """Why an unfinished job is interrupted at a start, or None if it runs (again)."""
    if record.kind != "script" or record.origin != "client":
        return INTERRUPTED
    if record.state == "queued":
        return None  # it never ran: nothing of it was interrupted
    if on_restart != "requeue":
        return INTERRUPTED
    return INTERRUPTED_TWICE if record.requeues >= MAX_REQUEUES else None


async def recover(store: SiteStore, runner: JobRunner, scripts: ScriptPolicy,
                  restore: Callable[[JobRecord], VerifiedJob]) -> int:
    """Resume or mark every unfinished job; how many were interrupted."""
    queue = lease.shared(store)
    if queue is not None:
        return await _recover_shared(store, queue, runner, scripts, restore)
    interrupted = 0
    for record in await store.list_jobs(states=UNFINISHED_STATES, limit=MAX_RECOVERED):
        reason = verdict(record, scripts.on_restart)
        if reason is not None:
            await store.update_job(record.id, state="interrupted", detail=reason)
            interrupted += 1
            continue
        try:
            job = restore(record)
        except StimnetError as exc:
            await store.update_job(record.id, state="failed",
                                   detail=f"cannot resume after restart: {exc}")
            continue
        requeued = record.state == "running"
        # `attempts` marks it resumed: each site returns a release it already made.
        updated = await store.update_job(record.id, state="queued",
                                         detail=REQUEUED if requeued else RESUMED,
                                         bump_attempts=True, bump_requeues=requeued)
        runner.start(updated, job)
    return interrupted


async def _recover_shared(store: SiteStore, queue: SharedQueue, runner: JobRunner,
                          scripts: ScriptPolicy,
                          restore: Callable[[JobRecord], VerifiedJob]) -> int:
    """On a store the site's replicas share, the unfinished jobs are not all this
    process's: another replica may be running them. Only script jobs whose lease ran out
    (their replica stopped) are re-queued or interrupted, per `on_restart`; queued script
    jobs are started here too, and whichever replica's slot frees first claims each.
    Queries and running jobs under a live lease are left to the replica that has them."""
    recovered = [await store.get_job(j) for j in
                 await queue.recover_expired(scripts.on_restart, by=lease.REPLICA)]
    for record in await store.list_jobs(states=("queued",), limit=MAX_RECOVERED):
        if record.kind != "script" or record.origin != "client":
            continue
        try:
            job = restore(record)
        except StimnetError as exc:
            await store.update_job_if(record.id, "queued", state="failed",
                                      detail=f"cannot resume after restart: {exc}")
            continue
        runner.start(record, job)
    return sum(r is not None and r.state == "interrupted" for r in recovered)
