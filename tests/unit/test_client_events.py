"""A job's events as the client hands them on: each site's report once, the answer
assembled from its frames, the call released at the final state, JobFailed without one."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import numpy as np
import pytest

from stimctl.client import JobFailed
from stimctl.client.events import Event, follow, job_events, new_site_events
from stimnet import codec
from stimnet.errors import StimnetError
from stimnet.frames import packed_frames
from stimnet.v1 import common_pb2, jobs_pb2


def _site(site: str, state: str, n: int = 0) -> common_pb2.SiteEvent:
    return common_pb2.SiteEvent(site=site, state=state, n=n)


def _frames(doc: dict[str, Any]) -> list[common_pb2.ResultFrame]:
    """A header frame and body chunks: the array is larger than a header carries inline."""
    frames = list(packed_frames(codec.pack(doc, {"m": np.arange(200_000.0)})))  # dense
    assert [f.WhichOneof("frame") for f in frames] == ["header", "chunk", "chunk", "chunk", "chunk"]
    return frames


async def _replay(events: list[jobs_pb2.JobEvent]) -> AsyncIterator[jobs_pb2.JobEvent]:
    for ev in events:
        yield ev


async def _events(messages: list[jobs_pb2.JobEvent], job_id: str = "") -> tuple[
        list[tuple[str, Any]], list[str]]:
    """The (kind, value) pairs handed on, summarised, and when `done` was called."""
    marks: list[str] = []
    out: list[tuple[str, Any]] = []
    async for kind, value in job_events(_replay(messages), job_id, lambda: marks.append("done")):
        marks.append(kind)
        out.append((kind, _summary(kind, value)))
    return out, marks


def _summary(kind: str, value: Any) -> Any:
    if kind == "site":
        return (value.site, value.state)
    if kind == "state":
        return (value.id, value.state)
    if kind == "result":
        return (value.job_id, value.columns)
    return value


class TestNewSiteEvents:
    def test_each_site_state_is_handed_on_once(self) -> None:
        """Reports already seen, and repeats within one batch, are left out, in order."""
        seen: set[tuple[str, str]] = {("a", "accepted")}
        got = new_site_events(seen, [_site("a", "accepted"), _site("a", "done"),
                                     _site("b", "done"), _site("a", "done")])
        assert [(s.site, s.state) for s in got] == [("a", "done"), ("b", "done")]
        assert seen == {("a", "accepted"), ("a", "done"), ("b", "done")}

    def test_a_new_state_of_a_known_site_is_new(self) -> None:
        """(site, state) is the key: a site's next state is reported although the site
        was."""
        seen: set[tuple[str, str]] = set()
        first = new_site_events(seen, [_site("a", "accepted")])
        second = new_site_events(seen, [_site("a", "accepted"), _site("a", "refused")])
        assert ([(s.site, s.state) for s in first], [(s.site, s.state) for s in second]) == (
            [("a", "accepted")], [("a", "refused")])


class TestJobEvents:
    async def test_a_quick_jobs_final_state_lists_its_sites_first(self) -> None:
        """A job whose only message is its final state with its answer: the sites it lists,
        then the answer, then the state; `done` is called after the last."""
        final = jobs_pb2.Job(id="j1", state="succeeded",
                             sites=[_site("a", "done", 5), _site("b", "done", 7)])
        frames = _frames({"result": {"columns": ["n"]}})
        messages = [jobs_pb2.JobEvent(result=f) for f in frames[:-1]]
        messages.append(jobs_pb2.JobEvent(result=frames[-1], state=final))
        out, marks = await _events(messages)
        assert out == [("site", ("a", "done")), ("site", ("b", "done")),
                       ("result", ("j1", ["n"])), ("state", ("j1", "succeeded"))]
        assert marks[-1] == "done"

    async def test_site_reports_repeated_by_later_messages_come_once(self) -> None:
        """A site's event on its own, then listed in a batch and in the job's states, is
        handed on once."""
        messages = [
            jobs_pb2.JobEvent(state=jobs_pb2.Job(id="j1", state="running")),
            jobs_pb2.JobEvent(site=_site("a", "accepted")),
            jobs_pb2.JobEvent(sites=[_site("a", "accepted"), _site("a", "done")]),
            jobs_pb2.JobEvent(state=jobs_pb2.Job(id="j1", state="failed", detail="min_sites",
                                                 sites=[_site("a", "accepted"),
                                                        _site("a", "done")])),
        ]
        out, marks = await _events(messages)
        assert out == [("state", ("j1", "running")), ("site", ("a", "accepted")),
                       ("site", ("a", "done")), ("state", ("j1", "failed"))]
        assert marks == ["state", "site", "site", "state", "done"]

    async def test_a_joining_watchers_state_comes_before_the_sites_it_lists(self) -> None:
        """A running job's state that lists sites so far: the state, then those sites."""
        messages = [jobs_pb2.JobEvent(state=jobs_pb2.Job(id="j1", state="running",
                                                         sites=[_site("a", "accepted")]))]
        out, marks = await _events(messages)
        assert out == [("state", ("j1", "running")), ("site", ("a", "accepted"))]
        assert marks == ["state", "site"]  # not final: the stream is read on

    async def test_a_succeeded_state_before_its_answer_reads_on_to_the_answer(self) -> None:
        """Succeeded without its answer yet: the frames after it are read, and `done` waits
        for the answer."""
        frames = _frames({"result": {"columns": ["m"]}})
        messages = [jobs_pb2.JobEvent(state=jobs_pb2.Job(id="j2", state="succeeded")),
                    *(jobs_pb2.JobEvent(result=f) for f in frames)]
        out, marks = await _events(messages, job_id="j2")
        assert out == [("state", ("j2", "succeeded")), ("result", ("j2", ["m"]))]
        assert marks == ["state", "result"]  # the answer ends nothing on its own

    async def test_log_lines_are_handed_on(self) -> None:
        """A script's log line is an event of its own, between the sites and the state."""
        messages = [jobs_pb2.JobEvent(log_line="site-a: loaded 20 rows"),
                    jobs_pb2.JobEvent(state=jobs_pb2.Job(id="j3", state="cancelled"))]
        out, _ = await _events(messages)
        assert out == [("log", "site-a: loaded 20 rows"), ("state", ("j3", "cancelled"))]

    async def test_frames_without_a_header_are_refused(self) -> None:
        """A result stream that does not start with its header is an error, not an answer."""
        chunk = common_pb2.ResultFrame(chunk=common_pb2.ArrayChunk(
            array_id=codec.BODY, offset=0, data=b"x", last=True))
        with pytest.raises(StimnetError) as err:
            await _events([jobs_pb2.JobEvent(result=chunk)])
        assert err.value.args[0] == "result stream started without a header"


async def _given(events: list[Event]) -> AsyncIterator[Event]:
    for e in events:
        yield e


class TestFollow:
    async def test_the_answer_of_a_succeeded_job(self) -> None:
        """The answer is returned, each event passed to `on_event` in order."""
        seen: list[str] = []
        state = jobs_pb2.Job(id="j1", state="succeeded")
        answer = await follow(_given([("result", "answer"), ("state", state)]),
                              lambda kind, value: seen.append(kind))
        assert (answer, seen) == ("answer", ["result", "state"])

    async def test_a_failed_job_raises_its_state_and_detail(self) -> None:
        """JobFailed names the job, its final state and detail, and carries the job."""
        state = jobs_pb2.Job(id="j1", state="failed", detail="1 of 2 sites contributed")
        with pytest.raises(JobFailed) as err:
            await follow(_given([("state", state)]), None)
        assert err.value.args[0] == "job j1 failed: 1 of 2 sites contributed"
        assert err.value.job.id == "j1"

    async def test_no_state_at_all_names_the_job_as_submitted(self) -> None:
        """A stream that ends without a state: the submitted job's state is the reason."""
        job = jobs_pb2.Job(id="j9", state="queued")
        with pytest.raises(JobFailed) as err:
            await follow(_given([]), None, job)
        assert err.value.args[0] == "job j9 queued: no result"
