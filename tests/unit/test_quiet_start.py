"""The submitter's quiet start (jobs/watch.py): a job that ends within the window is its
final state alone; otherwise what arrived is handed on; nothing is ever taken off the queue
and dropped around the moment the window closes."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

from stimnetd.jobs.events import JobUpdate
from stimnetd.jobs.watch import quiet_start as _quiet_start


def _state(terminal: bool) -> JobUpdate:
    return JobUpdate("state", job=SimpleNamespace(terminal=terminal))  # type: ignore[arg-type]


def _site(state: str) -> JobUpdate:
    return JobUpdate("site", site={"site": "a", "state": state})


async def test_a_job_ending_within_the_window_is_its_final_state() -> None:
    """A job that ends within the window is handed on as its final state, with what came before
    it."""
    q: asyncio.Queue[JobUpdate] = asyncio.Queue()
    final, later = _state(True), JobUpdate("end")
    for u in (_site("accepted"), _site("done"), final, later):
        q.put_nowait(u)
    early, got = await _quiet_start(q, 5.0)
    assert got is final and [u.site["state"] for u in early] == ["accepted", "done"]  # type: ignore[index]
    assert q.get_nowait() is later  # what follows the final state stays queued


async def test_a_slow_job_hands_on_what_arrived_and_loses_nothing_after() -> None:
    """When the window closes first, what arrived is handed on and a later update stays queued."""
    q: asyncio.Queue[JobUpdate] = asyncio.Queue()
    first = _site("accepted")
    q.put_nowait(first)
    early, got = await _quiet_start(q, 0.05)
    assert got is None and early == [first]
    late = _site("done")
    q.put_nowait(late)  # after the window: the cancelled getter must not have eaten it
    assert q.get_nowait() is late


async def test_an_item_arriving_as_the_window_closes_is_kept() -> None:
    """Put from a timer that fires at the window's end: either returned or still queued."""
    for _ in range(20):
        q: asyncio.Queue[JobUpdate] = asyncio.Queue()
        item = _site("done")
        asyncio.get_running_loop().call_later(0.01, q.put_nowait, item)
        early, got = await _quiet_start(q, 0.01)
        assert got is None
        assert early == [item] or (await asyncio.wait_for(q.get(), 1.0)) is item


async def test_the_end_of_a_job_closes_the_window_at_once() -> None:
    """The end of a job's updates closes the window without waiting for it to run out."""
    q: asyncio.Queue[JobUpdate] = asyncio.Queue()
    end = JobUpdate("end")
    q.put_nowait(end)
    fired: list[str] = []
    timer = asyncio.get_running_loop().call_later(1.0, fired.append, "1 s timer")
    early, got = await _quiet_start(q, 5.0)
    timer.cancel()
    assert (got, early) == (None, [end])
    assert fired == []  # the window closed before a timer far shorter than it fired


async def test_a_watcher_going_away_leaves_no_pending_getter() -> None:
    """A watcher cancelled during the window leaves no task behind to take the next update."""
    q: asyncio.Queue[JobUpdate] = asyncio.Queue()
    waiting = asyncio.ensure_future(_quiet_start(q, 5.0))
    await asyncio.sleep(0.01)
    before = asyncio.all_tasks()
    waiting.cancel()
    await asyncio.gather(waiting, return_exceptions=True)
    await asyncio.sleep(0)
    assert [t for t in before if not t.done() and t is not asyncio.current_task()] == []
    item = _site("done")
    q.put_nowait(item)
    assert q.get_nowait() is item
