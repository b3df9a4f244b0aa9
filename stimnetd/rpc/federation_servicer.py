"""FederationService: node-to-node sub-jobs and SWIM gossip. Node certificates only."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

from stimnet.v1 import common_pb2, federation_pb2, federation_pb2_grpc
from stimnetd import codec
from stimnetd.errors import InvalidRequest, Unavailable
from stimnetd.federation.subjob import SubJobHandler
from stimnetd.gossip.membership import ForgedSender
from stimnetd.gossip.swim import FullState, ProbeMessage
from stimnetd.jobs.site import SiteOutcome
from stimnetd.rpc import convert
from stimnetd.rpc.frames import packed_frames, to_frames
from stimnetd.rpc.gossip_transport import from_wire, to_wire
from stimnetd.rpc.guard import Caller, Guard, SubcallEnded, current_caller
from stimnetd.rpc.peer_client import SHARED_STREAM_KEY


class FederationServicer(federation_pb2_grpc.FederationServiceServicer):
    def __init__(self, site: str, subjobs: SubJobHandler, guard: Guard,
                 gossip: Callable[[], Any] = lambda: None) -> None:
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
        """Sub-jobs multiplexed on one stream: each runs as its own task, as a RunSubJob
        call would (Guard.subcall), and its events go out tagged with its id. The stream
        ends once the entry has stopped writing and every sub-job on it has ended."""
        await context.send_initial_metadata(((SHARED_STREAM_KEY, "1"),))
        replies: asyncio.Queue[federation_pb2.SubJobReply | None] = asyncio.Queue()
        running: dict[int, asyncio.Task[None]] = {}

        async def one(call: federation_pb2.SubJobCall) -> None:
            try:
                async with asyncio.timeout(call.timeout_s):
                    async for ev in self._guard.subcall(
                            _RUN_SUBJOB, context, call.start.request_id[:64] or
                            f"{current_caller().request_id}.{call.id}",
                            lambda caller: self._events(call.start, caller)):
                        replies.put_nowait(federation_pb2.SubJobReply(id=call.id, event=ev))
            except SubcallEnded as ended:
                replies.put_nowait(_status(call.id, ended.code, ended.message))
            except TimeoutError:
                replies.put_nowait(_status(call.id, "DEADLINE_EXCEEDED",
                                           f"sub-job {call.id} ran past its {call.timeout_s:g}s "
                                           "deadline"))
            finally:
                running.pop(call.id, None)

        async def read() -> None:
            try:
                async for call in request_iterator:
                    if call.cancel:
                        if (task := running.get(call.id)) is not None:
                            task.cancel()
                        continue
                    if problem := _call_problem(call, running):
                        replies.put_nowait(_status(call.id, "INVALID_ARGUMENT", problem))
                        continue
                    running[call.id] = asyncio.create_task(one(call), name=f"subjob-{call.id}")
                if running:
                    await asyncio.wait(list(running.values()))
            finally:
                replies.put_nowait(None)

        reader = asyncio.create_task(read())
        try:
            while (reply := await replies.get()) is not None:
                yield reply
            await reader  # a broken request stream ends this one with its error
        finally:
            reader.cancel()
            for task in list(running.values()):
                task.cancel()

    async def _events(self, request: federation_pb2.SubJobRequest,
                      caller: Caller) -> AsyncIterator[federation_pb2.SubJobEvent]:
        if not request.HasField("job"):
            raise InvalidRequest("RunSubJob needs a signed job")
        # The entry's request id goes into this site's audit log: bounded as the guard
        # bounds the one in the call's metadata.
        request_id = request.request_id[:64] or caller.request_id
        async for ev in self._subjobs.run(convert.signed_job(request.job), caller.identity,
                                          request_id):
            if ev.state == "log":  # not a state of the site: a line for the researcher
                yield federation_pb2.SubJobEvent(log_line=ev.detail)
                continue
            site = common_pb2.SiteEvent(site=self._site, state=ev.state, detail=ev.detail,
                                        n=max(0, ev.n))
            if ev.outcome is None:
                yield federation_pb2.SubJobEvent(site=site)
                continue
            frames = list(_outcome_frames(ev.outcome))
            for frame in frames[:-1]:
                yield federation_pb2.SubJobEvent(partial=frame)
            # The outcome's last frame and its final event: one message for a small result.
            yield federation_pb2.SubJobEvent(partial=frames[-1], site=site)

    # -- SWIM ----------------------------------------------------------------------------

    def _swim(self):  # type: ignore[no-untyped-def]
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
# A sub-job's deadline on SubJobs is the entry's to choose, within reason.
MAX_SUBJOB_TIMEOUT_S = 24 * 3600.0


def _call_problem(call: federation_pb2.SubJobCall, running: dict[int, Any]) -> str | None:
    if not call.HasField("start"):
        return f"sub-job {call.id}: a call needs `start` or `cancel`"
    if call.id in running:
        return f"sub-job {call.id} is already running on this stream"
    if not 0 < call.timeout_s <= MAX_SUBJOB_TIMEOUT_S:  # NaN fails too
        return (f"sub-job {call.id}: timeout_s {call.timeout_s!r} is not within "
                f"(0, {MAX_SUBJOB_TIMEOUT_S:g}] seconds")
    return None


def _status(call_id: int, code: str, message: str) -> federation_pb2.SubJobReply:
    return federation_pb2.SubJobReply(id=call_id, status=federation_pb2.SubJobStatus(
        code=code, message=message))


def _outcome_frames(outcome: SiteOutcome) -> Iterator[common_pb2.ResultFrame]:
    """A site's partials as the entry reads them: {"partials", "epsilon", "mechanism"}."""
    if outcome.packed is not None:
        return packed_frames(outcome.packed)  # the stored release, as it is
    docs, arrays = codec.partials_to_doc(outcome.partials)
    return to_frames({"partials": docs, "epsilon": outcome.epsilon,
                      "mechanism": outcome.mechanism}, arrays)
