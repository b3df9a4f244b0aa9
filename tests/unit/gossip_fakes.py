"""Test doubles for one SWIM node: a hand-moved clock, a transport that answers from a
table, and member/node factories."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Callable

from stimnetd.gossip.clock import Clock
from stimnetd.gossip.config import GossipConfig
from stimnetd.gossip.membership import InMemoryMemberStore, Member
from stimnetd.gossip.swim import Swim
from stimnetd.gossip.transport import FullState, PeerUnreachable, ProbeMessage

EPOCH = 1_767_225_600.0


class ManualClock:
    def __init__(self) -> None:
        self.now = 0.0

    def time(self) -> float:
        return EPOCH + self.now

    def monotonic(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(0)


class ScriptedTransport:
    """Answers pings from a table of address -> reply function; anything else is unreachable."""

    def __init__(self) -> None:
        self.pings: dict[str, Callable[[ProbeMessage], ProbeMessage]] = {}
        self.sent: list[tuple[str, str]] = []

    # ASYNC109 waived: `Transport` takes the deadline as an argument (see its docstring).
    async def ping(
        self, address: str, msg: ProbeMessage, timeout: float,  # noqa: ASYNC109
    ) -> ProbeMessage:
        self.sent.append(("ping", address))
        if address not in self.pings:
            raise PeerUnreachable(address)
        return self.pings[address](msg)

    async def ping_req(
        self, via_address: str, target_name: str, target_address: str,
        msg: ProbeMessage, timeout: float,  # noqa: ASYNC109
    ) -> bool:
        self.sent.append(("ping_req", via_address))
        raise PeerUnreachable(via_address)

    async def push_pull(
        self, address: str, state: FullState, timeout: float,  # noqa: ASYNC109
    ) -> FullState:
        self.sent.append(("push_pull", address))
        raise PeerUnreachable(address)


def m(name: str, inc: int = 0, status: str = "alive",
      catalogs: tuple[tuple[str, int], ...] = ()) -> Member:
    return Member(name, f"{name}:7443", inc, status, EPOCH, catalogs)  # type: ignore[arg-type]


def node(name: str = "a", inc: int = 0, *, config: GossipConfig | None = None,
         transport: ScriptedTransport | None = None, store: InMemoryMemberStore | None = None,
         catalogs: tuple[tuple[str, int], ...] = (), clock: Clock | None = None) -> Swim:
    return Swim(m(name, inc, catalogs=catalogs), [], transport or ScriptedTransport(),
                store=store or InMemoryMemberStore(), clock=clock or ManualClock(),
                rng=random.Random(7), config=config)
