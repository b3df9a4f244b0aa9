"""FederationService: node-to-node sub-jobs and SWIM gossip. Node certificates only."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from stimnet.v1 import common_pb2, federation_pb2, federation_pb2_grpc
from stimnetd import codec
from stimnetd.errors import InvalidRequest
from stimnetd.federation.subjob import SubJobHandler
from stimnetd.rpc import convert
from stimnetd.rpc.frames import to_frames
from stimnetd.rpc.guard import current_caller


class FederationServicer(federation_pb2_grpc.FederationServiceServicer):
    def __init__(self, site: str, subjobs: SubJobHandler, gossip: Any = None) -> None:
        self._site = site
        self._subjobs = subjobs
        self._gossip = gossip

    async def RunSubJob(self, request: federation_pb2.SubJobRequest,
                        context: Any) -> AsyncIterator[federation_pb2.SubJobEvent]:
        if not request.HasField("job"):
            raise InvalidRequest("RunSubJob needs a signed job")
        caller = current_caller()
        async for ev in self._subjobs.run(convert.signed_job(request.job), caller.identity,
                                          request.request_id or caller.request_id):
            if ev.outcome is not None:
                docs, arrays = codec.partials_to_doc(ev.outcome.partials)
                doc = {"partials": docs, "epsilon": ev.outcome.epsilon,
                       "mechanism": ev.outcome.mechanism}
                for frame in to_frames(doc, arrays):
                    yield federation_pb2.SubJobEvent(partial=frame)
            yield federation_pb2.SubJobEvent(site=common_pb2.SiteEvent(
                site=self._site, state=ev.state, detail=ev.detail, n=max(0, ev.n)))
