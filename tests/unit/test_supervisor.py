"""The daemon's background tasks under the Supervisor: a failing loop is logged and started
again after doubling pauses, a one-shot task is not, and shutdown cancels and waits for
every task."""

from __future__ import annotations

import asyncio

from structlog.testing import capture_logs

from stimnetd.supervisor import Supervisor


class _Pauses:
    """Stands in for asyncio.sleep: notes each pause and returns at once."""

    def __init__(self) -> None:
        self.taken: list[float] = []

    async def __call__(self, seconds: float) -> None:
        self.taken.append(seconds)


async def test_a_failing_loop_is_logged_and_restarted_with_doubling_pauses() -> None:
    """Three failures, then a clean return: three log entries, pauses 1, 2, 4 (capped)."""
    pauses = _Pauses()
    supervisor = Supervisor(backoff_s=1.0, max_backoff_s=3.0, sleep=pauses)
    runs: list[int] = []
    finished = asyncio.Event()

    async def flaky() -> None:
        runs.append(len(runs))
        if len(runs) <= 3:
            raise RuntimeError(f"failure {len(runs)}")
        finished.set()

    with capture_logs() as logs:
        supervisor.spawn("flaky", flaky)
        await finished.wait()
        await supervisor.shutdown()
    assert runs == [0, 1, 2, 3]
    assert pauses.taken == [1.0, 2.0, 3.0]
    assert [(e["event"], e["task"], e["restart_in_s"]) for e in logs] == [
        ("background task failed", "flaky", 1.0), ("background task failed", "flaky", 2.0),
        ("background task failed", "flaky", 3.0)]


async def test_a_one_shot_task_that_fails_is_logged_and_not_run_again() -> None:
    """restart=False: one run, one log entry, no pause."""
    pauses = _Pauses()
    supervisor = Supervisor(sleep=pauses)
    runs: list[str] = []
    ran = asyncio.Event()

    async def once() -> None:
        runs.append("ran")
        ran.set()
        raise RuntimeError("no")

    with capture_logs() as logs:
        supervisor.spawn("once", once, restart=False)
        await ran.wait()
        await asyncio.sleep(0)  # the failure is handled
        await supervisor.shutdown()
    assert (runs, pauses.taken) == (["ran"], [])
    assert [(e["event"], e["task"], e["restart_in_s"]) for e in logs] == [
        ("background task failed", "once", None)]


async def test_shutdown_cancels_every_task_and_waits_for_it() -> None:
    """Loops spawned before and after the group opened are cancelled; each one's cleanup
    has run when shutdown returns; a task spawned after shutdown never starts."""
    supervisor = Supervisor()
    started: list[str] = []
    cleaned: list[str] = []

    def loop(name: str):  # type: ignore[no-untyped-def]
        async def run() -> None:
            started.append(name)
            try:
                await asyncio.Event().wait()
            finally:
                cleaned.append(name)
        return run

    supervisor.spawn("first", loop("first"))
    while started != ["first"]:
        await asyncio.sleep(0)
    supervisor.spawn("second", loop("second"))
    while len(started) < 2:
        await asyncio.sleep(0)
    await supervisor.shutdown()
    await supervisor.shutdown()
    supervisor.spawn("late", loop("late"))
    await asyncio.sleep(0)
    assert (started, sorted(cleaned)) == (["first", "second"], ["first", "second"])
