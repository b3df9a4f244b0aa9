"""Fan-out: send a researcher's signed job to every site holding the catalog, in parallel.

Each site runs under its own deadline; a slow or dead site becomes `timed_out` or `failed`
in the manifest and never holds the answer back beyond that deadline. The entry node runs
its own share in-process (it is a site like any other) and relays the signed job bytes
untouched to the others, which verify the researcher's signature themselves.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Protocol, cast

import structlog

from stimnet.errors import QueryError, StimnetError
from stimnet.query.fields import Grid, grid_disagreement
from stimnet.signing import SignedJob, VerifiedJob
from stimnet.states import SiteEvent, SiteState
from stimnetd.federation import subjob
from stimnetd.site import LocalSite, ShareProgress, SiteOutcome

log = structlog.get_logger("stimnetd.fanout")

# How a transport relays a peer's messages: (site, state, detail, n), where the state "log"
# carries a log line in `detail` (the wire's SubJobEvent.log_line). FanoutEvents.relay
# turns them back into site events and log lines.
SiteEventSink = Callable[[str, str, str, int], Awaitable[None]]
# How long the entry waits for a peer's grid before a voxel-wise job (one small RPC).
GRID_ASK_S = 5.0


@dataclass(frozen=True)
class Target:
    address: str
    name: str | None = None  # unknown for static peers until they answer


@dataclass(frozen=True)
class Absent:
    """A member known (by gossip) to hold the catalog that is not asked: it left, or is
    dead or suspected. Named in the manifest so a partial answer is never silent."""

    site: str
    reason: str  # "left" | "dead" | "suspect"
    detail: str


@dataclass(frozen=True)
class SiteGrid:
    """One site's reference space for a catalog, as the entry learnt it."""

    site: str
    grid: Grid | None
    error: str = ""


class PeerDirectory(Protocol):
    def targets(self, catalog: str) -> list[Target]: ...

    def absent(self, catalog: str) -> list[Absent]: ...


class SubJobTransport(Protocol):
    async def run_subjob(self, target: Target, signed: SignedJob, request_id: str,
                         timeout_s: float, on_event: SiteEventSink, *,
                         small: bool = False, round_no: int = 0,
                         beta: list[float] | None = None, resume: bool = False
                         ) -> SiteOutcome: ...

    async def catalog_grid(self, target: Target, catalog: str,
                           timeout_s: float) -> tuple[str, Grid | None]:
        """(the site's name, its grid for `catalog`); raises if it cannot be asked."""
        ...


@dataclass(frozen=True)
class FanoutEvents:
    """Where a fan-out reports what the sites say before their outcomes are gathered: each
    site's steps, and the log lines each site's log policy let through (site, line)."""

    site: Callable[[SiteEvent], Awaitable[None]]
    log: Callable[[str, str], Awaitable[None]]

    async def relay(self, site: str, state: str, detail: str, n: int) -> None:
        """The transport's sink (SiteEventSink)."""
        if state == "log":
            await self.log(site, detail)
        else:
            # The transport relays only the states it checked (an unknown one fails the site).
            await self.site(SiteEvent(site, cast(SiteState, state), detail, n))


@dataclass(frozen=True)
class FanoutResult:
    outcomes: list[SiteOutcome]
    # Where each peer that answered was reached (by the name in its outcome): a later
    # round of a multi-round job goes to exactly these sites.
    targets: dict[str, Target] = field(default_factory=dict)
    absent: tuple[Absent, ...] = ()

    @property
    def contributors(self) -> list[SiteOutcome]:
        return [o for o in self.outcomes if o.state == "done"]

    def missing(self) -> list[tuple[str, str, str]]:
        """(site, reason, detail) for every site known to hold the catalog that did not
        contribute: asked and not done, or not asked (absent)."""
        return ([(o.site, not_contributed(o.state, o.detail), o.detail)
                 for o in self.outcomes if o.state != "done"]
                + [(a.site, a.reason, a.detail) for a in self.absent])

    def manifest(self) -> list[dict[str, object]]:
        """One row per site known to hold the catalog: each contributor, and each site
        that did not contribute with its `reason` (left, dead, suspect, unreachable,
        timed out, refused, suppressed, failed)."""
        rows: list[dict[str, object]] = [
            {"site": o.site, "state": o.state, "n": o.n, "detail": o.detail,
             "epsilon": o.epsilon, "delta": o.delta, "mechanism": o.mechanism,
             **({"reason": not_contributed(o.state, o.detail)} if o.state != "done" else {})}
            for o in self.outcomes]
        rows += [{"site": a.site, "state": "absent", "reason": a.reason, "n": 0,
                  "detail": a.detail, "epsilon": None, "delta": None,
                  "mechanism": None} for a in self.absent]
        return rows


# Connection failures (the peer's port closed, its address unroutable) as the transport
# words them: gRPC's UNAVAILABLE, or the identity probe's "cannot connect".
_UNREACHABLE = ("unavailable", "cannot connect", "connection refused", "connection lost",
                "failed to connect")


def not_contributed(state: str, detail: str) -> str:
    """Why a site that was asked did not contribute, in the manifest's vocabulary."""
    if state == "timed_out":
        return "timed out"
    if state == "failed" and any(w in detail.lower() for w in _UNREACHABLE):
        return "unreachable"
    return state


async def _ignore(site: str, state: str, detail: str, n: int) -> None:
    """A later round's progress: the entry reports iterations, not each site's steps."""


class Fanout:
    """Runs a federated job at every site holding its catalog: this one's share here, each
    peer's through the sub-job transport; gathers every site's outcome."""

    def __init__(self, *, site: LocalSite, holds_catalog: Callable[[str], bool],
                 peers: PeerDirectory, transport: SubJobTransport, timeout_s: float) -> None:
        self._site = site
        self._holds = holds_catalog
        self._peers = peers
        self._transport = transport
        self._timeout = timeout_s

    def holds_catalog(self, catalog: str) -> bool:
        """Whether this site runs a share of a federated job on `catalog` itself."""
        return self._holds(catalog)

    async def run(self, job: VerifiedJob, request_id: str, events: FanoutEvents, *,
                  resumed: bool = False, local_refusal: str | None = None) -> FanoutResult:
        """`local_refusal`: this site does not run its own share (its script policy), and
        that share's outcome is refused with this reason, as a peer would answer.
        `resumed`: this node restarted while the job ran (jobs/recovery.py): its own share
        returns a release it already made, and each peer is asked to resume its share."""
        catalog = job.request.catalog
        # A table query's answer is small (a few statistics per group), so its sub-jobs may
        # share a stream with others; images and scripts can answer megabytes.
        try:
            small = job.request.kind == "query" and not job.request.query_spec.reads_images()
        except (QueryError, StimnetError):
            small = False  # not a query spec: each site refuses it, saying why
        targets = self._peers.targets(catalog)
        if self._reads_images(job):
            refused = await self._grid_refusal(catalog, targets, events)
            if refused is not None:
                return FanoutResult(refused, {}, tuple(self._peers.absent(catalog)))
        tasks: list[asyncio.Task[SiteOutcome]] = []
        reached: dict[str, Target] = {}
        # Peers' tasks first: each starts its call before this site's own share (computed
        # on the loop when small) holds the loop. The local outcome stays first in order.
        for target in targets:
            tasks.append(asyncio.create_task(self._remote(target, job, request_id, events,
                                                          small, reached, resumed)))
        if self._holds(catalog):
            tasks.insert(0, asyncio.create_task(
                self._refused_locally(local_refusal, events) if local_refusal is not None
                else self._local(job, events, resumed)))
        outcomes = list(await asyncio.gather(*tasks)) if tasks else []
        asked = {o.site for o in outcomes}
        return FanoutResult(outcomes, reached, tuple(a for a in self._peers.absent(catalog)
                                                     if a.site not in asked))

    @staticmethod
    def _reads_images(job: VerifiedJob) -> bool:
        try:
            return job.request.kind == "query" and job.request.query_spec.reads_images()
        except (QueryError, StimnetError):
            return False

    async def site_grids(self, catalog: str,
                         targets: list[Target] | None = None) -> list[SiteGrid]:
        """Every site's grid for `catalog`: this site's (if it holds it) first, then each
        peer's, asked under GRID_ASK_S; a peer that cannot be asked says why in `error`."""
        targets = self._peers.targets(catalog) if targets is None else targets
        out = [SiteGrid(self._site.name, self._site.grid(catalog))] \
            if self._holds(catalog) else []
        limit = min(self._timeout, GRID_ASK_S)

        async def ask(t: Target) -> SiteGrid:
            try:
                site, grid = await asyncio.wait_for(
                    self._transport.catalog_grid(t, catalog, limit), limit + 0.5)
                return SiteGrid(site, grid)
            except TimeoutError:
                return SiteGrid(t.name or t.address, None, f"no answer within {limit:g}s")
            except Exception as exc:  # noqa: BLE001 - one site's failure is that site's row
                return SiteGrid(t.name or t.address, None, str(exc) or type(exc).__name__)
        return out + list(await asyncio.gather(*(ask(t) for t in targets)))

    async def _grid_refusal(self, catalog: str, targets: list[Target],
                            events: FanoutEvents) -> list[SiteOutcome] | None:
        """Every site's outcome, refused, when the sites' grids disagree; else None.

        Asked before any site computes: a voxel map pooled from different grids is
        meaningless, and finding out from the sites' partials costs every site its work
        (and budget). A site that cannot be asked is left to its sub-job, which says why."""
        answers = await self.site_grids(catalog, targets)
        detail = grid_disagreement({a.site: a.grid for a in answers if a.grid is not None})
        if detail is None:
            return None
        log.info("grids disagree: refused before compute", catalog=catalog,
                 sites=[a.site for a in answers])
        outcomes = [SiteOutcome(s, "refused", detail)
                    for s in dict.fromkeys(a.site for a in answers)]
        for o in outcomes:
            await events.site(SiteEvent(o.site, o.state, o.detail))
        return outcomes

    async def run_round(self, job: VerifiedJob, request_id: str, round_no: int,
                        beta: list[float], sites: list[str],
                        targets: dict[str, Target]) -> list[SiteOutcome]:
        """Round `round_no` of a multi-round job at `sites` (the ones that answered its
        first round): this site's share here, each peer's at the address it answered
        from, under the same deadline as a sub-job. Outcomes in the order of `sites`."""
        async def one(site: str) -> SiteOutcome:
            if site == self._site.name and site not in targets:
                return await self._site.run_round(job, round_no, beta)
            target = Target(targets[site].address, site)
            return await self._call(target, lambda: self._transport.run_subjob(
                target, job.signed, request_id, self._timeout, _ignore, small=True,
                round_no=round_no, beta=beta))
        return list(await asyncio.gather(*(one(s) for s in sites)))

    async def _call(self, target: Target,
                    call: Callable[[], Awaitable[SiteOutcome]]) -> SiteOutcome:
        label = target.name or target.address
        try:
            return await asyncio.wait_for(call(), timeout=self._timeout + 1.0)
        except TimeoutError:
            return SiteOutcome(label, "timed_out",
                               f"no answer within the {self._timeout:g}s site deadline")
        except Exception as exc:  # noqa: BLE001 - one site's failure is that site's row
            return SiteOutcome(label, "failed", str(exc) or type(exc).__name__)

    async def _local(self, job: VerifiedJob, events: FanoutEvents, resumed: bool) -> SiteOutcome:
        site = self._site.name
        reported = False

        async def accepted() -> None:
            nonlocal reported
            if not reported:
                reported = True
                await events.site(SiteEvent(site, "accepted"))

        async def running() -> None:
            await accepted()
            await events.site(SiteEvent(site, "running"))

        async def logged(line: str) -> None:
            await accepted()
            await events.log(site, line)

        # As at a peer (subjob.ACCEPTED_AFTER_S): "accepted" only if the answer takes a while.
        task = asyncio.create_task(self._site.run(job, ShareProgress(running, logged),
                                                  resumed=resumed))
        try:
            done, _ = await asyncio.wait({task}, timeout=subjob.ACCEPTED_AFTER_S)
            if not done:
                await accepted()
            outcome = await task
        finally:
            if not task.done():  # cancelled (job cancel, shutdown): so is the site's run
                task.cancel()
        await events.site(SiteEvent(site, outcome.state, outcome.detail, outcome.n))
        return outcome

    async def _refused_locally(self, detail: str, events: FanoutEvents) -> SiteOutcome:
        outcome = SiteOutcome(self._site.name, "refused", detail)
        await events.site(SiteEvent(outcome.site, outcome.state, outcome.detail))
        return outcome

    async def _remote(self, target: Target, job: VerifiedJob, request_id: str,
                      events: FanoutEvents, small: bool, reached: dict[str, Target],
                      resume: bool) -> SiteOutcome:
        label = target.name or target.address
        started = time.monotonic()
        try:
            outcome = await asyncio.wait_for(
                self._transport.run_subjob(target, job.signed, request_id, self._timeout,
                                           events.relay, small=small, resume=resume),
                timeout=self._timeout + 1.0)
        except TimeoutError:
            outcome = SiteOutcome(label, "timed_out",
                                  f"no answer within the {self._timeout:g}s site deadline")
            await events.site(SiteEvent(outcome.site, outcome.state, outcome.detail))
        except Exception as exc:  # noqa: BLE001 - one site's failure is that site's row
            outcome = SiteOutcome(label, "failed", str(exc) or type(exc).__name__)
            await events.site(SiteEvent(outcome.site, outcome.state, outcome.detail))
        # Otherwise the transport relayed the peer's own events, terminal one included.
        reached[outcome.site] = target
        log.info("site answered", site=outcome.site, state=outcome.state,
                 ms=round((time.monotonic() - started) * 1000, 1))
        return outcome
