"""Calls to other nodes over mTLS with this node's certificate: sub-jobs (and gossip).

One channel per peer address, reused across calls (a TLS handshake per query would cost
more than the query). Channels are rebuilt when the node's own certificate is reloaded.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any, cast

import grpc
import numpy as np

from stimnet import codec, multiplex
from stimnet.frames import feed
from stimnet.numbers import finite_number
from stimnet.pki import Identity
from stimnet.query.fields import Grid
from stimnet.signing import SignedJob
from stimnet.states import SiteState
from stimnet.v1 import federation_pb2, federation_pb2_grpc, node_pb2, node_pb2_grpc
from stimnetd.federation.fanout import SiteEventSink, Target
from stimnetd.query import partial_docs
from stimnetd.query.aggregate import Partial, layout_problem
from stimnetd.rpc import convert
from stimnetd.rpc.guard import REQUEST_ID_KEY
from stimnetd.rpc.peer_identity import PeerIdentityError, probe
from stimnetd.site import SiteOutcome
from stimnetd.site.outcome import LEAN_BYTES
from stimnetd.tls import TlsMaterial, channel_credentials

_TERMINAL = {"done", "suppressed", "refused", "failed"}
_PROGRESS = {"accepted", "running"}
# A peer's words are relayed to the researcher and stored with the job: bounded.
MAX_DETAIL_CHARS = 2000
# Log lines a peer's policy let through, relayed per sub-job (its runner caps them too).
MAX_LOG_LINES = 200
PROBE_MAX_S = 5.0
MAX_RECONNECT_BACKOFF_MS = 10_000


class PeerChannels:
    def __init__(self, material: TlsMaterial) -> None:
        self._material = material
        self._creds = channel_credentials(material)
        self._channels: dict[str, grpc.aio.Channel] = {}
        self._streams: dict[str, multiplex.SharedStream] = {}
        self._identities: dict[str, asyncio.Future[Identity]] = {}
        # Probes get threads of their own: the default executor also runs query
        # computations that can take seconds, and a gossip probe waits for no one.
        self._probes = ThreadPoolExecutor(max_workers=4, thread_name_prefix="peer-probe")
        self._closing: set[asyncio.Task[None]] = set()

    async def server_identity(self, address: str, timeout_s: float) -> Identity:
        """Who serves `address` (peer_identity.probe), learnt once per address.

        Raises TimeoutError past `timeout_s` and PeerIdentityError; a failure is not
        cached, so the next call tries again."""
        fut = self._identities.get(address)
        if fut is not None and fut.done() and not fut.cancelled() and fut.exception() is None:
            return fut.result()  # learnt: no wait_for task and timer per sub-job
        if fut is None:
            # Capped: a live node completes a handshake in milliseconds, and a probe stuck
            # on a stopped one would hold up the daemon's exit (its thread is joined).
            fut = asyncio.get_running_loop().run_in_executor(
                self._probes, probe, address, self._material, min(timeout_s, PROBE_MAX_S))
            self._identities[address] = fut

            def forget_failure(f: asyncio.Future[Identity]) -> None:
                if (f.cancelled() or f.exception() is not None) \
                        and self._identities.get(address) is f:
                    del self._identities[address]
            fut.add_done_callback(forget_failure)
        return await asyncio.wait_for(asyncio.shield(fut), timeout_s)

    def _channel(self, address: str) -> grpc.aio.Channel:
        ch = self._channels.get(address)
        if ch is None:
            ch = grpc.aio.secure_channel(address, self._creds, options=[
                ("grpc.max_receive_message_length", 16 * 1024 * 1024),
                ("grpc.keepalive_time_ms", 30_000),
                # gRPC's default backoff grows to 120 s while a peer is down; gossip
                # redials a member it sees alive again (redial), and this bounds the rest.
                ("grpc.max_reconnect_backoff_ms", MAX_RECONNECT_BACKOFF_MS)])
            self._channels[address] = ch
        return ch

    def stub(self, address: str) -> federation_pb2_grpc.FederationServiceStub:
        return federation_pb2_grpc.FederationServiceStub(self._channel(address))

    def node_stub(self, address: str) -> node_pb2_grpc.NodeServiceStub:
        return node_pb2_grpc.NodeServiceStub(self._channel(address))

    def shared_stream(self, address: str, timeout_s: float) -> multiplex.SharedStream:
        """The SubJobs stream to `address` for a sub-job of `timeout_s` (multiplex.shared)."""
        stub = self.stub(address)
        return multiplex.shared(
            self._streams, address, self._channel(address), timeout_s,
            lambda lifetime: multiplex.SharedStream(
                lambda t: stub.SubJobs(timeout=t), lifetime, call=federation_pb2.SubJobCall,
                body="start", last=_last_subjob_reply))

    def forget(self, address: str) -> None:
        """Drop what was learnt about `address` (it answered as another node: perhaps a new
        one has taken it over); the next call probes again."""
        self._identities.pop(address, None)

    def redial(self, address: str) -> None:
        """Dial `address` afresh at the next call: gossip has just seen the member there
        come back (alive after suspect, dead or left, or at a new address). The old
        channel may sit in gRPC's reconnect backoff (it grows to minutes while a peer is
        down), failing every call at once with "connection refused" although the peer is
        up again; its calls and stream, if any, were to a node that was not alive."""
        self._identities.pop(address, None)
        stream = self._streams.pop(address, None)
        if stream is not None:
            stream.retire()
        ch = self._channels.pop(address, None)
        if ch is not None:
            task = asyncio.get_running_loop().create_task(ch.close())
            self._closing.add(task)
            task.add_done_callback(self._closing.discard)

    async def reset(self, material: TlsMaterial) -> None:
        self._material = material
        self._creds = channel_credentials(material)
        await self.close()

    async def shutdown(self) -> None:
        """Close for good (the daemon is stopping): no new probes."""
        await self.close()
        self._probes.shutdown(wait=False, cancel_futures=True)

    async def close(self) -> None:
        self._identities = {}
        streams, self._streams = self._streams, {}
        for stream in streams.values():
            stream.retire()
        old, self._channels = self._channels, {}
        for ch in old.values():
            await ch.close()


class GrpcSubJobTransport:
    def __init__(self, channels: PeerChannels, entry_node: str) -> None:
        self._channels = channels
        self._entry = entry_node
        # Calls whose outcome has arrived, kept until their status does: grpc cancels a
        # call whose object is collected, and the peer would see its finished sub-job
        # cancelled.
        self._draining: set[grpc.aio.Call] = set()

    def _drain(self, call: grpc.aio.Call) -> None:
        if not call.done():
            self._draining.add(call)
            call.add_done_callback(self._draining.discard)

    async def catalog_grid(self, target: Target, catalog: str,
                           timeout_s: float) -> tuple[str, Grid | None]:
        """The peer's own grid for `catalog` (its DescribeCatalog), named by its certificate."""
        started = time.monotonic()
        who = await self._channels.server_identity(target.address, timeout_s)
        if who.role != "node" or (target.name and who.name != target.name):
            raise PeerIdentityError(f"{target.address} is served by {who.role} {who.name!r}")
        left = max(0.001, timeout_s - (time.monotonic() - started))
        desc = await self._channels.node_stub(target.address).DescribeCatalog(
            node_pb2.DescribeCatalogRequest(name=catalog), timeout=left)
        own = desc.grids[0] if desc.grids else None
        return who.name, convert.grid_of(own) if own is not None and own.shape else None

    async def run_subjob(self, target: Target, signed: SignedJob, request_id: str,
                         timeout_s: float, on_event: SiteEventSink, *,
                         small: bool = False, round_no: int = 0,
                         beta: list[float] | None = None, resume: bool = False) -> SiteOutcome:
        """`small`: the answer is small (a table query's), so the sub-job may share the
        connection's SubJobs stream with others; large answers (images, scripts) get a
        call of their own, so they hold up no one else's. `resume`: this node restarted
        while the job ran and asks the site for its share again (SubJobRequest.resume)."""
        label = target.name or target.address
        started = time.monotonic()
        # The researcher's job goes only to the node the target names (module doc of
        # peer_identity), and the manifest names sites by their certificates.
        try:
            who = await self._channels.server_identity(target.address, timeout_s)
        except TimeoutError as exc:  # the site deadline, or the probe's own cap (it says so)
            return await _ended(on_event, label, "timed_out", str(exc) or _timed_out(timeout_s))
        except PeerIdentityError as exc:
            return await _ended(on_event, label, "failed", str(exc))
        if who.role != "node" or (target.name and who.name != target.name):
            detail = (f"{target.address} is served by {who.role} {who.name!r}, not "
                      f"{'node ' + repr(target.name) if target.name else 'a node'}: the job "
                      "was not sent there")
            return await _ended(on_event, label, "failed", detail)
        reader = _SubJobReader(who.name, on_event, timeout_s)
        request = federation_pb2.SubJobRequest(job=convert.signed_job_pb(signed),
                                               entry_node=self._entry, request_id=request_id,
                                               round=round_no, beta=beta or [],
                                               resume=resume)
        left = max(0.001, timeout_s - (time.monotonic() - started))
        if small:
            outcome = await self._shared(target.address, request, left, reader)
        else:
            outcome = await self._own_call(target.address, request, left, request_id, reader)
        if outcome is not None and outcome.state == "failed" and reader.impostor:
            self._channels.forget(target.address)
        return outcome if outcome is not None else await reader.result()

    async def _own_call(self, address: str, request: federation_pb2.SubJobRequest,
                        timeout_s: float, request_id: str,
                        reader: _SubJobReader) -> SiteOutcome | None:
        call = self._channels.stub(address).RunSubJob(
            request, timeout=timeout_s, metadata=((REQUEST_ID_KEY, request_id),))
        try:
            async for ev in call:
                if (outcome := await reader.event(ev)) is not None:
                    call.cancel()
                    return outcome
                if reader.final is not None:
                    # The outcome ends the sub-job: nothing after it is read or relayed,
                    # and the answer does not wait for the stream's trailers (a further
                    # message from the peer on the query's path).
                    self._drain(call)
                    return None
        except grpc.aio.AioRpcError as exc:
            return await reader.ended(exc.code().name, exc.details() or exc.code().name)
        return await reader.ended("", "")

    async def _shared(self, address: str, request: federation_pb2.SubJobRequest,
                      timeout_s: float, reader: _SubJobReader) -> SiteOutcome | None:
        try:
            async with asyncio.timeout(timeout_s):
                sub = await self._channels.shared_stream(address, timeout_s).start(
                    request, timeout_s)
                try:
                    while (reply := await sub.next()) is not None:
                        if reply.HasField("status"):
                            return await reader.ended(reply.status.code or "UNKNOWN",
                                                      reply.status.message)
                        if (outcome := await reader.event(reply.event)) is not None:
                            return outcome
                        if reader.final is not None:
                            return None
                finally:
                    sub.close()
        except TimeoutError:
            return await reader.ended("DEADLINE_EXCEEDED", "")
        except multiplex.NotMultiplexed:
            # Every node serves SubJobs: one that answers the stream without its handshake
            # does not speak the protocol, and the sub-job was never sent to it.
            return await reader.ended("UNIMPLEMENTED", f"node {reader.site!r} does not serve "
                                      "the SubJobs stream; the sub-job was not sent")
        except grpc.aio.AioRpcError as exc:  # the stream broke (the peer went away)
            # The sub-job may have run there, and is not sent again.
            return await reader.ended(exc.code().name, exc.details() or exc.code().name)
        except multiplex.StreamBroken as exc:
            return await reader.ended("UNAVAILABLE", str(exc))
        return await reader.ended("", "")


class _SubJobReader:
    """One sub-job's events as the entry reads them, on a call of its own or a shared
    stream: relayed to the job's watchers, the answer assembled and checked."""

    def __init__(self, site: str, on_event: SiteEventSink, timeout_s: float) -> None:
        self.site = site
        self._on_event = on_event
        self._timeout_s = timeout_s
        self._asm = codec.Assembler()
        self._logs = 0
        self.final: tuple[str, str, int] | None = None
        self.impostor = False  # answered under another name

    async def event(self, ev: federation_pb2.SubJobEvent) -> SiteOutcome | None:
        """Apply one event; an outcome if it ends the sub-job as failed here."""
        site = self.site
        if ev.log_line:
            self._logs += 1
            if self._logs <= MAX_LOG_LINES:
                line = ev.log_line if len(ev.log_line) <= MAX_DETAIL_CHARS \
                    else ev.log_line[:MAX_DETAIL_CHARS] + "…"
                await self._on_event(site, "log", line, 0)
            elif self._logs == MAX_LOG_LINES + 1:
                await self._on_event(site, "log", f"(further log lines are not relayed: "
                                     f"{MAX_LOG_LINES} per site)", 0)
        if ev.HasField("partial"):
            try:
                feed(self._asm, ev.partial)
            except codec.CodecError as exc:  # a frame out of order, a hostile header
                return await _ended(self._on_event, site, "failed",
                                    f"malformed partial aggregates: {exc}")
        if not ev.HasField("site"):
            return None
        s = ev.site
        if s.site and s.site != site:
            self.impostor = True
            return await _ended(self._on_event, site, "failed", f"node {site!r} answered "
                                f"as {s.site!r}; its answer was ignored")
        if s.state not in _TERMINAL | _PROGRESS:
            return await _ended(self._on_event, site, "failed",
                                f"node {site!r} sent an unknown state {s.state[:40]!r}")
        # Relayed as they come: the job's event hub keeps each (site, state) once
        # (jobs/events.py).
        detail = s.detail if len(s.detail) <= MAX_DETAIL_CHARS \
            else s.detail[:MAX_DETAIL_CHARS] + "…"
        await self._on_event(site, s.state, detail, int(s.n))
        if s.state in _TERMINAL:
            self.final = (s.state, detail, int(s.n))
        return None

    async def ended(self, code: str, details: str) -> SiteOutcome:
        """The sub-job ended without an outcome: with a status (a gRPC code name), or
        none (`code` empty: the peer closed its stream)."""
        if not code:
            return await _ended(self._on_event, self.site, "failed",
                                "peer closed the stream without an outcome")
        if code == "DEADLINE_EXCEEDED":
            return await _ended(self._on_event, self.site, "timed_out",
                                _timed_out(self._timeout_s))
        state = "refused" if code in _REFUSED_CODES else "failed"
        return await _ended(self._on_event, self.site, state, details[:MAX_DETAIL_CHARS] or code)

    async def result(self) -> SiteOutcome:
        """The outcome of a sub-job whose terminal event has arrived."""
        assert self.final is not None
        state, detail, n = self.final
        site = self.site
        if state != "done":
            return SiteOutcome(site, cast(SiteState, state), detail)  # checked in event()
        try:
            packed = self._asm.packed()
            doc, arrays = codec.unpack_lazy(packed)
            if not isinstance(doc, dict):
                raise codec.CodecError("the answer is not an object")
            # A large share is checked partial by partial off the loop and kept packed
            # (the entry decodes it again as it combines: site/outcome.py); a small one is
            # kept decoded.
            large = arrays.dense_bytes > LEAN_BYTES
            partials = await asyncio.to_thread(_checked, doc["partials"], arrays, large) \
                if large else _checked(doc["partials"], arrays, large)
            epsilon, mechanism = doc.get("epsilon"), doc.get("mechanism")
            if not (epsilon is None or (finite_number(epsilon) and epsilon >= 0)):
                raise codec.CodecError(f"epsilon {epsilon!r} is not a non-negative number")
            delta = doc.get("delta")
            if not (delta is None or (type(delta) in (int, float) and 0 <= delta < 1)):
                raise codec.CodecError(f"delta {delta!r} is not a number in [0, 1)")
            if not (mechanism is None or isinstance(mechanism, str)):
                raise codec.CodecError(f"mechanism {mechanism!r} is not a name")
        except (codec.CodecError, KeyError) as exc:
            return await _ended(self._on_event, site, "failed",
                                f"malformed partial aggregates: {exc}")
        return SiteOutcome(site, "done", detail, n=n, partials=partials,
                           epsilon=epsilon, delta=delta, mechanism=mechanism, packed=packed)


def _checked(docs: Any, arrays: Mapping[str, np.ndarray], large: bool) -> list[Partial]:
    """A peer's partials, each checked against its layout: combining and finalising index
    by it, so a partial without it would fail the whole job with an internal error
    instead of this site. A large share's are let go as they are checked ([])."""
    kept = []
    for p in partial_docs.iter_partials(docs, arrays):
        if (problem := layout_problem(p)) is not None:
            raise codec.CodecError(f"partial {p.name[:100]!r}: {problem}")
        if not large:
            kept.append(p)
        del p
    return kept


def _last_subjob_reply(reply: federation_pb2.SubJobReply) -> bool:
    return reply.event.HasField("site") and reply.event.site.state in _TERMINAL


_REFUSED_CODES = frozenset({"UNAUTHENTICATED", "PERMISSION_DENIED", "FAILED_PRECONDITION",
                            "NOT_FOUND", "INVALID_ARGUMENT", "RESOURCE_EXHAUSTED"})


def _timed_out(timeout_s: float) -> str:
    return f"no answer within the {timeout_s:g}s site deadline"


async def _ended(on_event: SiteEventSink, site: str, state: str, detail: str) -> SiteOutcome:
    """A site's outcome decided here, not by the peer: its watchers hear it too."""
    await on_event(site, state, detail, 0)
    return SiteOutcome(site, cast(SiteState, state), detail)
