"""`stimctl job ID`: a job a restart re-queued says so, and `--watch` follows it to its
answer (the client reconnecting meanwhile), or to why it ended without one."""

from __future__ import annotations

import argparse
from typing import Any

import pytest

from stimctl.cli import build_parser
from stimctl.client import JobFailed
from stimctl.exits import EXIT_FAILED
from stimctl.jobs_cli import cmd_job
from stimctl.results import QueryAnswer
from stimnet.v1 import jobs_pb2

ANSWER = QueryAnswer("j1", {"result": {"columns": ["n"], "rows": [[30]]}, "manifest": []})


class FakeClient:
    """GetJob answers `job`; following it replays `events`, then answers or fails."""

    def __init__(self, job: jobs_pb2.Job, events: list[tuple[str, Any]],
                 failure: str | None = None) -> None:
        self.job, self.events, self.failure = job, events, failure

    async def get_job(self, job_id: str) -> jobs_pb2.Job:
        return self.job

    async def run_job(self, job: jobs_pb2.Job, on_event: Any) -> QueryAnswer:
        for kind, value in self.events:
            on_event(kind, value)
        if self.failure is not None:
            raise JobFailed(self.failure, None)
        return ANSWER


def _args(*argv: str) -> argparse.Namespace:
    args = build_parser().parse_args(["job", *argv])
    args.json = getattr(args, "json", False)
    return args


async def test_a_requeued_job_says_so(capsys: pytest.CaptureFixture[str]) -> None:
    """The job's table has a row saying a restart re-queued it."""
    job = jobs_pb2.Job(id="j1", state="running", detail="re-run", requeues=1)
    assert await cmd_job(FakeClient(job, []), _args("j1")) == 0  # type: ignore[arg-type]
    assert "once after a restart interrupted it" in capsys.readouterr().out


async def test_watch_follows_the_job_to_its_answer(capsys: pytest.CaptureFixture[str]) -> None:
    """--watch prints the answer once the job ends, whatever happened on the way."""
    job = jobs_pb2.Job(id="j1", state="running")
    rerun = jobs_pb2.Job(id="j1", state="succeeded", requeues=1)
    client = FakeClient(job, [("reconnecting", "lost the node; following job j1 again"),
                              ("state", rerun)])
    assert await cmd_job(client, _args("j1", "--watch")) == 0  # type: ignore[arg-type]
    assert "30" in capsys.readouterr().out


async def test_watch_of_a_job_interrupted_twice_fails_saying_why(
        capsys: pytest.CaptureFixture[str]) -> None:
    """A job not re-run again ends the watch with the job's reason and the failed exit."""
    job = jobs_pb2.Job(id="j1", state="running")
    client = FakeClient(job, [], failure="job j1 interrupted: interrupted twice: ...")
    assert await cmd_job(client, _args("j1", "--watch")) == EXIT_FAILED  # type: ignore[arg-type]
    assert "interrupted twice" in capsys.readouterr().err
