"""Calls to other nodes over mTLS with this node's certificate: sub-jobs (and gossip).

One channel per peer address, reused across calls (a TLS handshake per query would cost
more than the query). Channels are rebuilt when the node's own certificate is reloaded.
"""

from __future__ import annotations

import grpc

from stimnet.v1 import federation_pb2, federation_pb2_grpc
from stimnetd import codec
from stimnetd.federation.fanout import SiteEventSink, Target
from stimnetd.jobs.signing import SignedJob
from stimnetd.jobs.site import SiteOutcome
from stimnetd.rpc import convert
from stimnetd.rpc.frames import feed
from stimnetd.rpc.guard import REQUEST_ID_KEY
from stimnetd.tls import TlsMaterial, channel_credentials

_TERMINAL = {"done", "suppressed", "refused", "failed"}


class PeerChannels:
    def __init__(self, material: TlsMaterial) -> None:
        self._creds = channel_credentials(material)
        self._channels: dict[str, grpc.aio.Channel] = {}

    def stub(self, address: str) -> federation_pb2_grpc.FederationServiceStub:
        ch = self._channels.get(address)
        if ch is None:
            ch = grpc.aio.secure_channel(address, self._creds, options=[
                ("grpc.max_receive_message_length", 16 * 1024 * 1024),
                ("grpc.keepalive_time_ms", 30_000)])
            self._channels[address] = ch
        return federation_pb2_grpc.FederationServiceStub(ch)

    async def reset(self, material: TlsMaterial) -> None:
        self._creds = channel_credentials(material)
        await self.close()

    async def close(self) -> None:
        old, self._channels = self._channels, {}
        for ch in old.values():
            await ch.close()


class GrpcSubJobTransport:
    def __init__(self, channels: PeerChannels, entry_node: str) -> None:
        self._channels = channels
        self._entry = entry_node

    async def run_subjob(self, target: Target, signed: SignedJob, request_id: str,
                         timeout_s: float, on_event: SiteEventSink) -> SiteOutcome:
        stub = self._channels.stub(target.address)
        label = target.name or target.address
        asm = codec.Assembler()
        final: tuple[str, str, int] | None = None
        site = label
        try:
            call = stub.RunSubJob(
                federation_pb2.SubJobRequest(job=convert.signed_job_pb(signed),
                                             entry_node=self._entry, request_id=request_id),
                timeout=timeout_s, metadata=((REQUEST_ID_KEY, request_id),))
            async for ev in call:
                if ev.HasField("partial"):
                    feed(asm, ev.partial)
                if ev.HasField("site"):
                    s = ev.site
                    site = s.site or label
                    await on_event(site, s.state, s.detail, int(s.n))
                    if s.state in _TERMINAL:
                        final = (s.state, s.detail, int(s.n))
        except grpc.aio.AioRpcError as exc:
            if exc.code() == grpc.StatusCode.DEADLINE_EXCEEDED:
                return SiteOutcome(site, "timed_out",
                                   f"no answer within the {timeout_s:g}s site deadline")
            state = "refused" if exc.code() in (
                grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED,
                grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.NOT_FOUND,
                grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.RESOURCE_EXHAUSTED) else "failed"
            detail = exc.details() or exc.code().name
            await on_event(site, state, detail, 0)
            return SiteOutcome(site, state, detail)
        if final is None:
            return SiteOutcome(site, "failed", "peer closed the stream without an outcome")
        state, detail, n = final
        if state != "done":
            return SiteOutcome(site, state, detail)
        try:
            doc, arrays = asm.result()
            partials = codec.partials_from_doc(doc["partials"], arrays)
        except (codec.CodecError, KeyError) as exc:
            return SiteOutcome(site, "failed", f"malformed partial aggregates: {exc}")
        return SiteOutcome(site, "done", detail, n=n, partials=partials,
                           epsilon=doc.get("epsilon"), mechanism=doc.get("mechanism"))
