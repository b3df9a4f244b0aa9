"""A watcher's stream of one job: a snapshot (state, site events so far, answer), then live
updates, each site event once (the event hub de-duplicates them), ready site events
batched into one update, the answer for its owner only.

The job's own submitter (RunJob) starts quiet: per-message cost, not bytes, dominates a
small federated query, so a job that ends within QUIET_START_S is one message, its final
state (which lists every site's event); a longer one then reports what it held back (its
state, the site events as one update) and continues live.
"""

from __future__ import annotations

import asyncio
import collections
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import replace

from stimnet.pki import Identity
from stimnet.states import SiteEvent
from stimnetd.jobs.access import owns
from stimnetd.jobs.events import ActiveJob, JobEventHub, JobUpdate
from stimnetd.store.records import JobRecord

# How long a job's own submitter hears nothing (see the module docstring).
QUIET_START_S = 0.05

Read = Callable[[str, Identity], Awaitable[JobRecord]]


async def watch(hub: JobEventHub, job_id: str, caller: Identity, read: Read,
                submitted: JobRecord | None = None) -> AsyncIterator[JobUpdate]:
    """`read`: the job as `caller` may see it (NotFound otherwise). `submitted`: the record
    the submission just returned to this caller (RunJob), which spares a read and starts
    the stream quiet."""
    with hub.subscribe(job_id) as sub:
        own_submission = submitted is not None and submitted.id == job_id \
            and owns(submitted, caller)
        record = submitted if own_submission and submitted is not None \
            else await read(job_id, caller)
        if record.terminal:
            # A finished job is one update, as a live job's end is: its final state
            # (listing every site's event) carrying its answer, if the caller's.
            yield for_caller(JobUpdate("state", job=record, result=record.result), record,
                             caller)
            return
        active = sub.active
        if active is None or not own_submission:
            yield JobUpdate("state", job=record)
            for event in (sub.sites if active is not None else stored_sites(record)):
                yield JobUpdate("site", site=event)
        if active is None:
            return
        inbox = Inbox(sub.queue)
        if own_submission:
            async for update in _quiet_opening(inbox, record, active, QUIET_START_S):
                yield update
        async for update in _live(inbox, record, caller):
            yield update


async def _quiet_opening(inbox: Inbox, record: JobRecord, active: ActiveJob,
                         window_s: float) -> AsyncIterator[JobUpdate]:
    early, final = await quiet_start(inbox.queue, window_s)
    if final is not None:
        # A quick job: its final state lists every site's event. Log lines are not in
        # it, so those still go out first.
        for update in early:
            if update.kind == "log":
                yield update
        inbox.hold(final)
        return
    # The job's id is shown only once its row is there; a replay's (the first
    # submission's id) never is: its failure follows.
    if await active.has_row():
        yield JobUpdate("state", job=record)
    inbox.hold(*early)


async def _live(inbox: Inbox, record: JobRecord, caller: Identity) -> AsyncIterator[JobUpdate]:
    while True:
        update = await inbox.next()
        if update.kind == "end":
            return
        if update.kind == "site":
            # Site events that arrived meanwhile go out together: one message instead of
            # one per event.
            batch = inbox.site_batch(update)
            if len(batch) > 1:
                yield JobUpdate("sites", sites=batch)
                continue
        update = for_caller(update, record, caller)
        yield update
        if update.final:
            # Nothing follows a final state: the stream ends now, not when the job's
            # task does (a query's final write is still on its way).
            return


class Inbox:
    """A watcher's updates in order: those held back first, then the queue's."""

    def __init__(self, queue: asyncio.Queue[JobUpdate]) -> None:
        self.queue = queue
        self._held: collections.deque[JobUpdate] = collections.deque()

    def hold(self, *updates: JobUpdate) -> None:
        self._held.extend(updates)

    def ready(self) -> JobUpdate | None:
        """The next update if one is ready, without waiting."""
        if self._held:
            return self._held.popleft()
        return None if self.queue.empty() else self.queue.get_nowait()

    async def next(self) -> JobUpdate:
        ready = self.ready()
        return ready if ready is not None else await self.queue.get()

    def site_batch(self, first: JobUpdate) -> tuple[SiteEvent, ...]:
        """`first`'s site event and those of the site updates ready right after it."""
        assert first.site is not None
        batch = [first.site]
        while (nxt := self.ready()) is not None:
            if nxt.kind != "site" or nxt.site is None:
                self._held.appendleft(nxt)
                break
            batch.append(nxt.site)
        return tuple(batch)


def for_caller(update: JobUpdate, record: JobRecord, caller: Identity) -> JobUpdate:
    """Only the researcher who asked sees the answer."""
    if update.result is None or owns(record, caller):
        return update
    return replace(update, result=None)


def stored_sites(record: JobRecord) -> tuple[SiteEvent, ...]:
    """The site events a job's row holds."""
    return tuple(SiteEvent(e["site"], e["state"], e.get("detail", ""), int(e.get("n", 0)),
                           e.get("at", 0.0)) for e in record.sites)


async def quiet_start(queue: asyncio.Queue[JobUpdate], window_s: float
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
        if got.final:
            return early, got
        early.append(got)
        if got.kind == "end":
            break
    return early, None
