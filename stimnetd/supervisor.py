"""The daemon's background tasks, supervised under one TaskGroup.

A task that raises is logged with its traceback and, if it is a long-lived loop, started
again after a pause that doubles up to `max_backoff_s`, so a loop that keeps failing is
seen in the log and does not spin. A task that returns is done. `shutdown()` cancels
every task and waits for each to finish.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable

import structlog

log = structlog.get_logger("stimnetd.supervisor")

Work = Callable[[], Awaitable[None]]


class Supervisor:
    def __init__(self, *, backoff_s: float = 1.0, max_backoff_s: float = 60.0,
                 sleep: Callable[[float], Awaitable[None]] = asyncio.sleep) -> None:
        self._backoff_s = backoff_s
        self._max_backoff_s = max_backoff_s
        self._sleep = sleep
        self._group: asyncio.TaskGroup | None = None
        self._waiting: list[tuple[str, Work, bool]] = []
        self._holder: asyncio.Task[None] | None = None
        self._stopped = False

    def spawn(self, name: str, work: Work, *, restart: bool = True) -> None:
        """Run `work()` as the task `name`; `restart`: run it again whenever it raises."""
        if self._stopped:
            log.warning("background task not started: stopping", task=name)
            return
        if self._group is not None:
            self._group.create_task(self._supervise(name, work, restart), name=name)
            return
        # The group opens in its own task, which has not run yet.
        self._waiting.append((name, work, restart))
        if self._holder is None:
            self._holder = asyncio.get_running_loop().create_task(self._hold(),
                                                                  name="supervisor")

    async def shutdown(self) -> None:
        """Cancel every task and wait for them; idempotent."""
        self._stopped = True
        self._waiting.clear()
        holder, self._holder = self._holder, None
        if holder is None:
            return
        holder.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await holder

    async def _hold(self) -> None:
        async with asyncio.TaskGroup() as group:
            self._group = group
            for name, work, restart in self._waiting:
                group.create_task(self._supervise(name, work, restart), name=name)
            self._waiting.clear()
            try:
                await asyncio.get_running_loop().create_future()  # until shutdown()
            finally:
                self._group = None

    async def _supervise(self, name: str, work: Work, restart: bool) -> None:
        pause = self._backoff_s
        while True:
            try:
                await work()
                return
            except Exception:  # noqa: BLE001 - logged here, then retried or given up
                log.exception("background task failed", task=name,
                              restart_in_s=pause if restart else None)
                if not restart:
                    return
            await self._sleep(pause)
            pause = min(pause * 2, self._max_backoff_s)
