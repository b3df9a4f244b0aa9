"""Sandbox slots shared fairly between researchers.

A site runs `[scripts] concurrency` containers at once. With one FIFO, a researcher who
queues many jobs holds every slot until their backlog drains (three sleeping jobs delayed
another researcher's trivial job 52x). Here each researcher has a queue of their own, and
a freed slot goes to the waiting researcher served longest ago (one never served first),
so a backlog delays another researcher's job by at most one job's run time per slot.
Within one researcher's queue, jobs keep their order.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
from collections import deque
from collections.abc import AsyncIterator


class FairSlots:
    def __init__(self, slots: int) -> None:
        if slots < 1:
            raise ValueError("FairSlots needs at least one slot")
        self._free = slots
        self._waiting: dict[str, deque[asyncio.Future[None]]] = {}
        # When each researcher last got a slot (a counter, not a clock: only order counts).
        self._served: dict[str, int] = {}
        self._tick = itertools.count(1)

    @contextlib.asynccontextmanager
    async def slot(self, owner: str) -> AsyncIterator[None]:
        await self._acquire(owner)
        try:
            yield
        finally:
            self._release()

    def waiting(self, owner: str | None = None) -> int:
        queues = self._waiting.values() if owner is None else [self._waiting.get(owner, ())]
        return sum(len(q) for q in queues)

    async def _acquire(self, owner: str) -> None:
        if self._free > 0 and not self._waiting:
            self._free -= 1
            self._served[owner] = next(self._tick)
            return
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiting.setdefault(owner, deque()).append(fut)
        try:
            await fut
        except asyncio.CancelledError:
            if fut.done() and not fut.cancelled():
                self._release()  # granted just as it was cancelled: pass the slot on
            else:
                self._forget(owner, fut)
            raise

    def _release(self) -> None:
        self._free += 1
        while self._free > 0 and self._waiting:
            owner = min(self._waiting, key=lambda o: self._served.get(o, 0))
            fut = self._waiting[owner].popleft()
            if not self._waiting[owner]:
                del self._waiting[owner]
            if fut.done():
                continue
            self._free -= 1
            self._served[owner] = next(self._tick)
            fut.set_result(None)

    def _forget(self, owner: str, fut: asyncio.Future[None]) -> None:
        queue = self._waiting.get(owner)
        if queue is not None and fut in queue:
            queue.remove(fut)
            if not queue:
                del self._waiting[owner]
