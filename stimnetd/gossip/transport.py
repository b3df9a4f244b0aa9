"""What SWIM nodes send each other, and the outbound calls that carry it.

The gRPC adapter (`stimnetd/rpc/gossip_transport.py`) implements `Transport`; the
simulator (`sim.py`) implements it in memory.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from stimnetd.gossip.membership import InvalidGossip, Member


def split_source(sender: str, entries: Sequence[Member]) -> tuple[Member, tuple[Member, ...]]:
    """For wire formats that send the sender's own entry among the others (the proto's
    `GossipMessage.members`): separate it out, refusing a message without exactly one."""
    own = [m for m in entries if isinstance(m, Member) and m.name == sender]
    if len(own) != 1:
        raise InvalidGossip("message must carry exactly one entry for its sender")
    return own[0], tuple(m for m in entries if m is not own[0])


@dataclass(frozen=True)
class ProbeMessage:
    """Ping, ack and ping-req payload: the sender's own entry plus piggybacked updates."""

    source: Member
    updates: tuple[Member, ...] = ()

    def entries(self) -> tuple[Member, ...]:
        return (self.source, *self.updates)

    @classmethod
    def from_entries(cls, sender: str, entries: Sequence[Member]) -> ProbeMessage:
        source, updates = split_source(sender, entries)
        return cls(source, updates)


@dataclass(frozen=True)
class FullState:
    """Push-pull payload: the sender's own entry plus what it knows about others.

    A request carries the full table; a reply carries only the entries the requester
    lacks or has older versions of (it just told us its full view).
    """

    source: Member
    members: tuple[Member, ...] = ()

    def entries(self) -> tuple[Member, ...]:
        return (self.source, *self.members)

    @classmethod
    def from_entries(cls, sender: str, entries: Sequence[Member]) -> FullState:
        source, members = split_source(sender, entries)
        return cls(source, members)


class PeerUnreachable(Exception):
    """An outbound call failed: timeout, connection error, or the peer refused it."""


class Transport(Protocol):
    """Outbound calls. Each raises `PeerUnreachable` on any failure, including a remote
    error status. The adapter must also check that the server certificate's name equals
    the reply's `source.name` (raising `ForgedSender` otherwise).

    `timeout` is an argument rather than the caller's `asyncio.timeout` (hence the ASYNC109
    waivers) because it becomes the RPC deadline, which gRPC propagates to the server.
    """

    async def ping(
        self, address: str, msg: ProbeMessage, timeout: float,  # noqa: ASYNC109
    ) -> ProbeMessage: ...

    async def ping_req(
        self, via_address: str, target_name: str, target_address: str,
        msg: ProbeMessage, timeout: float,  # noqa: ASYNC109
    ) -> bool: ...

    async def push_pull(
        self, address: str, state: FullState, timeout: float,  # noqa: ASYNC109
    ) -> FullState: ...
