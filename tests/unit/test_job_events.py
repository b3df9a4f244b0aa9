"""A job's events alone, no sockets and no store: the event hub keeps each (site, state)
once and hands a new watcher the events so far and then only later ones; a watcher's
stream (jobs/watch.py) opens with a snapshot, batches ready site events, starts quiet for
the submitter, and shows the answer to its owner only."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta

import pytest

from stimnet.pki import Identity
from stimnet.states import SiteEvent
from stimnetd.jobs import watch as watching
from stimnetd.jobs.events import JobEventHub, JobUpdate
from stimnetd.store.records import JobRecord

ALICE = Identity(name="alice", role="researcher", serial=1,
                 not_after=datetime.now(UTC) + timedelta(days=1))
OPS = Identity(name="ops", role="admin", serial=2, not_after=ALICE.not_after)


def _record(state: str = "running", result: bytes | None = None,
            sites: list[dict] | None = None) -> JobRecord:
    return JobRecord(id="j1", kind="query", scope="federated", catalog="c", owner="alice",
                     state=state, detail="", created_at=0.0, updated_at=0.0,  # type: ignore[arg-type]
                     request_id="r", origin="client", payload=b"{}", signature=b"",
                     signer_cert=b"", sites=sites or [], result=result)


def _reader(record: JobRecord):  # type: ignore[no-untyped-def]
    async def read(job_id: str, caller: Identity) -> JobRecord:
        return record
    return read


def _shape(u: JobUpdate) -> tuple:
    """An update as the assertions compare it."""
    if u.kind == "site":
        return ("site", u.site.site, u.site.state)  # type: ignore[union-attr]
    if u.kind == "sites":
        return ("sites", *[(s.site, s.state) for s in u.sites])
    if u.kind == "log":
        return ("log", u.line)
    return (u.kind, u.job.state if u.job else None, u.result)


class TestJobEventHub:
    def test_keeps_and_publishes_each_site_state_once(self) -> None:
        """A (site, state) pair arriving again is neither kept nor published; the same
        site's next state is."""
        hub = JobEventHub(clock=lambda: 7.0)
        job = hub.open("j1")
        with hub.subscribe("j1") as sub:
            for state in ("accepted", "accepted", "running", "running", "done"):
                hub.site_event("j1", SiteEvent("a", state))  # type: ignore[arg-type]
            published = [sub.queue.get_nowait() for _ in range(sub.queue.qsize())]
        assert [(e.site, e.state, e.at) for e in job.sites] == [
            ("a", "accepted", 7.0), ("a", "running", 7.0), ("a", "done", 7.0)]
        assert [_shape(u) for u in published] == [("site", "a", "accepted"),
                                                  ("site", "a", "running"),
                                                  ("site", "a", "done")]

    def test_a_subscriber_gets_the_events_so_far_and_then_only_later_ones(self) -> None:
        """The snapshot and the queue meet without overlap or gap."""
        hub = JobEventHub()
        hub.open("j1")
        hub.site_event("j1", SiteEvent("a", "accepted"))
        with hub.subscribe("j1") as sub:
            hub.site_event("j1", SiteEvent("a", "accepted"))
            hub.site_event("j1", SiteEvent("b", "accepted"))
            assert [(e.site, e.state) for e in sub.sites] == [("a", "accepted")]
            assert [_shape(sub.queue.get_nowait())] == [("site", "b", "accepted")]
            assert sub.queue.empty()

    async def test_log_lines_are_published_not_kept(self) -> None:
        """A relayed "log" from the transport is a log line for the watchers, named by its
        site, and no site event."""
        hub = JobEventHub()
        job = hub.open("j1")
        with hub.subscribe("j1") as sub:
            await hub.fanout_events("j1").relay("a", "log", "hello", 0)
            assert [_shape(sub.queue.get_nowait())] == [("log", "a: hello")]
        assert job.sites == []

    def test_closing_a_job_ends_its_watchers_and_forgets_it(self) -> None:
        """Each watcher's queue gets the end; the job is no longer in memory."""
        hub = JobEventHub()
        hub.open("j1")
        with hub.subscribe("j1") as first, hub.subscribe("j1") as second:
            hub.close("j1")
            assert [first.queue.get_nowait().kind, second.queue.get_nowait().kind] == [
                "end", "end"]
        assert hub.get("j1") is None

    def test_events_of_a_job_not_in_memory_are_dropped(self) -> None:
        """No entry, no watchers: nothing is kept for a job the hub does not hold."""
        hub = JobEventHub()
        hub.site_event("gone", SiteEvent("a", "done"))
        with hub.subscribe("gone") as sub:
            assert (sub.active, sub.sites, sub.queue.empty()) == (None, (), True)


class TestWatch:
    async def test_a_finished_job_is_one_final_state_with_the_owners_answer(self) -> None:
        """Its owner gets the answer on the final state; an admin the state alone."""
        hub = JobEventHub()
        record = _record("succeeded", result=b"answer")
        own = [u async for u in watching.watch(hub, "j1", ALICE, _reader(record))]
        other = [u async for u in watching.watch(hub, "j1", OPS, _reader(record))]
        assert [_shape(u) for u in own] == [("state", "succeeded", b"answer")]
        assert [_shape(u) for u in other] == [("state", "succeeded", None)]

    async def test_a_watcher_joining_mid_job_sees_state_then_events_then_live(self) -> None:
        """The state, the site events so far one by one, then later ones (ready ones
        together), up to and including the final state."""
        hub = JobEventHub()
        hub.open("j1")
        hub.site_event("j1", SiteEvent("a", "accepted"))
        stream = watching.watch(hub, "j1", ALICE, _reader(_record()))
        opening = [await stream.__anext__(), await stream.__anext__()]
        hub.site_event("j1", SiteEvent("a", "accepted"))  # a repeat: dropped by the hub
        hub.site_event("j1", SiteEvent("a", "done"))
        hub.site_event("j1", SiteEvent("b", "done"))
        hub.log("j1", "b", "fine")
        hub.site_event("j1", SiteEvent("b", "failed"))
        hub.publish("j1", JobUpdate("state", job=_record("succeeded"), result=b"x"))
        hub.publish("j1", JobUpdate("state", job=_record("failed")))  # after the end: unread
        rest = [u async for u in stream]
        assert [_shape(u) for u in opening + rest] == [
            ("state", "running", None), ("site", "a", "accepted"),
            ("sites", ("a", "done"), ("b", "done")), ("log", "b: fine"),
            ("site", "b", "failed"), ("state", "succeeded", b"x")]

    async def test_a_job_without_memory_shows_its_stored_events_and_ends(self) -> None:
        """A job no task holds (awaiting an admin) is its row: state and stored events."""
        hub = JobEventHub()
        stored = _record("awaiting_approval", sites=[{"site": "a", "state": "refused",
                                                      "detail": "k", "n": 0, "at": 1.0}])
        got = [u async for u in watching.watch(hub, "j1", ALICE, _reader(stored))]
        assert [_shape(u) for u in got] == [("state", "awaiting_approval", None),
                                            ("site", "a", "refused")]

    async def test_an_admin_watching_gets_the_final_state_without_the_answer(self) -> None:
        """Only the researcher who asked receives the answer, live too."""
        hub = JobEventHub()
        hub.open("j1")
        stream = watching.watch(hub, "j1", OPS, _reader(_record()))
        first = await stream.__anext__()
        hub.publish("j1", JobUpdate("state", job=_record("succeeded"), result=b"x"))
        assert [_shape(first)] + [_shape(u) async for u in stream] == [
            ("state", "running", None), ("state", "succeeded", None)]

    async def test_a_quick_job_is_one_message_for_its_submitter(
            self, monkeypatch: pytest.MonkeyPatch) -> None:
        """Ending within the quiet start, the submitter's stream is its log lines and the
        final state (which lists the sites' events), no separate site events."""
        monkeypatch.setattr(watching, "QUIET_START_S", 30.0)
        hub = JobEventHub()
        hub.open("j1")
        submitted = _record()
        stream = watching.watch(hub, "j1", ALICE, _reader(submitted), submitted)
        reading = asyncio.ensure_future(stream.__anext__())
        await asyncio.sleep(0)  # subscribed, in the quiet start
        hub.site_event("j1", SiteEvent("a", "done"))
        hub.log("j1", "a", "hi")
        hub.publish("j1", JobUpdate("state", job=_record("succeeded"), result=b"x"))
        got = [await reading] + [u async for u in stream]
        assert [_shape(u) for u in got] == [("log", "a: hi"), ("state", "succeeded", b"x")]

    async def test_a_slower_job_shows_its_state_then_what_was_held(
            self, monkeypatch: pytest.MonkeyPatch) -> None:
        """Past the quiet start the submitter hears the state, then the events so far."""
        monkeypatch.setattr(watching, "QUIET_START_S", 0.0)
        hub = JobEventHub()
        hub.open("j1")
        submitted = _record()
        stream = watching.watch(hub, "j1", ALICE, _reader(submitted), submitted)
        first = await stream.__anext__()
        hub.site_event("j1", SiteEvent("a", "accepted"))
        hub.publish("j1", JobUpdate("end"))
        assert [_shape(first)] + [_shape(u) async for u in stream] == [
            ("state", "running", None), ("site", "a", "accepted")]


class TestInbox:
    def test_a_batch_stops_at_the_first_update_that_is_no_site_event(self) -> None:
        """Ready site events go together; the update after them stays next in line."""
        queue: asyncio.Queue[JobUpdate] = asyncio.Queue()
        inbox = watching.Inbox(queue)
        for update in (JobUpdate("site", site=SiteEvent("b", "done")), JobUpdate("log", line="l"),
                       JobUpdate("site", site=SiteEvent("c", "done"))):
            queue.put_nowait(update)
        batch = inbox.site_batch(JobUpdate("site", site=SiteEvent("a", "done")))
        assert [(s.site, s.state) for s in batch] == [("a", "done"), ("b", "done")]
        assert [_shape(u) for u in (inbox.ready(), inbox.ready())] == [  # type: ignore[arg-type]
            ("log", "l"), ("site", "c", "done")]
        assert inbox.ready() is None
