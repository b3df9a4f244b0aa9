"""A peer's event stream for one sub-job: 'accepted' only when the answer takes a while,
always before any other event, and no event lost around the moment it is decided."""

from __future__ import annotations

import asyncio
from pathlib import Path
from types import SimpleNamespace

import pytest

from stimnet.errors import Replayed
from stimnetd.federation import subjob
from stimnetd.federation.subjob import LogLine, PeerSubJobs, SubJobEvent
from stimnetd.site import ShareProgress, SiteOutcome
from stimnetd.site.policy import ScriptPolicy
from stimnetd.store import Store


class FakeSite:
    """Emits `events` as (delay_s, "log" | "running") pairs, then answers."""

    def __init__(self, events: list[tuple[float, str]]) -> None:
        self._events = events
        self.name = "site-b"
        self.runs: list[bool] = []  # each run's `resumed`

    async def precheck(self, job: object) -> None:
        return None

    async def run(self, job: object, progress: ShareProgress, *, resumed: bool = False,
                  nonce: object = None) -> SiteOutcome:
        self.runs.append(resumed)
        for delay, state in self._events:
            await asyncio.sleep(delay)
            await (progress.log("") if state == "log" else progress.running())
        # Like a run that ended without a release: the handler remembers the nonce itself.
        return SiteOutcome("site-b", "done", n=7)


def _label(ev: SubJobEvent) -> str:
    """An event as the tests name it: a log line, or a state (the outcome's included)."""
    return "log" if isinstance(ev, LogLine) else ev.state


def _job(nonce: str) -> SimpleNamespace:
    request = SimpleNamespace(kind="query", scope="federated", nonce=nonce, job_id=f"job-{nonce}",
                              catalog="c", entry="site-a")
    return SimpleNamespace(request=request,
                           researcher=SimpleNamespace(name="alice", role="researcher"))


@pytest.mark.parametrize("events, expected", [
    ([], ["done"]),                                              # fast: the outcome only
    ([(0.15, "log")], ["accepted", "log", "done"]),               # slow: accepted first
    ([(0.0, "running")], ["accepted", "running", "done"]),        # an event: accepted first
    ([(0.08, "log"), (0.0, "log")], ["accepted", "log", "log", "done"]),  # during that yield
    ([(0.0, "log")] * 3 + [(0.12, "log")] * 3,
     ["accepted", "log", "log", "log", "log", "log", "log", "done"]),
])
async def test_accepted_is_reported_when_needed_and_nothing_is_lost(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, events, expected) -> None:  # type: ignore[no-untyped-def]
    """'accepted' comes first and only when needed, no event is lost, the nonce is kept."""
    monkeypatch.setattr(subjob, "ACCEPTED_AFTER_S", 0.05)
    store = Store(tmp_path / "node.sqlite3")
    await store.open()
    try:
        handler = PeerSubJobs(site=FakeSite(events), store=store,  # type: ignore[arg-type]
                              verify=lambda signed, fresh=True: signed, max_age_s=300)
        entry = SimpleNamespace(name="site-a")
        got = []
        async for ev in handler.run(_job("n1"), entry, "r1"):  # type: ignore[arg-type]
            got.append(_label(ev))
            if _label(ev) == "accepted":
                # A slow reader (the entry's stream is busy): events that arrive meanwhile
                # must still come through.
                await asyncio.sleep(0.1)
        assert got == expected
        # The nonce is remembered whatever the path: a second run is a replay.
        with pytest.raises(Replayed, match="replayed request"):
            [ev async for ev in handler.run(_job("n1"), entry, "r2")]  # type: ignore[arg-type]
    finally:
        await store.close()


async def test_an_entry_going_away_mid_wait_leaves_no_task_behind(tmp_path: Path) -> None:
    """The entry's call ends (cancelled, deadline) while the site waits for its answer:
    the site's run and the event getter are both cancelled, not left pending."""
    store = Store(tmp_path / "node.sqlite3")
    await store.open()
    try:
        handler = PeerSubJobs(site=FakeSite([(5.0, "log")]), store=store,  # type: ignore[arg-type]
                              verify=lambda signed, fresh=True: signed, max_age_s=300)
        before = asyncio.all_tasks()

        async def consume() -> None:
            async for _ in handler.run(_job("n2"), SimpleNamespace(name="site-a"), "r1"):  # type: ignore[arg-type]
                pass

        consumer = asyncio.ensure_future(consume())
        await asyncio.sleep(0.2)  # past "accepted": waiting for the next event
        started = asyncio.all_tasks() - before - {consumer}
        assert sorted(t.get_coro().__qualname__ for t in started) == [  # type: ignore[union-attr]
            "FakeSite.run", "Queue.get"]  # the site's run and the event getter
        consumer.cancel()
        await asyncio.gather(consumer, return_exceptions=True)
        await asyncio.sleep(0)
        assert [t for t in started if not t.done()] == []
    finally:
        await store.close()


async def test_the_same_script_arriving_twice_under_review_is_a_replay(tmp_path: Path) -> None:
    """Under 'review' a federated script leaves a pending request named by its job id;
    the same signed job arriving again is refused as a replay, not an internal error."""
    from stimnet.errors import Refused

    store = Store(tmp_path / "node.sqlite3")
    await store.open()
    try:
        handler = PeerSubJobs(site=FakeSite([]), store=store,  # type: ignore[arg-type]
                              verify=lambda signed, fresh=True: signed, max_age_s=300,
                              scripts=ScriptPolicy(review="review"))
        job = _job("s1")
        job.request.kind, job.request.script_sha256 = "script", "ab" * 32
        job.signed = SimpleNamespace(payload=b"{}", signature=b"", signer_cert_pem=b"",
                                     script=b"x")
        entry = SimpleNamespace(name="site-a")
        with pytest.raises(Refused, match="awaiting approval"):
            async for _ in handler.run(job, entry, "r1"):  # type: ignore[arg-type]
                pass
        with pytest.raises(Replayed, match="already awaiting approval"):
            async for _ in handler.run(job, entry, "r2"):  # type: ignore[arg-type]
                pass
        assert (await store.get_job("job-s1")).state == "awaiting_approval"  # type: ignore[union-attr]
    finally:
        await store.close()
