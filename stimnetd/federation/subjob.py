"""A peer's side of fan-out: verify the researcher's signed job, run it here, report back."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

from stimnetd.errors import Conflict
from stimnetd.jobs.signing import SignedJob, VerifiedJob
from stimnetd.jobs.site import SiteExecutor, SiteOutcome
from stimnetd.pki import Identity
from stimnetd.store import Store


@dataclass(frozen=True)
class SubJobEvent:
    state: str
    detail: str = ""
    n: int = 0
    outcome: SiteOutcome | None = None


class SubJobHandler:
    def __init__(self, *, executor: SiteExecutor, store: Store,
                 verify: Callable[[SignedJob], VerifiedJob], max_age_s: float) -> None:
        self._executor = executor
        self._store = store
        self._verify = verify
        self._max_age = max_age_s

    async def run(self, signed: SignedJob, entry: Identity,
                  request_id: str) -> AsyncIterator[SubJobEvent]:
        # Verified here, at this site, with this site's CA and CRL: the entry node is only
        # a relay and cannot vouch for the researcher.
        job = self._verify(signed)
        await self._executor.precheck(job)
        accepted = (job.researcher.name, job.researcher.role, "subjob", "accepted",
                    {"job": job.request.job_id, "catalog": job.request.catalog,
                     "via": entry.name, "request_id": request_id})
        if not await self._store.remember_nonce(job.request.nonce, job.researcher.name,
                                                self._max_age, audit=accepted):
            raise Conflict("replayed request: this signed job was already run at this site")
        yield SubJobEvent("accepted")
        events: asyncio.Queue[SubJobEvent] = asyncio.Queue()

        async def sink(state: str, detail: str) -> None:
            events.put_nowait(SubJobEvent(state, detail))

        task = asyncio.create_task(self._executor.run(job, sink))
        try:
            while not task.done() or not events.empty():
                getter = asyncio.create_task(events.get())
                done, _ = await asyncio.wait({getter, task}, return_when=asyncio.FIRST_COMPLETED)
                if getter in done:
                    yield getter.result()
                else:
                    getter.cancel()
            outcome = task.result()
        finally:
            if not task.done():
                task.cancel()
        yield SubJobEvent(outcome.state, outcome.detail, outcome.n, outcome)
