"""FederationService: node-to-node sub-jobs and SWIM gossip. Node certificates only."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

from stimnet.errors import InvalidRequest, Unavailable
from stimnet.frames import packed_frames, to_frames
from stimnet.v1 import common_pb2, federation_pb2, federation_pb2_grpc
from stimnetd.federation.subjob import LogLine, PeerSubJobs
from stimnetd.gossip.membership import ForgedSender
from stimnetd.gossip.swim import FullState, ProbeMessage, Swim
from stimnetd.query import partial_docs
from stimnetd.rpc import convert, multiplex
from stimnetd.rpc.gossip_transport import from_wire, to_wire
from stimnetd.rpc.guard import Caller, Guard, current_caller
from stimnetd.site import SiteOutcome


class FederationServicer(federation_pb2_grpc.FederationServiceServicer):
    def __init__(self, site: str, subjobs: PeerSubJobs, guard: Guard,
                 gossip: Callable[[], Swim | None] = lambda: None) -> None:
        self._site = site
        self._guard = guard
        self._subjobs = subjobs
        # A getter: membership starts after the server has bound its port.
        self._gossip = gossip

    async def RunSubJob(self, request: federation_pb2.SubJobRequest,
                        context: Any) -> AsyncIterator[federation_pb2.SubJobEvent]:
        async for ev in self._events(request, current_caller()):
            yield ev

    async def SubJobs(self, request_iterator: AsyncIterator[federation_pb2.SubJobCall],
                      context: Any) -> AsyncIterator[federation_pb2.SubJobReply]:
        """Sub-jobs multiplexed on one stream (rpc/multiplex.py), each as a RunSubJob call."""
        async for reply in multiplex.serve(
                request_iterator, context, self._guard, _RUN_SUBJOB, body="start",
                reply=federation_pb2.SubJobReply,
                request_id=lambda request: request.request_id[:64],
                run=self._events):
            yield reply

    async def _events(self, request: federation_pb2.SubJobRequest,
                      caller: Caller) -> AsyncIterator[federation_pb2.SubJobEvent]:
        if not request.HasField("job"):
            raise InvalidRequest("RunSubJob needs a signed job")
        # The entry's request id goes into this site's audit log: bounded as the guard
        # bounds the one in the call's metadata.
        request_id = request.request_id[:64] or caller.request_id
        async for ev in self._subjobs.run(convert.signed_job(request.job), caller.identity,
                                          request_id, round_no=request.round,
                                          beta=list(request.beta), resume=request.resume):
            if isinstance(ev, LogLine):
                yield federation_pb2.SubJobEvent(log_line=ev.line)
                continue
            site = common_pb2.SiteEvent(site=self._site, state=ev.state, detail=ev.detail,
                                        n=max(0, ev.n))
            if not isinstance(ev, SiteOutcome):  # progress
                yield federation_pb2.SubJobEvent(site=site)
                continue
            frames = list(_outcome_frames(ev))
            for frame in frames[:-1]:
                yield federation_pb2.SubJobEvent(partial=frame)
            # The outcome's last frame and its final event: one message for a small result.
            yield federation_pb2.SubJobEvent(partial=frames[-1], site=site)

    # -- SWIM ----------------------------------------------------------------------------

    def _swim(self) -> Swim:
        swim = self._gossip()
        if swim is None:
            raise Unavailable("gossip is disabled on this node")
        return swim

    def _sender(self, msg: federation_pb2.GossipMessage) -> str:
        caller = current_caller()
        if msg.sender != caller.name:
            # The claimed sender must be the certificate's node: no speaking for others.
            raise ForgedSender(f"gossip sender {msg.sender!r} differs from the caller's "
                               f"certificate name {caller.name!r}")
        return caller.name

    async def Ping(self, request: federation_pb2.GossipMessage,
                   context: Any) -> federation_pb2.GossipMessage:
        swim = self._swim()
        sender = self._sender(request)
        reply = await swim.handle_ping(sender, ProbeMessage.from_entries(sender, from_wire(request)))
        return to_wire(reply.source, reply.entries())

    async def PingReq(self, request: federation_pb2.PingReqRequest,
                      context: Any) -> federation_pb2.PingReqResponse:
        swim = self._swim()
        sender = self._sender(request.message)
        ack = await swim.handle_ping_req(sender, request.target_name, request.target_address,
                                         ProbeMessage.from_entries(sender,
                                                                   from_wire(request.message)))
        return federation_pb2.PingReqResponse(ack=ack)

    async def PushPull(self, request: federation_pb2.GossipMessage,
                       context: Any) -> federation_pb2.GossipMessage:
        swim = self._swim()
        sender = self._sender(request)
        reply = await swim.handle_push_pull(sender, FullState.from_entries(sender, from_wire(request)))
        return to_wire(reply.source, reply.entries())


_RUN_SUBJOB = "/stimnet.v1.FederationService/RunSubJob"


def _outcome_frames(outcome: SiteOutcome) -> Iterator[common_pb2.ResultFrame]:
    """A site's partials as the entry reads them: {"partials", "epsilon", "mechanism"}."""
    if outcome.packed is not None:
        return packed_frames(outcome.packed)  # the stored release, as it is
    docs, arrays = partial_docs.partials_to_doc(outcome.partials)
    return to_frames({"partials": docs, "epsilon": outcome.epsilon, "delta": outcome.delta,
                      "mechanism": outcome.mechanism}, arrays)
