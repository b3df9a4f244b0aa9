"""After a restart no job is lost and none runs twice.

- queries that were queued or running → interrupted (the researcher resubmits; each
  site's release is idempotent per job, so nothing is charged twice);
- script jobs that were running → interrupted, or re-queued if the site's `on_restart`
  policy says so (a re-run that already released returns the stored release without
  running the container again);
- queued script jobs run; jobs awaiting approval keep waiting.
"""

from __future__ import annotations

from collections.abc import Callable

from stimnet.errors import StimnetError
from stimnet.signing import VerifiedJob
from stimnet.states import UNFINISHED_STATES
from stimnetd.jobs.running import JobRunner
from stimnetd.site.policy import ScriptPolicy
from stimnetd.store import Store
from stimnetd.store.records import JobRecord

MAX_RECOVERED = 10_000  # unfinished jobs read at a start


async def recover(store: Store, runner: JobRunner, scripts: ScriptPolicy,
                  restore: Callable[[JobRecord], VerifiedJob]) -> int:
    """Resume or mark every unfinished job; how many were interrupted."""
    interrupted = 0
    for record in await store.list_jobs(states=UNFINISHED_STATES, limit=MAX_RECOVERED):
        requeue = record.kind == "script" and record.scope == "local" and (
            record.state == "queued" or scripts.on_restart == "requeue")
        if not requeue:
            await store.update_job(record.id, state="interrupted",
                                   detail="the node restarted while this job ran; resubmit")
            interrupted += 1
            continue
        try:
            job = restore(record)
        except StimnetError as exc:
            await store.update_job(record.id, state="failed",
                                   detail=f"cannot resume after restart: {exc}")
            continue
        updated = await store.update_job(record.id, state="queued",
                                         detail="re-queued after a restart", bump_attempts=True)
        runner.start(updated, job)
    return interrupted
