"""One job container: what the engine is asked to create, and how its run is judged.

`container_spec` is a pure function of the limits and the workspace, so the hardening
is visible (and unit-tested) in one place: no network, a read-only root and catalog, no
capabilities, no new privileges, a non-root user, and hard limits on memory, pids, CPU,
file size and log size. The daemon decides the image, user, working directory, command
and environment; the researcher supplies only the script bytes.

`ContainerWatch` polls one started container until it stops, kills it when a limit is
crossed, and turns what it found into a status and a reason. Every docker-py call blocks,
so each goes through ``asyncio.to_thread``; polling instead of parking a thread in
``wait()`` keeps a burst of long jobs from exhausting the default executor the rest of
the daemon shares. The Docker API object is handed in, so `stimnetd.testing.FakeDockerApi`
can play back container states in its place.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import re
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal, Protocol

import docker.errors
import numpy as np
from docker.types import LogConfig, Mount, Ulimit

from stimnetd.sandbox import seccomp
from stimnetd.sandbox.cgroup import pids_events_path, pids_limit_hits
from stimnetd.sandbox.failure import CANCELLED, CRASHED, INVALID_OUTPUT, OUT_OF_MEMORY, TIMED_OUT
from stimnetd.sandbox.image import BUILD_HINT, SandboxImageError
from stimnetd.sandbox.limits import (
    KiB,
    SandboxLimits,
    SandboxStatus,
    fmt_bytes,
    fmt_seconds,
    output_overflow,
)
from stimnetd.sandbox.outputs import ResultRefused, log_lines, marker, read_outputs
from stimnetd.sandbox.workspace import ETC_FILES, SANDBOX_UID, Workspace

LABEL_MANAGED = "org.stimnet.managed"
LABEL_NODE = "org.stimnet.node"
LABEL_JOB = "org.stimnet.job"
# The store's random installation id: two installations may share an engine and a node name.
LABEL_INSTALLATION = "org.stimnet.installation"
ENTRYPOINT = ("python3", "-I", "-B", "/opt/stimnet/entrypoint.py")
POLL_FIRST_S = 0.01
# Caps how far past result_bytes a fast writer gets before the kill (plus RLIMIT_FSIZE
# per file, which the kernel enforces exactly).
POLL_MAX_S = 0.1
REMOVED_OUTSIDE = "sandbox container was removed outside the runner"

Verdict = Literal["cancelled", "timeout", "output"]


class DockerApi(Protocol):
    """The part of docker-py's low-level ``APIClient`` the sandbox uses; every call blocks."""

    def create_host_config(self, **kwargs: Any) -> dict[str, Any]: ...
    def create_container(self, **kwargs: Any) -> dict[str, Any]: ...
    def start(self, container: str, /) -> None: ...
    def inspect_container(self, container: str, /) -> dict[str, Any]: ...
    def kill(self, container: str, /) -> None: ...
    def logs(self, container: str, /, **kwargs: Any) -> bytes: ...
    def remove_container(self, container: str, /, **kwargs: Any) -> None: ...
    def containers(self, **kwargs: Any) -> list[dict[str, Any]]: ...
    def close(self) -> None: ...


class ZygoteLost(Exception):
    """The warm container was gone or dead before the job was handed to it."""


# -- what the engine is asked for -------------------------------------------------------


def container_spec(
    *,
    image: str,
    limits: SandboxLimits,
    node: str,
    job_id: str,
    workspace: Workspace,
    data: Path,
    zygote_idle_s: float | None = None,
    verbose_errors: bool = False,
    installation: str = "",
) -> dict[str, Any]:
    """`create_container` keyword arguments, with `host_config` as the keyword arguments
    of `create_host_config`. `zygote_idle_s`: make a zygote that waits for a job and
    exits by itself after that long."""
    return {
        "image": image,
        "entrypoint": list(ENTRYPOINT),
        "command": [],
        "user": f"{SANDBOX_UID}:{SANDBOX_UID}",
        "working_dir": "/job",
        "environment": _environment(limits, zygote_idle_s, verbose_errors),
        "hostname": "stimnet-job",
        "network_disabled": True,
        "labels": {LABEL_MANAGED: "true", LABEL_NODE: node, LABEL_JOB: job_id,
                   LABEL_INSTALLATION: installation},
        "name": f"stimnet-{node}-{workspace.name}",
        "host_config": _host_config(limits, workspace, data),
    }


def _environment(lim: SandboxLimits, zygote_idle_s: float | None,
                 verbose_errors: bool) -> dict[str, str]:
    threads = str(max(1, math.ceil(lim.cpus)))
    env = {
        "LANG": "C.UTF-8",
        "HOME": "/tmp",
        # BLAS sizes its pool from the host's core count, not the CPU quota; more
        # threads than quota only adds contention (and pids).
        "OPENBLAS_NUM_THREADS": threads,
        "OMP_NUM_THREADS": threads,
        "MPLCONFIGDIR": "/tmp",
    }
    if verbose_errors:
        env["STIMNET_VERBOSE_ERRORS"] = "1"
    if zygote_idle_s is not None:
        env["STIMNET_ZYGOTE"] = "1"
        env["STIMNET_ZYGOTE_IDLE_S"] = str(zygote_idle_s)
    return env


def _host_config(lim: SandboxLimits, ws: Workspace, data: Path) -> dict[str, Any]:
    return {
        "network_mode": "none",
        "read_only": True,
        "tmpfs": {"/tmp": f"rw,noexec,nosuid,nodev,size={lim.tmpfs_bytes}"},
        "cap_drop": ["ALL"],
        "security_opt": ["no-new-privileges", f"seccomp={seccomp.profile_json()}"],
        "pids_limit": lim.pids,
        "mem_limit": lim.memory_bytes,
        "memswap_limit": lim.memory_bytes,
        "nano_cpus": int(lim.cpus * 1e9),
        "shm_size": lim.tmpfs_bytes,
        "ipc_mode": "private",
        "init": True,
        "oom_score_adj": 1000,
        "ulimits": [
            Ulimit(name="core", soft=0, hard=0),
            # Kernel-enforced per-file cap; the monitor's total-size check polls.
            Ulimit(name="fsize", soft=lim.result_bytes, hard=lim.result_bytes),
            Ulimit(name="nofile", soft=1024, hard=1024),
        ],
        "mounts": [
            Mount("/data", str(data), type="bind", read_only=True),
            Mount("/job", str(ws.job), type="bind", read_only=True),
            Mount("/out", str(ws.out), type="bind", read_only=False),
            # Given, the engine binds none of its own (from its container directory).
            *(Mount(f"/etc/{name}", str(ws.etc / name), type="bind", read_only=True)
              for name in ETC_FILES if ws.own_etc),
        ],
        "log_config": LogConfig(
            type="json-file",
            config={"max-size": f"{max(1, lim.log_bytes // KiB)}k", "max-file": "1"},
        ),
        "auto_remove": False,
        "privileged": False,
    }


# -- blocking engine calls (run them through asyncio.to_thread) -------------------------


def create_container(api: DockerApi, spec: Mapping[str, Any]) -> str:
    """Create the container `spec` describes; its id. SandboxImageError if the image is absent."""
    try:
        host_config = api.create_host_config(**spec["host_config"])
        container = api.create_container(**{**spec, "host_config": host_config})
    except docker.errors.ImageNotFound:
        msg = f"sandbox image {spec['image']} not found; {BUILD_HINT}"
        raise SandboxImageError(msg) from None
    return str(container["Id"])


def is_running(api: DockerApi, cid: str) -> bool:
    try:
        return bool(api.inspect_container(cid)["State"].get("Running"))
    except docker.errors.NotFound:
        return False


def kill(api: DockerApi, cid: str) -> None:
    with contextlib.suppress(docker.errors.NotFound, docker.errors.APIError):
        api.kill(cid)


def remove(api: DockerApi, cid: str) -> None:
    with contextlib.suppress(docker.errors.NotFound):
        api.remove_container(cid, force=True, v=True)


def _logs(api: DockerApi, cid: str) -> bytes:
    # json-file's max-size bounds what the engine keeps, so this read is bounded too.
    try:
        return bytes(api.logs(cid, stdout=True, stderr=True, stream=False))
    except docker.errors.APIError:
        return b""


def _stderr_tail(api: DockerApi, cid: str) -> bytes:
    try:
        return bytes(api.logs(cid, stdout=False, stderr=True, stream=False, tail=20))
    except docker.errors.APIError:
        return b""


_DOCKER_TIME_RE = re.compile(r"(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d)(?:\.(\d+))?Z\Z")


def finished_before(state: Mapping[str, Any], when: float) -> bool:
    """Whether the engine's FinishedAt (UTC, ns precision) is before `when` (epoch s)."""
    m = _DOCKER_TIME_RE.match(str(state.get("FinishedAt", "")))
    if m is None or m.group(1).startswith("0001-"):
        return False
    whole = datetime.strptime(m.group(1), "%Y-%m-%dT%H:%M:%S").replace(tzinfo=UTC)
    finished = whole.timestamp() + float(f"0.{m.group(2) or 0}")
    return finished < when


# -- one container's run ----------------------------------------------------------------


@dataclass(frozen=True)
class ContainerEnd:
    """How one container's job ended (the runner adds timing and whether it was warm)."""

    status: SandboxStatus
    reason: str
    result: dict[str, Any] | None = None
    arrays: dict[str, np.ndarray] = field(default_factory=dict)
    log_lines: list[str] = field(default_factory=list)
    exit_code: int | None = None
    kind: str = ""  # stimnetd.sandbox.failure.KINDS


@dataclass
class _Stop:
    """What watching one container found: its final state and why it was stopped."""

    state: dict[str, Any] = field(default_factory=dict)
    # None when the container exited by itself.
    verdict: Verdict | None = None
    overflow: str = ""
    pids_limit_hit: bool = False


class ContainerWatch:
    """Watches one started container until it stops, and judges how its job ended.

    Reasons name the limit that stopped the job; nothing in them comes from the
    container except an exception type and line number through `outputs.marker`.
    `cancel` set means the job was cancelled (`SandboxRunner.cancel` also kills the
    container directly). `clock` measures the wall-clock limit.
    """

    def __init__(
        self,
        api: DockerApi,
        container_id: str,
        workspace: Workspace,
        limits: SandboxLimits,
        cancel: asyncio.Event,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._api = api
        self._cid = container_id
        self._ws = workspace
        self._limits = limits
        self._cancel = cancel
        self._clock = clock

    async def run(self, *, handed_at: float | None = None) -> ContainerEnd:
        """Watch and judge. `handed_at` (epoch s): when the job was handed to a zygote;
        ZygoteLost if the zygote had died before that, so it never saw the job."""
        try:
            stop = await self._watch()
        except docker.errors.NotFound:
            return ContainerEnd("failed", REMOVED_OUTSIDE)
        if handed_at is not None and stop.verdict is None and finished_before(stop.state,
                                                                                handed_at):
            raise ZygoteLost
        raw_logs = await asyncio.to_thread(_logs, self._api, self._cid)
        end = await self._judge(stop)
        return replace(end, log_lines=log_lines(raw_logs, self._limits.log_bytes),
                       exit_code=stop.state.get("ExitCode"))

    async def _watch(self) -> _Stop:
        """Poll until the container stops, killing it when a limit is crossed."""
        lim, cid = self._limits, self._cid
        stop = _Stop()
        deadline = self._clock() + lim.timeout_s
        interval = POLL_FIRST_S
        pids_path = await asyncio.to_thread(pids_events_path, cid)
        while True:
            info = await asyncio.to_thread(self._api.inspect_container, cid)
            stop.state = info["State"]
            if not stop.state.get("Running") and stop.state.get("Status") != "created":
                if self._cancel.is_set():
                    # cancel() kills directly, so the exit may be the cancel's SIGKILL.
                    stop.verdict = "cancelled"
                return stop
            hits = await asyncio.to_thread(pids_limit_hits, pids_path)
            stop.pids_limit_hit = stop.pids_limit_hit or hits > 0
            if self._cancel.is_set():
                stop.verdict = "cancelled"
            elif self._clock() >= deadline:
                stop.verdict = "timeout"
            else:
                used, files, problem = await asyncio.to_thread(self._ws.usage, lim.output_files)
                stop.overflow = problem or output_overflow(lim, used, files, at_cap=False)
                if stop.overflow:
                    stop.verdict = "output"
            if stop.verdict is not None:
                await asyncio.to_thread(kill, self._api, cid)
                stop.state = await self._stopped_state()
                return stop
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(
                    self._cancel.wait(), max(0.0, min(interval, deadline - self._clock()))
                )
            interval = min(interval * 1.5, POLL_MAX_S)

    async def _stopped_state(self) -> dict[str, Any]:
        # SIGKILL is asynchronous; the state (and OOMKilled) settles a moment later.
        for _ in range(200):
            state = (await asyncio.to_thread(self._api.inspect_container, self._cid))["State"]
            if not state.get("Running"):
                return dict(state)
            await asyncio.sleep(0.025)
        return dict(state)

    async def _judge(self, stop: _Stop) -> ContainerEnd:
        """The status and reason for a stopped container, and its result if it succeeded."""
        lim = self._limits
        if stop.verdict == "cancelled":
            return ContainerEnd("cancelled", "cancelled", kind=CANCELLED)
        if stop.verdict == "timeout":
            note = f" (process limit {lim.pids} reached)" if stop.pids_limit_hit else ""
            return ContainerEnd("timeout",
                                f"exceeded wall-clock limit {fmt_seconds(lim.timeout_s)} s{note}",
                                kind=TIMED_OUT)
        if stop.verdict == "output":
            return ContainerEnd("failed", f"{stop.overflow} (killed)", kind=INVALID_OUTPUT)
        if stop.state.get("OOMKilled"):
            memory = fmt_bytes(lim.memory_bytes)
            return ContainerEnd("failed", f"memory limit {memory} exceeded (OOM-killed)",
                                kind=OUT_OF_MEMORY)
        used, files, problem = await asyncio.to_thread(self._ws.usage, lim.output_files)
        if problem:
            return ContainerEnd("failed", problem, kind=INVALID_OUTPUT)
        overflow = output_overflow(lim, used, files, at_cap=True)
        if overflow:
            return ContainerEnd("failed", f"{overflow} (write refused)", kind=INVALID_OUTPUT)
        if stop.state.get("ExitCode") != 0:
            tail = await asyncio.to_thread(_stderr_tail, self._api, self._cid)
            return ContainerEnd("failed", self._exit_reason(stop, tail), kind=CRASHED)
        try:
            doc, arrays = await asyncio.to_thread(read_outputs, self._ws.out, lim.result_bytes)
        except ResultRefused as exc:
            return ContainerEnd("failed", str(exc), kind=INVALID_OUTPUT)
        return ContainerEnd("succeeded", "ok", doc, arrays)

    def _exit_reason(self, stop: _Stop, stderr_tail: bytes) -> str:
        """Why a container that exited by itself with a non-zero status failed."""
        lim = self._limits
        exit_code = stop.state.get("ExitCode")
        pids_note = f"process limit {lim.pids} reached" if stop.pids_limit_hit else ""
        found = marker(stderr_tail)
        if found:
            what = f"script raised {found[0]} at line {found[1]}"
        elif exit_code == 137:
            # cgroup v1 can SIGKILL for memory without setting OOMKilled.
            what = f"script was killed (SIGKILL; memory limit {fmt_bytes(lim.memory_bytes)}?)"
        else:
            what = f"script exited with status {exit_code}"
        if not pids_note and found and found[0] == "BlockingIOError":
            # A bomb that dies fast takes its cgroup (and the pids.events counter the
            # monitor reads) with it; in a container with no network and no
            # RLIMIT_NPROC, EAGAIN almost always means fork/clone hit pids.max.
            pids_note = f"process limit {lim.pids} likely reached (fork refused)"
        return f"{pids_note}; {what}" if pids_note else what
