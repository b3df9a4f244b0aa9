"""FairSlots: a freed slot goes to the waiting researcher served longest ago."""

from __future__ import annotations

import asyncio

import pytest

from stimnetd.jobs.fair import FairSlots


async def test_a_backlog_does_not_starve_another_researcher() -> None:
    slots = FairSlots(1)
    order: list[str] = []
    gate = asyncio.Event()

    async def job(owner: str, i: int) -> None:
        async with slots.slot(owner):
            order.append(f"{owner}{i}")
            await gate.wait()

    tasks = [asyncio.create_task(job("alice", i)) for i in range(5)]
    await asyncio.sleep(0)
    tasks.append(asyncio.create_task(job("bob", 0)))
    await asyncio.sleep(0)
    assert slots.waiting("alice") == 4 and slots.waiting("bob") == 1
    gate.set()
    await asyncio.gather(*tasks)
    assert order[:3] == ["alice0", "bob0", "alice1"], order
    assert order == ["alice0", "bob0", "alice1", "alice2", "alice3", "alice4"]


async def test_a_cancelled_waiter_gives_up_its_place() -> None:
    slots = FairSlots(1)
    held = asyncio.Event()
    release = asyncio.Event()

    async def holder() -> None:
        async with slots.slot("alice"):
            held.set()
            await release.wait()

    async def waiter(owner: str) -> str:
        async with slots.slot(owner):
            return owner

    h = asyncio.create_task(holder())
    await held.wait()
    gone = asyncio.create_task(waiter("bob"))
    kept = asyncio.create_task(waiter("carol"))
    await asyncio.sleep(0)
    gone.cancel()
    with pytest.raises(asyncio.CancelledError):
        await gone
    release.set()
    assert await kept == "carol"
    await h
    assert slots.waiting() == 0
    # Every slot came back: a new job gets one at once.
    assert await asyncio.wait_for(waiter("dave"), 1) == "dave"


def test_needs_a_slot() -> None:
    with pytest.raises(ValueError, match="at least one slot"):
        FairSlots(0)
