"""site/blocks.hold_to_slot: a noised script share is held to the first multiple of the
release slot after its start (a fake clock; the real-daemon check is
tests/sandbox/test_release_timing.py)."""

from __future__ import annotations

import asyncio

import pytest

from stimnetd.site import blocks


class FakeClock:
    def __init__(self, now: float) -> None:
        self.now = now
        self.slept: list[float] = []

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> FakeClock:
    fake = FakeClock(100.0)

    async def sleep(s: float) -> None:
        fake.slept.append(s)
        fake.now += s

    monkeypatch.setattr(blocks.asyncio, "sleep", sleep)
    return fake


@pytest.mark.parametrize(("ran", "slots"), [(0.0, 1), (3.0, 1), (9.99, 1), (10.0, 1),
                                            (10.5, 2), (31.0, 4)])
def test_the_share_is_released_at_the_first_slot_boundary_after_its_run(
        clock: FakeClock, ran: float, slots: int) -> None:
    started = clock.now
    clock.now += ran
    got = asyncio.run(blocks.hold_to_slot(started, 10.0, clock))
    assert got == slots
    assert clock.now == pytest.approx(started + slots * 10.0)


def test_a_slot_of_zero_holds_nothing(clock: FakeClock) -> None:
    started = clock.now
    clock.now += 7.0
    assert asyncio.run(blocks.hold_to_slot(started, 0.0, clock)) == 0
    assert clock.slept == []
