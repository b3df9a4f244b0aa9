"""SWIM over the FederationService: the gossip Transport on gRPC/mTLS, and wire mapping."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import grpc

from stimnet.v1 import federation_pb2
from stimnetd.gossip.membership import Member
from stimnetd.gossip.transport import FullState, PeerUnreachable, ProbeMessage
from stimnetd.rpc.peer_client import PeerChannels
from stimnetd.rpc.peer_identity import PeerIdentityError

MAX_ENTRIES = 4096


def to_wire(sender: Member, entries: Iterable[Member]) -> federation_pb2.GossipMessage:
    # The wire carries one entry per sender (the receiver refuses more): a piggybacked
    # older broadcast about the sender itself is superseded by `sender` and dropped.
    entries = [sender, *(m for m in entries if m.name != sender.name)]
    return federation_pb2.GossipMessage(
        sender=sender.name, sender_incarnation=sender.incarnation,
        members=[federation_pb2.MemberState(
            name=m.name, address=m.address, incarnation=m.incarnation, status=m.status,
            last_heard=m.last_heard,
            catalogs=[federation_pb2.CatalogRef(name=c, schema_version=v) for c, v in m.catalogs])
            for m in entries])


def from_wire(msg: federation_pb2.GossipMessage) -> list[Member]:
    # Bounded before any object is built; the Swim layer validates everything else
    # (status, incarnation jumps, name lengths) and raises InvalidGossip.
    if len(msg.members) > MAX_ENTRIES:
        from stimnetd.gossip.membership import InvalidGossip

        raise InvalidGossip(f"gossip message has {len(msg.members)} entries; limit {MAX_ENTRIES}")
    return [Member(name=m.name, address=m.address, incarnation=int(m.incarnation),
                   status=m.status, last_heard=0.0,  # receivers ignore remote clocks
                   catalogs=tuple((c.name, int(c.schema_version)) for c in m.catalogs))
            for m in msg.members]


class GrpcGossipTransport:
    def __init__(self, channels: PeerChannels) -> None:
        self._channels = channels

    async def ping(self, address: str, msg: ProbeMessage, timeout: float) -> ProbeMessage:  # noqa: ASYNC109
        reply = await self._call(address, "Ping", to_wire(msg.source, msg.entries()), timeout)
        await self._check_sender(address, reply.sender, timeout)
        return ProbeMessage.from_entries(reply.sender, from_wire(reply))

    async def ping_req(self, via_address: str, target_name: str, target_address: str,  # noqa: PLR0913
                       msg: ProbeMessage, timeout: float) -> bool:  # noqa: ASYNC109
        req = federation_pb2.PingReqRequest(message=to_wire(msg.source, msg.entries()),
                                            target_name=target_name, target_address=target_address)
        reply = await self._call(via_address, "PingReq", req, timeout)
        return bool(reply.ack)

    async def push_pull(self, address: str, state: FullState, timeout: float) -> FullState:  # noqa: ASYNC109
        reply = await self._call(address, "PushPull", to_wire(state.source, state.entries()),
                                 timeout)
        await self._check_sender(address, reply.sender, timeout)
        return FullState.from_entries(reply.sender, from_wire(reply))

    async def _check_sender(self, address: str, sender: str, timeout: float) -> None:  # noqa: ASYNC109
        """A reply speaks for the node whose certificate serves `address`, and no other
        (the server side checks callers the same way: FederationServicer._sender)."""
        try:
            who = await self._channels.server_identity(address, timeout)
        except (TimeoutError, PeerIdentityError) as exc:
            raise PeerUnreachable(f"{address}: {exc}") from None
        except Exception as exc:  # noqa: BLE001 - as in _call: any failure is "unreachable"
            raise PeerUnreachable(f"{address}: {exc}") from None
        if sender != who.name:
            self._channels.forget(address)  # if another node now serves it, learn that next
            raise PeerUnreachable(f"{address} is node {who.name!r} but its reply claims to be "
                                  f"from {sender!r}")

    async def _call(self, address: str, method: str, request: object, timeout: float):  # type: ignore[no-untyped-def]  # noqa: ASYNC109
        stub = self._channels.stub(address)
        try:
            return await getattr(stub, method)(request, timeout=timeout)
        except grpc.aio.AioRpcError as exc:
            raise PeerUnreachable(f"{address}: {exc.code().name}: {exc.details()}") from None
        except Exception as exc:  # noqa: BLE001 - any failure is "unreachable" to SWIM
            raise PeerUnreachable(f"{address}: {exc}") from None


class StoreMembers:
    """Gossip membership persisted in the node's store (restored on restart)."""

    def __init__(self, store) -> None:  # type: ignore[no-untyped-def]
        self._store = store

    async def load(self) -> list[Member]:
        return [Member(r.name, r.address, r.incarnation, r.status, r.last_heard, r.catalogs)
                for r in await self._store.load_members()]

    async def save(self, members: Sequence[Member]) -> None:
        from stimnetd.store.records import MemberRecord

        await self._store.save_members([MemberRecord(m.name, m.address, m.incarnation, m.status,
                                                     m.last_heard, tuple(m.catalogs))
                                        for m in members])
