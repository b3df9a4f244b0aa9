"""A job's events as the client hands them to its caller.

A node's JobEvent messages (WatchJob's, or RunJob's on the Session stream) become
``(kind, value)`` pairs: ``("state", Job)``, ``("site", SiteEvent)``, ``("log", str)`` and
``("result", QueryAnswer)``, the last once its frames are all in. Each site's event is
handed on once per (site, state), however many messages list it; that rule lives in
`new_site_events` alone.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Iterable
from typing import Any, Literal, Protocol, TypeVar

from stimctl.results import QueryAnswer
from stimnet import codec
from stimnet.errors import JobFailed, StimnetError
from stimnet.frames import feed
from stimnet.states import TERMINAL_STATES

# "reconnecting": the watch lost its node and follows the job again (AsyncClient.watch).
EventKind = Literal["state", "site", "log", "result", "reconnecting"]
Event = tuple[EventKind, Any]
# Called with each event as it arrives (the CLI's live progress, a notebook's logger).
OnEvent = Callable[[EventKind, Any], object]


class _SiteReport(Protocol):
    @property
    def site(self) -> str: ...

    @property
    def state(self) -> str: ...


S = TypeVar("S", bound=_SiteReport)


def new_site_events(seen: set[tuple[str, str]], sites: Iterable[S]) -> list[S]:
    """The events of `sites` whose (site, state) is not in `seen`, each once, in order;
    `seen` takes them. A job's state lists its sites' events so far, and a site's event
    may also come on its own, so the same report arrives several times."""
    fresh: list[S] = []
    for s in sites:
        key = (s.site, s.state)
        if key not in seen:
            seen.add(key)
            fresh.append(s)
    return fresh


class _Frames:
    """One answer's result frames, header first, assembled as they come."""

    def __init__(self) -> None:
        self._asm: codec.Assembler | None = None

    def add(self, frame: Any, job_id: str) -> QueryAnswer | None:
        """Take one frame: the answer once it completes it, else None."""
        if frame.WhichOneof("frame") == "header":
            self._asm = codec.Assembler()
        if self._asm is None:
            raise StimnetError("result stream started without a header")
        feed(self._asm, frame)
        if not self._asm.complete:
            return None
        doc, arrays = self._asm.result()
        self._asm = None
        return QueryAnswer(job_id, doc, arrays)


async def job_events(events: AsyncIterator[Any], job_id: str,
                     done: Callable[[], None]) -> AsyncIterator[Event]:
    """A job's JobEvent messages as events, to its final state; `done()` is called when
    nothing else is to come (the rest of the call is then the node's status alone).

    Args:
        events: the JobEvent messages, in the order the node sent them.
        job_id: the job's id, or ``""`` to take it from its first state.
        done: called once the job's last event has been handed on.
    """
    frames, answered = _Frames(), False
    seen: set[tuple[str, str]] = set()
    async for ev in events:
        # Several fields may be set in one event: sites, then result, then state.
        if ev.HasField("state") and not job_id:
            job_id = ev.state.id
        # A quick job's only message is its final state: the site events it lists
        # happened before it ended, so they come first. A joining watcher's first state
        # comes before the events it lists.
        final = ev.HasField("state") and ev.state.state in TERMINAL_STATES
        sites = [ev.site] if ev.HasField("site") else []
        for site in new_site_events(seen, [*sites, *ev.sites,
                                           *(ev.state.sites if final else ())]):
            yield "site", site
        if ev.log_line:
            yield "log", ev.log_line
        if ev.HasField("result") and (answer := frames.add(ev.result, job_id)) is not None:
            yield "result", answer
            answered = True
        if ev.HasField("state"):
            yield "state", ev.state
            for site in new_site_events(seen, ev.state.sites):
                yield "site", site
        if final and (answered or ev.state.state != "succeeded"):
            # The answer does not wait for the call's status, a further hop behind it; a
            # succeeded state whose answer follows it (a joining watcher's) is read on.
            done()
            return


async def follow(events: AsyncIterator[Event], on_event: OnEvent | None,
                 job: Any = None) -> QueryAnswer:
    """Consume a job's events to the end: its answer, or JobFailed naming the final state.

    Args:
        events: the job's events (`job_events`).
        on_event: called with each event, in order, before the next is read.
        job: the job as submitted, named in the error if no state arrives.
    """
    answer, final = None, job
    async for kind, value in events:
        if on_event is not None:
            on_event(kind, value)
        if kind == "state":
            final = value
        elif kind == "result":
            answer = value
    if final is None or final.state != "succeeded" or answer is None:
        state = final.state if final is not None else "unknown"
        detail = (final.detail if final is not None else "") or "no result"
        raise JobFailed(f"job {final.id if final is not None else '?'} {state}: {detail}", final)
    return answer
