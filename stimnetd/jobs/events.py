"""The event hub: what each job running here has reported so far, and who is watching it.

The hub is the one place on this node where a job's site events are de-duplicated: it
keeps and publishes each (site, state) pair once per job, whichever path the event came
by (this site's own share, or a peer's stream as the transport relays it, repeats and
all). Nothing upstream filters them and nothing downstream needs to: a watcher that
subscribes mid-job gets the events so far and, from the same moment, each later one.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from stimnet.states import SiteEvent, SiteState
from stimnetd.federation.fanout import FanoutEvents
from stimnetd.store.records import JobRecord

# state: the job's state (the final one may carry the answer) | site: one site event |
# sites: several at once | log: a line a site's log policy let through | end: no more.
UpdateKind = Literal["state", "site", "sites", "log", "end"]


@dataclass(frozen=True)
class JobUpdate:
    """One thing a watcher sees."""

    kind: UpdateKind
    job: JobRecord | None = None
    site: SiteEvent | None = None
    sites: tuple[SiteEvent, ...] = ()
    line: str = ""
    result: bytes | None = None  # the answer as stored (codec.pack): streamed as it is

    @property
    def final(self) -> bool:
        """A final state: nothing follows it."""
        return self.kind == "state" and self.job is not None and self.job.terminal


@dataclass
class ActiveJob:
    """A job in this node's memory while it runs: its watchers, its site events so far, its
    task, and (for a query) the record as it is now while the store does not have it yet."""

    watchers: set[asyncio.Queue[JobUpdate]] = field(default_factory=set)
    sites: list[SiteEvent] = field(default_factory=list)
    seen: set[tuple[str, SiteState]] = field(default_factory=set)
    task: asyncio.Task[None] | None = None
    # A query's row being created, or its final state being written: what readers are
    # shown meanwhile.
    unwritten: JobRecord | None = None
    # A followed query's row being created (see Admission.submit): False if it was a replay.
    created: asyncio.Future[bool] | None = None

    def site_dicts(self) -> list[dict[str, Any]]:
        """The site events as a job record stores them."""
        return [asdict(e) for e in self.sites]

    async def has_row(self) -> bool:
        """Whether the job's row exists: always, but for a followed query whose row's
        creation refused it as a replay or failed."""
        if self.created is None:
            return True
        try:
            return await asyncio.shield(self.created)
        except asyncio.CancelledError:
            raise
        except Exception:  # noqa: BLE001 - logged by the job's own failure path
            return False


@dataclass(frozen=True)
class Subscription:
    """A watcher's queue, and the job's site events up to the moment it was added."""

    queue: asyncio.Queue[JobUpdate]
    active: ActiveJob | None
    sites: tuple[SiteEvent, ...]


class JobEventHub:
    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self._clock = clock
        self._jobs: dict[str, ActiveJob] = {}

    def get(self, job_id: str) -> ActiveJob | None:
        return self._jobs.get(job_id)

    def __contains__(self, job_id: str) -> bool:
        return job_id in self._jobs

    def active(self) -> list[tuple[str, ActiveJob]]:
        return list(self._jobs.items())

    def open(self, job_id: str, active: ActiveJob | None = None) -> ActiveJob:
        """The job's entry, made (from `active`, if given) unless it has one."""
        return self._jobs.setdefault(job_id, active or ActiveJob())

    def close(self, job_id: str, active: ActiveJob | None = None) -> None:
        """Forget the job; its watchers' streams end (those of `active`, if given)."""
        popped = self._jobs.pop(job_id, None)
        for q in list((active or popped or ActiveJob()).watchers):
            q.put_nowait(JobUpdate("end"))

    def publish(self, job_id: str, update: JobUpdate) -> None:
        active = self._jobs.get(job_id)
        for q in list(active.watchers if active is not None else ()):
            q.put_nowait(update)

    def site_event(self, job_id: str, event: SiteEvent) -> None:
        """Keep and publish `event` (stamped with the time it arrived), unless the job has
        this (site, state) already."""
        active = self._jobs.get(job_id)
        stamped = SiteEvent(event.site, event.state, event.detail, event.n, self._clock())
        if active is not None:
            key = (event.site, event.state)
            if key in active.seen:
                return
            active.seen.add(key)
            active.sites.append(stamped)
        self.publish(job_id, JobUpdate("site", site=stamped))

    def log(self, job_id: str, site: str, line: str) -> None:
        """A line a site's log policy let through: for the watchers, not kept."""
        self.publish(job_id, JobUpdate("log", line=f"{site}: {line}"))

    def fanout_events(self, job_id: str) -> FanoutEvents:
        async def site(event: SiteEvent) -> None:
            self.site_event(job_id, event)

        async def log(site: str, line: str) -> None:
            self.log(job_id, site, line)
        return FanoutEvents(site, log)

    @contextlib.contextmanager
    def subscribe(self, job_id: str) -> Iterator[Subscription]:
        """A queue of the job's updates from now on, until the block ends. Taken with the
        events so far in one step, so none is in both or in neither."""
        queue: asyncio.Queue[JobUpdate] = asyncio.Queue()
        active = self._jobs.get(job_id)
        if active is not None:
            active.watchers.add(queue)
        try:
            yield Subscription(queue, active, tuple(active.sites) if active else ())
        finally:
            if active is not None:
                active.watchers.discard(queue)
