"""How the sandbox judges a container's run, from container states a FakeDockerApi plays
back (no Docker): the status and reason for each way a job can end, and a zygote lost
before the hand-over."""

from __future__ import annotations

import asyncio
import itertools
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import docker.errors
import pytest

from stimnetd.sandbox import SandboxImageError, SandboxLimits, SandboxRunner
from stimnetd.sandbox.container import ContainerEnd, ContainerWatch, ZygoteLost, finished_before
from stimnetd.sandbox.workspace import Workspace
from stimnetd.testing import FakeDockerApi

LIMITS = SandboxLimits(memory_bytes=16 << 20, pids=64, timeout_s=1.5, result_bytes=64 << 10,
                       output_files=8)
RUNNING = {"Status": "running", "Running": True, "ExitCode": 0, "OOMKilled": False}
MANIFEST = {"tables": {}, "subject_key": "subject", "image_fields": [], "fields": {}}


def exited(code: int, *, oom: bool = False, at: str = "2999-01-01T00:00:00Z") -> dict[str, Any]:
    return {"Status": "exited", "Running": False, "ExitCode": code, "OOMKilled": oom,
            "FinishedAt": at}


def stepping_clock(step_s: float = 1.0) -> Callable[[], float]:
    """A clock that moves `step_s` on at every reading, so a deadline comes in a few polls."""
    ticks = itertools.count(0.0, step_s)
    return lambda: next(ticks)


@pytest.fixture
def workspace(tmp_path: Path) -> Workspace:
    return Workspace.create(tmp_path / "work", LIMITS, False, "ws")


async def judge(api: FakeDockerApi, ws: Workspace, *, cancel: bool = False,
                handed_at: float | None = None) -> ContainerEnd:
    event = asyncio.Event()
    if cancel:
        event.set()
    watch = ContainerWatch(api, "c", ws, LIMITS, event, clock=stepping_clock())
    return await watch.run(handed_at=handed_at)


class TestContainerWatch:
    async def test_a_container_running_past_the_limit_is_killed_as_a_timeout(
            self, workspace: Workspace) -> None:
        """Still running at the wall-clock deadline: killed, status timeout, the limit named."""
        api = FakeDockerApi([RUNNING])
        end = await judge(api, workspace)
        assert (end.status, end.reason) == ("timeout", "exceeded wall-clock limit 1.5 s")
        assert (api.killed, end.exit_code, end.result) == (["c"], 137, None)

    async def test_output_past_the_limit_while_running_is_killed(
            self, workspace: Workspace) -> None:
        """More output than result_bytes while the script runs gets it killed, naming the cap."""
        (workspace.out / "pad").write_bytes(b"\0" * (LIMITS.result_bytes + 1))
        api = FakeDockerApi([RUNNING])
        end = await judge(api, workspace)
        assert (end.status, end.reason) == ("failed", "output exceeded result limit 64 KiB (killed)")
        assert api.killed == ["c"]

    async def test_output_at_the_cap_after_exit_means_a_write_was_refused(
            self, workspace: Workspace) -> None:
        """Exactly result_bytes after a clean exit: the tmpfs refused a write, so it fails."""
        (workspace.out / "result.json").write_bytes(b" " * LIMITS.result_bytes)
        end = await judge(FakeDockerApi([exited(0)]), workspace)
        assert (end.status, end.reason) == ("failed",
                                            "output exceeded result limit 64 KiB (write refused)")

    async def test_too_many_output_files_are_killed(self, workspace: Workspace) -> None:
        """More files than output_files while running gets the container killed."""
        for i in range(LIMITS.output_files + 1):
            (workspace.out / f"f{i}").write_bytes(b"")
        end = await judge(FakeDockerApi([RUNNING]), workspace)
        assert (end.status, end.reason) == ("failed", "output exceeded 8 files (killed)")

    async def test_an_oom_kill_names_the_memory_limit(self, workspace: Workspace) -> None:
        """OOMKilled in the final state is reported as the memory limit, whatever the code."""
        api = FakeDockerApi([RUNNING, exited(137, oom=True)])
        end = await judge(api, workspace)
        assert (end.status, end.reason) == ("failed", "memory limit 16 MiB exceeded (OOM-killed)")
        assert (api.killed, end.exit_code) == ([], 137)

    async def test_exit_137_without_oomkilled_is_a_sigkill_that_may_be_memory(
            self, workspace: Workspace) -> None:
        """A SIGKILL exit the engine did not flag as OOM (cgroup v1) says memory may be why."""
        end = await judge(FakeDockerApi([exited(137)]), workspace)
        assert (end.status, end.reason) == ("failed",
                                            "script was killed (SIGKILL; memory limit 16 MiB?)")

    @pytest.mark.parametrize(("stderr", "reason"), [
        (b"", "script exited with status 3"),
        (b"Traceback ...\nstimnet-runtime: ZeroDivisionError at line 7\n",
         "script raised ZeroDivisionError at line 7"),
        (b"stimnet-runtime: Age71 at line 3\n", "script raised an exception at line 3"),
        (b"stimnet-runtime: BlockingIOError at line 5\n",
         "process limit 64 likely reached (fork refused); script raised BlockingIOError at line 5"),
        (b"stimnet-runtime: patient s00 is 71\n", "script exited with status 3"),
    ], ids=["plain", "marker", "custom-exception", "fork-refused", "forged-marker"])
    async def test_a_non_zero_exit_is_reported_from_the_marker_only(
            self, workspace: Workspace, stderr: bytes, reason: str) -> None:
        """A failed script's reason comes from the runtime's strict stderr marker, or the code."""
        api = FakeDockerApi([exited(3)], logs=b"out\n" + stderr, stderr=stderr)
        end = await judge(api, workspace)
        assert (end.status, end.reason, end.exit_code) == ("failed", reason, 3)

    async def test_a_clean_exit_with_a_result_succeeds(self, workspace: Workspace) -> None:
        """Exit 0 and a valid result file: succeeded, the document read, the logs kept."""
        doc = {"version": 1, "aggregates": []}
        (workspace.out / "result.json").write_text(json.dumps(doc))
        end = await judge(FakeDockerApi([RUNNING, exited(0)], logs=b"hello\nworld\n"), workspace)
        assert (end.status, end.reason, end.result, end.arrays) == ("succeeded", "ok", doc, {})
        assert (end.log_lines, end.exit_code) == (["hello", "world"], 0)

    async def test_a_clean_exit_without_a_result_fails(self, workspace: Workspace) -> None:
        """Exit 0 and no result file: failed, saying no aggregates were emitted."""
        end = await judge(FakeDockerApi([exited(0)]), workspace)
        assert (end.status, end.reason) == ("failed", "script emitted no aggregates (no result file)")

    async def test_a_cancelled_job_is_killed_and_reported_cancelled(
            self, workspace: Workspace) -> None:
        """With the cancel event set, a running container is killed and the job is cancelled."""
        api = FakeDockerApi([RUNNING])
        end = await judge(api, workspace, cancel=True)
        assert (end.status, end.reason, api.killed) == ("cancelled", "cancelled", ["c"])

    async def test_a_container_removed_behind_the_runners_back_fails_the_job(
            self, workspace: Workspace) -> None:
        """A container the engine no longer knows fails the job with a reason saying so."""
        api = FakeDockerApi([RUNNING])
        api.removed.append("c")
        end = await judge(api, workspace)
        assert end == ContainerEnd("failed", "sandbox container was removed outside the runner")

    async def test_a_zygote_dead_before_the_hand_over_is_lost(self, workspace: Workspace) -> None:
        """A zygote that exited before the job was handed to it never saw the job."""
        api = FakeDockerApi([exited(75, at="2020-01-01T00:00:00Z")])
        with pytest.raises(ZygoteLost):
            await judge(api, workspace, handed_at=1795600000.0)

    async def test_a_zygote_that_exited_after_the_hand_over_ran_the_job(
            self, workspace: Workspace) -> None:
        """A zygote that exited after the hand-over is judged like any container."""
        api = FakeDockerApi([exited(3, at="2026-11-25T09:46:41Z")])
        end = await judge(api, workspace, handed_at=1795600000.5)
        assert (end.status, end.reason) == ("failed", "script exited with status 3")


def test_exit_time_tells_a_zygote_that_died_before_the_hand_over() -> None:
    """Only an engine FinishedAt before the hand-over counts as dying idle; "never" does not."""
    handed_at = 1795600000.5  # 2026-11-25T09:46:40.5Z
    assert finished_before({"FinishedAt": "2026-11-25T09:46:40.499Z"}, handed_at) is True
    assert finished_before({"FinishedAt": "2026-11-25T09:46:40.501000000Z"}, handed_at) is False
    assert finished_before({"FinishedAt": "2026-11-25T09:46:41Z"}, handed_at) is False
    assert finished_before({"FinishedAt": "0001-01-01T00:00:00Z"}, handed_at) is False
    assert finished_before({}, handed_at) is False


def fake_runner(api: FakeDockerApi, tmp_path: Path) -> SandboxRunner:
    return SandboxRunner(lambda: api, "stimnet-sandbox:test", LIMITS, tmp_path / "state",
                         node="node-a", out_tmpfs=False, warm_per_catalog=1)


class TestSandboxRunner:
    @pytest.mark.parametrize("zygote", [
        [exited(75)],
        # Alive when checked, dead (FinishedAt long before) when watched after the hand-over.
        [RUNNING, exited(75, at="2020-01-01T00:00:00Z")],
    ], ids=["dead-when-checked", "died-before-hand-over"])
    async def test_a_lost_zygote_is_replaced_by_a_fresh_container(
            self, tmp_path: Path, zygote: list[dict[str, Any]]) -> None:
        """A zygote lost before the hand-over is removed and the job runs in a fresh one."""
        api = FakeDockerApi({"fake-1": zygote, "fake-2": [exited(0)]})
        runner = fake_runner(api, tmp_path)
        try:
            await runner.prewarm(tmp_path)
            out = await runner.run("j", b"pass\n", tmp_path, MANIFEST)
        finally:
            await runner.shutdown()
        assert (out.status, out.reason, out.prewarmed) == (
            "failed", "script emitted no aggregates (no result file)", False)
        assert (api.started, api.removed) == (["fake-1", "fake-2"], ["fake-1", "fake-2"])
        assert [c["labels"]["org.stimnet.job"] for c in api.created] == ["", "j"]
        assert api.closed is True

    async def test_a_live_zygote_runs_the_job(self, tmp_path: Path) -> None:
        """A zygote alive at the hand-over runs the job, which is reported prewarmed."""
        api = FakeDockerApi({"fake-1": [RUNNING, exited(3)]})
        runner = fake_runner(api, tmp_path)
        try:
            await runner.prewarm(tmp_path)
            out = await runner.run("j", b"pass\n", tmp_path, MANIFEST)
        finally:
            await runner.shutdown()
        assert (out.status, out.reason, out.prewarmed) == (
            "failed", "script exited with status 3", True)
        assert api.removed == ["fake-1"]

    async def test_a_missing_image_says_how_to_build_it(self, tmp_path: Path) -> None:
        """The engine's ImageNotFound becomes a SandboxImageError naming the fix."""
        class NoImage(FakeDockerApi):
            def create_container(self, **kwargs: Any) -> dict[str, Any]:
                raise docker.errors.ImageNotFound("no such image")

        runner = fake_runner(NoImage([RUNNING]), tmp_path)
        try:
            with pytest.raises(SandboxImageError) as exc:
                await runner.run("j", b"pass\n", tmp_path, MANIFEST)
        finally:
            await runner.shutdown()
        assert exc.value.args[0] == (
            "sandbox image stimnet-sandbox:test not found; run sandbox/build-offline.sh "
            "(or build sandbox/Dockerfile where a registry is reachable)")

    async def test_reap_orphans_removes_this_nodes_leftovers_only(self, tmp_path: Path) -> None:
        """Containers labelled with this node are removed; another node's are left alone."""
        api = FakeDockerApi([RUNNING])
        for node in ("node-a", "node-b", "node-a"):
            api.create_container(name=f"stimnet-{node}-old", labels={
                "org.stimnet.managed": "true", "org.stimnet.node": node})
        runner = fake_runner(api, tmp_path)
        try:
            assert await runner.reap_orphans() == 2
        finally:
            await runner.shutdown()
        assert api.removed == ["fake-1", "fake-3"]
