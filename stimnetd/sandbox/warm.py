"""Pre-started "zygote" containers, kept ready per catalog.

A zygote has already imported numpy, pandas, nibabel and the runtime when a job arrives;
the job is handed to it by writing files into its read-only /job mount (see
sandbox/runtime/entrypoint.py), and the wall-clock limit counts from that hand-over. It
still serves exactly one job. Bind mounts are fixed at create time, so a zygote is made
for one catalog root and only a job on that catalog can take it.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog

from stimnetd.sandbox.workspace import Workspace

log = structlog.get_logger("stimnetd.sandbox")

# An idle zygote is replaced after this long (the replacement also picks up a rebuilt
# image); it exits by itself ZYGOTE_SELF_EXIT_GRACE_S later in case its daemon is gone.
WARM_MAX_IDLE_S = 600.0
ZYGOTE_SELF_EXIT_GRACE_S = 60.0
# Two per catalog: a zygote takes a container start plus its imports to get ready, so
# with one, a job arriving soon after another would wait for the refill's imports.
WARM_PER_CATALOG = 2
# A refill (a container start plus the imports, a CPU-heavy burst) waits until no job of
# this runner has run for REFILL_QUIET_S, so it does not slow running jobs down; under a
# steady stream of jobs it waits at most REFILL_WAIT_MAX_S.
REFILL_QUIET_S = 0.2
REFILL_WAIT_MAX_S = 5.0


@dataclass
class WarmSlot:
    """A started zygote waiting for a job, and the timer that recycles it when idle."""

    container_id: str
    workspace: Workspace
    expiry: asyncio.TimerHandle | None = None


StartZygote = Callable[[Path], Awaitable[tuple[str, Workspace]]]
Dispose = Callable[[str | None, Workspace | None], Awaitable[None]]


class WarmPool:
    """Started zygotes per catalog root, `per_catalog` of each, refilled after each use.

    `start(root)` creates and starts one zygote (container id, workspace), undoing its
    own work if it fails; `dispose` removes a container and its workspace, finishing even
    if its caller is cancelled; `jobs_running()` says whether a job is running now, so a
    refill can wait for a quiet moment.
    """

    def __init__(
        self,
        *,
        start: StartZygote,
        dispose: Dispose,
        jobs_running: Callable[[], bool],
        per_catalog: int = WARM_PER_CATALOG,
        max_idle_s: float = WARM_MAX_IDLE_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if not (max_idle_s > 0 and per_catalog >= 1):
            raise ValueError("warm_max_idle_s must be positive and warm_per_catalog at least 1")
        self._start = start
        self._dispose = dispose
        self._jobs_running = jobs_running
        self.per_catalog = per_catalog
        self.max_idle_s = max_idle_s
        self._clock = clock
        # Oldest first: the one most likely to have finished its imports.
        self._warm: dict[Path, list[WarmSlot]] = {}
        self._warming: dict[Path, int] = {}
        self._keep_warm: set[Path] = set()
        self._last_job_end = 0.0
        self._tasks: set[asyncio.Task[None]] = set()
        self._closed = False

    @property
    def zygote_idle_s(self) -> float:
        """How long a zygote waits for a job before it exits by itself."""
        return self.max_idle_s + ZYGOTE_SELF_EXIT_GRACE_S

    def job_ended(self) -> None:
        self._last_job_end = self._clock()

    async def prewarm(self, root: Path) -> None:
        """Start zygotes for the (resolved) catalog `root` until `per_catalog` are ready,
        and keep that many after each use.

        Nothing watches an idle zygote's clock: the job's wall-clock limit starts at the
        hand-over. Its memory (the imported libraries) counts against its own
        container's limit.
        """
        self._keep_warm.add(root)
        while not self._closed and (
            len(self._warm.get(root, ())) + self._warming.get(root, 0) < self.per_catalog
        ):
            self._warming[root] = self._warming.get(root, 0) + 1
            try:
                slot = await self._start_zygote_shielded(root)
            finally:
                self._warming[root] -= 1
                if not self._warming[root]:
                    del self._warming[root]
            if slot is None:
                return
            self._warm.setdefault(root, []).append(slot)

    def take(self, root: Path) -> WarmSlot | None:
        """The oldest zygote for `root`, now the caller's to use and dispose; a refill
        starts once the runner is quiet."""
        slots = self._warm.get(root)
        if not slots:
            return None
        slot = slots.pop(0)
        if not slots:
            del self._warm[root]
        if slot.expiry is not None:
            slot.expiry.cancel()
        if root in self._keep_warm:
            self._spawn(self._refill(root, wait_quiet=True))
        return slot

    def close(self) -> None:
        """Start no more zygotes and cancel pending refills (then `drain`)."""
        self._closed = True
        self._keep_warm.clear()
        for task in list(self._tasks):
            task.cancel()

    async def drain(self) -> None:
        """After `close`: wait for the cancelled refills, then remove every idle zygote."""
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        while self._warm:
            _, slots = self._warm.popitem()
            for slot in slots:
                if slot.expiry is not None:
                    slot.expiry.cancel()
                await self._dispose(slot.container_id, slot.workspace)

    # -- internals ---------------------------------------------------------------------

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _start_zygote_shielded(self, root: Path) -> WarmSlot | None:
        # Cancelling a to_thread call does not stop the thread: a container created after
        # the cancel would never be removed. Let the start finish, then undo it.
        task = asyncio.get_running_loop().create_task(self._start_zygote(root))
        try:
            return await asyncio.shield(task)
        except asyncio.CancelledError:
            await asyncio.wait([task])
            if not task.cancelled() and task.exception() is None and task.result() is not None:
                slot = task.result()
                assert slot is not None
                if slot.expiry is not None:
                    slot.expiry.cancel()
                await self._dispose(slot.container_id, slot.workspace)
            raise

    async def _start_zygote(self, root: Path) -> WarmSlot | None:
        cid, workspace = await self._start(root)
        if self._closed:
            await self._dispose(cid, workspace)
            return None
        slot = WarmSlot(cid, workspace)
        slot.expiry = asyncio.get_running_loop().call_later(
            self.max_idle_s, self._expire, root, slot
        )
        return slot

    def _expire(self, root: Path, slot: WarmSlot) -> None:
        slots = self._warm.get(root, [])
        if self._closed or slot not in slots:
            return
        slots.remove(slot)
        if not slots:
            del self._warm[root]
        self._spawn(self._recycle(root, slot))

    async def _recycle(self, root: Path, slot: WarmSlot) -> None:
        """Replace a zygote that waited too long: start the new one, then drop the old."""
        try:
            if root in self._keep_warm:
                await self._refill(root)
        finally:
            await self._dispose(slot.container_id, slot.workspace)

    async def _refill(self, root: Path, wait_quiet: bool = False) -> None:
        if wait_quiet:
            give_up = self._clock() + REFILL_WAIT_MAX_S
            while self._clock() < give_up and (
                self._jobs_running() or self._clock() - self._last_job_end < REFILL_QUIET_S
            ):
                await asyncio.sleep(0.05)
        try:
            await self.prewarm(root)
        except Exception:  # noqa: BLE001 - a failed refill only costs the next job latency
            log.warning("prewarm refill failed", exc_info=True)
