"""Runs one researcher script per job in a fresh, locked-down Docker container.

`SandboxRunner` is the facade the daemon uses: `run` / `cancel` / `prewarm` /
`reap_orphans` / `shutdown`. The pieces it puts together each have their own module:
the container's settings and its watch (`container`), the host directories it mounts
(`workspace`), reading what it wrote (`outputs`), the pre-started zygotes (`warm`) and
the limits and outcome values (`limits`).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import shutil
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import structlog

from stimnetd.sandbox.container import (
    LABEL_INSTALLATION,
    LABEL_MANAGED,
    LABEL_NODE,
    ContainerEnd,
    ContainerWatch,
    DockerApi,
    ZygoteLost,
    container_spec,
    create_container,
    is_running,
    kill,
    remove,
)
from stimnetd.sandbox.limits import SandboxLimits, SandboxOutcome
from stimnetd.sandbox.warm import WARM_MAX_IDLE_S, WARM_PER_CATALOG, WarmPool
from stimnetd.sandbox.workspace import Workspace, Workspaces

log = structlog.get_logger("stimnetd.sandbox")

SHUTDOWN_GRACE_S = 10.0


@dataclass
class _Job:
    job_id: str
    cancel: asyncio.Event = field(default_factory=asyncio.Event)
    done: asyncio.Event = field(default_factory=asyncio.Event)
    container_id: str | None = None


class SandboxRunner:
    """Runs job scripts in per-job containers and returns a `SandboxOutcome`.

    `docker_api` returns the engine's low-level API (``docker.from_env().api``, or a
    `stimnetd.testing.FakeDockerApi`); it is called once, off the loop, on first use, so
    a node that never runs a script never needs the Docker socket. `node` names this
    daemon in container labels so `reap_orphans` only touches its own containers when
    several nodes share an engine. `warm_per_catalog`: how many zygotes `prewarm` keeps
    ready per catalog; `warm_max_idle_s`: how long one may wait for a job before it is
    replaced by a fresh one.
    """

    def __init__(
        self,
        docker_api: Callable[[], DockerApi],
        image: str,
        limits: SandboxLimits,
        state_dir: Path,
        *,
        node: str,
        verbose_errors: bool = False,
        out_tmpfs: bool | None = None,
        warm_per_catalog: int = WARM_PER_CATALOG,
        warm_max_idle_s: float = WARM_MAX_IDLE_S,
    ) -> None:
        self._warm = WarmPool(start=self._start_zygote, dispose=self._dispose_shielded,
                              jobs_running=lambda: bool(self._jobs),
                              per_catalog=warm_per_catalog, max_idle_s=warm_max_idle_s)
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,62}", node):
            raise ValueError(f"node name {node!r} cannot be used in container names")
        self._factory = docker_api
        self._image = image
        # Read for each container, so a change applies from the next one on.
        self._limits = limits
        self._node = node
        self._installation = ""
        self._verbose_errors = verbose_errors
        # None: a tmpfs output mount whenever this process may mount (root); otherwise a
        # plain directory whose size the monitor polls.
        self._workspaces = Workspaces(Path(state_dir) / "work", out_tmpfs=os.geteuid() == 0
                                      if out_tmpfs is None else out_tmpfs)
        # Where each sample-and-aggregate block's share of a catalog is written (blockdata.py),
        # one directory per job; the ones claimed are spared by the start-up sweep.
        self._blocks_dir = Path(state_dir) / "blocks"
        self._blocks_claimed: set[str] = set()
        self._api: DockerApi | None = None
        self._api_lock = asyncio.Lock()
        self._jobs: dict[str, _Job] = {}
        self._closed = False

    # -- public API --------------------------------------------------------------------

    @property
    def node(self) -> str:
        return self._node

    @property
    def limits(self) -> SandboxLimits:
        return self._limits

    @property
    def out_tmpfs(self) -> bool:
        """Whether job output goes to a capped noexec tmpfs (else a polled directory)."""
        return self._workspaces.out_tmpfs

    async def run(
        self, job_id: str, script: bytes, catalog_root: Path, manifest: Mapping[str, Any]
    ) -> SandboxOutcome:
        """Run `script` against the catalog at `catalog_root`; never raises for job faults."""
        if self._closed:
            raise RuntimeError("sandbox runner is shut down")
        if job_id in self._jobs:
            raise ValueError(f"job {job_id!r} is already running")
        job = _Job(job_id)
        self._jobs[job_id] = job
        started = time.monotonic()
        workspace: Workspace | None = None
        root = await asyncio.to_thread(Path(catalog_root).resolve)
        try:
            api = await self._docker()
            while (slot := self._warm.take(root)) is not None:
                workspace, job.container_id = slot.workspace, slot.container_id
                try:
                    return await self._run_in_zygote(api, job, workspace, script, manifest, started)
                except ZygoteLost:
                    # Died while idle (OOM, an operator's kill or prune, its own idle
                    # exit): nothing of the job ran there; try the next, else a fresh one.
                    log.warning(
                        "warm container lost; using a fresh one", container=slot.container_id
                    )
                    cid, ws = job.container_id, workspace
                    job.container_id = workspace = None
                    await self._dispose_shielded(cid, ws)
            workspace = await self._new_workspace(root)
            job.container_id = await asyncio.to_thread(self._create, api, workspace, job_id)
            await asyncio.to_thread(workspace.write_job, script, manifest)
            if job.cancel.is_set():
                return _outcome(ContainerEnd("cancelled", "cancelled before start"), started, False)
            await asyncio.to_thread(api.start, job.container_id)
            end = await self._watch(api, job, workspace).run()
            return _outcome(end, started, False)
        finally:
            self._jobs.pop(job_id, None)
            job.done.set()
            await self._dispose_shielded(job.container_id, workspace)
            self._warm.job_ended()

    def claim_blocks(self, job_id: str) -> Path:
        """The directory for `job_id`'s blocks' data, spared by `reap_orphans` until
        `release_blocks`: what a crash left there is a copy of subjects' rows."""
        self._blocks_claimed.add(job_id)
        return self._blocks_dir / job_id

    def release_blocks(self, job_id: str) -> None:
        self._blocks_claimed.discard(job_id)

    async def cancel(self, job_id: str) -> bool:
        """Stop a running job; its `run` returns status "cancelled". False if unknown."""
        job = self._jobs.get(job_id)
        if job is None:
            return False
        job.cancel.set()
        if job.container_id is not None and self._api is not None:
            await asyncio.to_thread(kill, self._api, job.container_id)
        return True

    async def prewarm(self, catalog_root: Path) -> None:
        """Create and start zygotes for `catalog_root` (`warm_per_catalog` of them), so the
        next job there skips the container start and the numpy/pandas/nibabel imports.

        The container is created over a fresh, empty workspace; the job's script and
        manifest are written into that workspace when the job arrives, then handed over.
        The slot is refilled after each use, and a zygote idle for `warm_max_idle_s` is
        replaced.
        """
        root = await asyncio.to_thread(Path(catalog_root).resolve)
        await self._warm.prewarm(root)

    async def reap_orphans(self, installation: str | None = None) -> int:
        """Remove every container this node left behind (crash, kill -9); return how many.

        Call once at startup, before `prewarm`. `installation` (the store's installation
        id) is labelled on every container made from then on, and only containers with
        that label are reaped: another installation with the same node name on this
        engine keeps its containers. A job (e.g. one re-queued after the crash)
        may already be running: containers this runner made are told apart by name, as a
        re-queued job's old and new containers carry the same job label.
        """
        api = await self._docker()
        if installation is not None:
            self._installation = installation
        filters = {"label": [f"{LABEL_MANAGED}=true", f"{LABEL_NODE}={self._node}"]
                   + ([f"{LABEL_INSTALLATION}={self._installation}"] if self._installation else [])}
        containers = await asyncio.to_thread(api.containers, all=True, filters=filters)
        removed = 0
        for c in containers:
            # Checked per container, after the listing: a job may create one meanwhile,
            # and its name is known here before the engine is even asked to create it.
            mine = {f"/stimnet-{self._node}-{name}" for name in self._workspaces.own_names}
            if set(c.get("Names") or ()) & mine:
                continue
            await asyncio.to_thread(remove, api, c["Id"])
            removed += 1
        await asyncio.to_thread(self._workspaces.sweep)
        await asyncio.to_thread(self._sweep_blocks, frozenset(self._blocks_claimed))
        return removed

    def _sweep_blocks(self, claimed: frozenset[str]) -> None:
        if self._blocks_dir.is_dir():
            for entry in self._blocks_dir.iterdir():
                if entry.name not in claimed:
                    shutil.rmtree(entry, ignore_errors=True)

    async def shutdown(self) -> None:
        """Cancel running jobs, remove warm containers. Idempotent."""
        self._closed = True
        self._warm.close()
        for job_id in list(self._jobs):
            await self.cancel(job_id)
        waiting = [j.done.wait() for j in self._jobs.values()]
        if waiting:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.gather(*waiting), SHUTDOWN_GRACE_S)
        await self._warm.drain()
        if self._api is not None:
            api, self._api = self._api, None
            await asyncio.to_thread(api.close)

    # -- internals ---------------------------------------------------------------------

    async def _docker(self) -> DockerApi:
        async with self._api_lock:
            if self._api is None:
                self._api = await asyncio.to_thread(self._factory)
            return self._api

    def _watch(self, api: DockerApi, job: _Job, ws: Workspace) -> ContainerWatch:
        assert job.container_id is not None
        return ContainerWatch(api, job.container_id, ws, self._limits, job.cancel)

    async def _run_in_zygote(
        self,
        api: DockerApi,
        job: _Job,
        ws: Workspace,
        script: bytes,
        manifest: Mapping[str, Any],
        started: float,
    ) -> SandboxOutcome:
        """Hand the job to a waiting zygote; raise `ZygoteLost` if it was not alive."""
        assert job.container_id is not None
        if not await asyncio.to_thread(is_running, api, job.container_id):
            raise ZygoteLost
        await asyncio.to_thread(ws.write_job, script, manifest)
        if job.cancel.is_set():
            return _outcome(ContainerEnd("cancelled", "cancelled before start"), started, True)
        handed_at = time.time()
        await asyncio.to_thread(ws.hand_over)
        end = await self._watch(api, job, ws).run(handed_at=handed_at)
        return _outcome(end, started, True)

    def _create(self, api: DockerApi, ws: Workspace, job_id: str, *,
                zygote: bool = False) -> str:
        assert ws.data is not None
        spec = container_spec(
            image=self._image, limits=self._limits, node=self._node, job_id=job_id,
            workspace=ws, data=ws.data, verbose_errors=self._verbose_errors,
            installation=self._installation,
            zygote_idle_s=self._warm.zygote_idle_s if zygote else None,
        )
        return create_container(api, spec)

    async def _start_zygote(self, root: Path) -> tuple[str, Workspace]:
        api = await self._docker()
        workspace = await self._new_workspace(root)
        cid: str | None = None
        try:
            cid = await asyncio.to_thread(self._create, api, workspace, "", zygote=True)
            await asyncio.to_thread(api.start, cid)
        except BaseException:
            await self._dispose_shielded(cid, workspace)
            raise
        return cid, workspace

    async def _new_workspace(self, data: Path) -> Workspace:
        name = self._workspaces.claim()
        try:
            return await asyncio.to_thread(self._workspaces.create, name, self._limits, data)
        except BaseException:
            self._workspaces.release(name)
            raise

    async def _dispose_shielded(self, cid: str | None, ws: Workspace | None) -> None:
        async def dispose() -> None:
            if cid is not None and self._api is not None:
                await asyncio.to_thread(remove, self._api, cid)
            if ws is not None:
                await asyncio.to_thread(ws.remove)
                self._workspaces.release(ws.name)

        # A cancelled job task must still remove its container: finish the removal even
        # if the awaiting task is cancelled again while it runs.
        task = asyncio.get_running_loop().create_task(dispose())
        try:
            await asyncio.shield(task)
        except asyncio.CancelledError:
            await asyncio.wait([task])
            raise


def _outcome(end: ContainerEnd, started: float, prewarmed: bool) -> SandboxOutcome:
    return SandboxOutcome(
        status=end.status,
        reason=end.reason,
        result=end.result,
        arrays=end.arrays,
        log_lines=end.log_lines,
        duration_s=time.monotonic() - started,
        exit_code=end.exit_code,
        prewarmed=prewarmed,
        kind=end.kind,
    )
