"""`AsyncClient`: a node's services for asyncio code, every call with a deadline.

A query (`query`) runs on this client's one Session stream: on it a question is one
message each way instead of a call of its own, which a notebook asking many saves on each.
`submit`, `watch` and the rest are calls. Errors are the classes of `stimnet.errors`
(`errors.translated`).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
from collections.abc import AsyncGenerator, AsyncIterator
from pathlib import Path
from typing import Any

import grpc

from stimctl.client.config import ClientConfig
from stimctl.client.errors import deadline_exceeded, from_call_status, translated
from stimctl.client.events import Event, OnEvent, follow, job_events
from stimctl.client.job_requests import new_request, query_spec
from stimctl.results import QueryAnswer
from stimnet import codec, convert, multiplex, signing
from stimnet.errors import (
    ConfigProblem,
    ConnectionFailed,
    DeadlineExceeded,
    HandshakeLimited,
    InvalidRequest,
    StimnetError,
)
from stimnet.frames import feed
from stimnet.states import TERMINAL_STATES, UNFINISHED_STATES
from stimnet.v1 import admin_pb2, admin_pb2_grpc, jobs_pb2, jobs_pb2_grpc, node_pb2, node_pb2_grpc

# How long close() waits for calls whose final event has come to end with their status.
DRAIN_S = 2.0
# A watch that lost its node waits this long before following the job again.
RECONNECT_S = 0.5
# A node that restarts is usually back within seconds: the channel retries connecting at
# least every 2 s (grpc's default backs off to 120 s), so neither a watch waiting for it
# nor the next call lags long behind its return.
CHANNEL_OPTIONS = (("grpc.initial_reconnect_backoff_ms", 250),
                   ("grpc.max_reconnect_backoff_ms", 2000))


class AsyncClient:
    """One node's services over one mutual-TLS channel.

    Args:
        config: the node's address and the caller's files (`ClientConfig.load`).
    """

    def __init__(self, config: ClientConfig) -> None:
        self.config = config
        self.address = config.address
        self._channel = grpc.aio.secure_channel(config.address, config.credentials(),
                                                options=CHANNEL_OPTIONS)
        self.node = node_pb2_grpc.NodeServiceStub(self._channel)
        self.jobs = jobs_pb2_grpc.JobServiceStub(self._channel)
        self.admin = admin_pb2_grpc.AdminServiceStub(self._channel)
        # Calls whose last event has arrived, read to their status in the background:
        # grpc cancels a call whose object is collected (the node would log a finished
        # RPC as cancelled), and one still open when the event loop closes breaks grpc's
        # next loop in this process (stimctl runs one per command).
        self._draining: set[asyncio.Task[None]] = set()
        self._entry: str | None = None
        self._sessions: dict[str, multiplex.SharedStream] = {}
        self._files: dict[Path, tuple[tuple[int, int, int], bytes]] = {}

    @classmethod
    def from_file(cls, path: Path | str | None = None) -> AsyncClient:
        """A client configured by a client TOML file.

        Args:
            path: the file; by default ``~/.config/stimnet/client.toml``.
        """
        return cls(ClientConfig.load(path))

    async def close(self) -> None:
        """End the Session stream and the channel, letting finished calls end first."""
        for session in self._sessions.values():
            await session.aclose(DRAIN_S)
        if self._draining:
            # Their ends are a hop behind their final states: let them land (a node that
            # holds a stream open is cut off by the channel's close after this).
            _, late = await asyncio.wait(self._draining, timeout=DRAIN_S)
            for task in late:
                task.cancel()
        await self._channel.close()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def _call(self, rpc: Any, request: Any, timeout: float | None = None) -> Any:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + (timeout or self.config.timeout_s)
        try:
            with translated(self.address):
                return await rpc(request, timeout=timeout or self.config.timeout_s)
        except HandshakeLimited as busy:
            # The call never reached the node (no connection), so it is safe to send
            # again: wait_for_ready waits out grpc's reconnect backoff (about 1 s, then
            # x1.6 with jitter) and each reconnect attempt, within what is left of the
            # deadline. Past it, the limit is still what the caller should read.
            left = deadline - loop.time()
            if left <= 0:
                raise
            try:
                with translated(self.address):
                    return await rpc(request, timeout=left, wait_for_ready=True)
            except HandshakeLimited:
                raise busy from None
            except DeadlineExceeded:
                # Connected but not answered in time: that is the node's deadline.
                if self._channel.get_state() is grpc.ChannelConnectivity.READY:
                    raise
                raise busy from None

    async def _stream(self, rpc: Any, request: Any, timeout: float | None) -> AsyncIterator[Any]:
        with translated(self.address):
            async for item in rpc(request, timeout=timeout):
                yield item

    # -- node ------------------------------------------------------------------------

    async def info(self) -> node_pb2.NodeInfo:
        """Who the node is, who it sees calling, and its policies (k_min, DP, scripts)."""
        return await self._call(self.node.GetInfo, node_pb2.GetInfoRequest())

    async def entry_node(self) -> str:
        """The name of the node this client talks to, which every job it signs names: the
        sites answer a relayed job only from that node. Asked once per client. A node that
        misreports its name gains nothing: each site compares the name with the relaying
        node's certificate, so a job signed for the wrong name is refused everywhere."""
        if self._entry is None:
            self._entry = (await self.info()).name
        return self._entry

    async def catalogs(self, *, federated: bool = False) -> list[node_pb2.CatalogSummary]:
        """The catalogs this node holds, or every member's.

        Args:
            federated: include the catalogs of every member the node knows of.
        """
        resp = await self._call(self.node.ListCatalogs,
                                node_pb2.ListCatalogsRequest(federated=federated))
        return list(resp.catalogs)

    async def describe(self, name: str, *,
                       federated: bool = True) -> node_pb2.CatalogDescription:
        """A catalog's tables, fields (types, units, bounds, levels), images and ROIs, and
        each site's image grid (`grids`: declared or taken from its images).

        Args:
            name: the catalog, e.g. ``"dbs_outcomes"``.
            federated: ask every peer holding the catalog for its grid too (the entry
                asks each under a 5 s deadline); False: this node's grid only.
        """
        return await self._call(self.node.DescribeCatalog, node_pb2.DescribeCatalogRequest(
            name=name, federated=federated))

    async def peers(self) -> list[node_pb2.Peer]:
        """The federation's members as this node's membership sees them."""
        return list((await self._call(self.node.ListPeers, node_pb2.ListPeersRequest())).peers)

    async def status(self) -> node_pb2.NodeStatus:
        """The node's summary: uptime, peers, jobs by state, budget spent (admins)."""
        return await self._call(self.node.GetStatus, node_pb2.GetStatusRequest())

    # -- admin -----------------------------------------------------------------------

    async def audit_verify(self) -> admin_pb2.VerifyAuditResponse:
        """Check the audit log's hash chain; the first broken entry if any (admins)."""
        return await self._call(self.admin.VerifyAudit, admin_pb2.VerifyAuditRequest())

    async def audit_export(self, since: float = 0.0) -> AsyncIterator[admin_pb2.AuditEntry]:
        """The audit log's entries, oldest first (admins).

        Args:
            since: only entries written at or after this unix time.
        """
        async for e in self._stream(self.admin.ExportAudit,
                                    admin_pb2.ExportAuditRequest(since=since),
                                    self.config.timeout_s * 10):
            yield e

    # -- jobs ----------------------------------------------------------------------------

    def sign(self, request: signing.JobRequest, script: bytes | None = None) -> signing.SignedJob:
        """Sign a job request with the caller's key, as the files are now.

        Args:
            request: the job (`stimnet.signing.new_request`).
            script: a script job's source, whose SHA-256 the request carries.

        Raises:
            ConfigProblem: the key or certificate cannot be read.
        """
        try:
            key, cert = self._file(self.config.key), self._file(self.config.cert)
        except OSError as exc:
            raise ConfigProblem(f"cannot read {exc.filename}: {exc.strerror}") from None
        return signing.sign(request, key, cert, script)

    def _file(self, path: Path) -> bytes:
        """A key or certificate file as it is now: read again only when it changed (a
        renewal is picked up by the next job), not for every job."""
        st = path.stat()
        stamp = (st.st_mtime_ns, st.st_size, st.st_ino)
        hit = self._files.get(path)
        if hit is None or hit[0] != stamp:
            hit = self._files[path] = (stamp, path.read_bytes())
        return hit[1]

    async def submit(self, signed: signing.SignedJob) -> jobs_pb2.Job:
        """Submit a signed job; the job as the node recorded it (follow it with `watch`).

        Args:
            signed: the job, signed (`sign`).
        """
        return await self._call(self.jobs.SubmitJob,
                                jobs_pb2.SubmitJobRequest(job=convert.signed_job_pb(signed)))

    async def submit_query(self, query: str | dict[str, Any], *, federated: bool = False,
                           epsilon: float | None = None, min_sites: int = 1) -> jobs_pb2.Job:
        """Sign a query job and submit it, without waiting for its answer.

        Args:
            query: restricted SQL, or a spec dict.
            federated: fan out to every site holding the catalog.
            epsilon: request differential privacy with this ε.
            min_sites: the job fails unless this many sites contribute.

        Raises:
            InvalidRequest: the query or its options are refused before sending.
        """
        return await self.submit(self.sign(await self._query_request(query, federated, epsilon,
                                                                     min_sites)))

    async def _query_request(self, query: str | dict[str, Any], federated: bool,
                             epsilon: float | None, min_sites: int) -> signing.JobRequest:
        spec = query_spec(query, "query")
        return new_request("query", spec.catalog, entry=await self.entry_node(),
                           scope="federated" if federated else "local",
                           spec=spec.to_dict(), epsilon=epsilon, min_sites=min_sites)

    async def submit_script(self, script: bytes, catalog: str, *, federated: bool = False,
                            epsilon: float | None = None, min_sites: int = 1,
                            outputs: str | dict[str, Any] | None = None) -> jobs_pb2.Job:
        """Sign a script job (its SHA-256 is in the signed payload) and submit it.

        Args:
            script: the Python source run in each site's sandbox.
            catalog: the catalog it runs on.
            federated: run it at every site holding the catalog.
            epsilon: request differential privacy with this ε.
            min_sites: the job fails unless this many sites contribute.
            outputs: what the script emits, in the query language — SQL such as
                ``"SELECT count(*) AS n, avg(age) AS mean_age FROM c GROUP BY sex"`` (no
                WHERE) or the equivalent spec — signed with it: a site releases only a
                result that is exactly that (sites require it unless their
                `declared_outputs` is optional).

        Raises:
            InvalidRequest: the declared outputs or the options are refused before sending.
        """
        spec = query_spec(outputs, "declared outputs") if outputs is not None else None
        if spec is not None and spec.catalog != catalog:
            raise InvalidRequest(f"declared outputs refused before sending: they name catalog "
                                 f"{spec.catalog!r}, the script runs on {catalog!r}")
        req = new_request("script", catalog, entry=await self.entry_node(),
                          scope="federated" if federated else "local",
                          spec=spec.to_dict() if spec is not None else None,
                          script=script, epsilon=epsilon, min_sites=min_sites)
        return await self.submit(self.sign(req, script))

    async def watch(self, job_id: str, timeout: float | None = None, *,
                    follow_restarts: bool = True) -> AsyncIterator[Event]:
        """A job's events to its end: ("state", Job), ("site", SiteEvent), ("log", str),
        ("result", QueryAnswer), and ("reconnecting", reason) if the node went away.

        A node that restarts while the job runs may re-run it (its `on_restart` policy):
        the watch connects again and follows the same job, whose state then says it was
        re-queued (`Job.requeues`), to its end.

        Args:
            job_id: the job.
            timeout: the deadline of the whole watch, reconnections included; by default
                20 × the config's `timeout_s`.
            follow_restarts: False: end (or raise) when the node's stream does.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + (timeout or self.config.timeout_s * 20)
        again = False  # a node that answered once: wait for it to be back
        while True:
            call = self.jobs.WatchJob(jobs_pb2.WatchJobRequest(id=job_id),
                                      timeout=max(0.001, deadline - loop.time()),
                                      wait_for_ready=again)
            state = ""
            try:
                with translated(self.address):
                    async for kind, value in job_events(call, job_id,
                                                        functools.partial(self._drain, call)):
                        state = value.state if kind == "state" else state
                        again = True
                        yield kind, value
                lost = "the node stopped following the job (stopping or restarting)"
            except ConnectionFailed as exc:
                if not (follow_restarts and again) or loop.time() + RECONNECT_S >= deadline:
                    raise
                lost = str(exc)
            else:
                # Ended by the node: followed again only if it was under way (a stopping
                # node ends its watchers' streams), not if it ended or waits for an admin.
                if state not in UNFINISHED_STATES:
                    return
            if not follow_restarts or loop.time() + RECONNECT_S >= deadline:
                return
            yield "reconnecting", f"{lost}; following job {job_id} again"
            await asyncio.sleep(RECONNECT_S)

    def _drain(self, call: Any) -> None:
        """Read what is left of a call whose final event has come, to its status, in the
        background: the caller has its answer."""
        async def rest() -> None:
            with contextlib.suppress(grpc.RpcError):
                async for _ in call:
                    pass

        task = asyncio.ensure_future(rest())
        self._draining.add(task)
        task.add_done_callback(self._draining.discard)

    async def result(self, job_id: str) -> QueryAnswer:
        """A finished job's stored answer (its owner's, or an admin's).

        Args:
            job_id: the job.
        """
        asm = codec.Assembler()
        async for frame in self._stream(self.jobs.GetResult, jobs_pb2.GetResultRequest(id=job_id),
                                        self.config.timeout_s * 10):
            feed(asm, frame)
        try:
            doc, arrays = asm.result()
        except codec.CodecError as exc:
            raise StimnetError(f"incomplete result from the node: {exc}") from None
        return QueryAnswer(job_id, doc, arrays)

    async def run_job(self, job: jobs_pb2.Job, on_event: OnEvent | None = None) -> QueryAnswer:
        """Watch a submitted job to its end: the answer, or a typed error saying why not.

        Args:
            job: the job as `submit` returned it.
            on_event: called with each ``(kind, value)`` event as it arrives.

        Raises:
            JobFailed: the job ended without an answer (the message names why).
        """
        return await follow(self.watch(job.id), on_event, job)

    async def query(self, query: str | dict[str, Any], *, federated: bool = False,
                    epsilon: float | None = None, min_sites: int = 1,
                    on_event: OnEvent | None = None) -> QueryAnswer:
        """Run an aggregate query and return its combined answer (one RunJob on this
        client's Session stream).

        Args:
            query: restricted SQL, e.g. ``"SELECT count(*) FROM dbs_outcomes"``, or a spec.
            federated: fan out to every site holding the catalog.
            epsilon: request differential privacy with this ε.
            min_sites: fail unless this many sites contribute.
            on_event: called with each ``(kind, value)`` event as it arrives (live
                progress: "state", "site", "log", "result").

        Raises:
            InvalidRequest: the query or its options are refused before sending.
            JobFailed: fewer than `min_sites` sites contributed (the message names why).
        """
        signed = self.sign(await self._query_request(query, federated, epsilon, min_sites))
        request = jobs_pb2.SubmitJobRequest(job=convert.signed_job_pb(signed))
        return await follow(self._session_events(request, self.config.timeout_s * 20), on_event)

    async def _session_events(self, request: jobs_pb2.SubmitJobRequest,
                              timeout: float) -> AsyncIterator[Event]:
        """RunJob's events, the job run on this client's Session stream."""
        replies = self._session_replies(request, timeout)
        try:
            async with asyncio.timeout(timeout):
                with translated(self.address):
                    try:
                        async for item in job_events(replies, "", lambda: None):
                            yield item
                    finally:
                        # The call ends here (at its final state, or as it fails), not
                        # when the garbage collector finalises its generator.
                        await replies.aclose()
        except TimeoutError:
            raise deadline_exceeded(self.address) from None

    async def _session_replies(self, request: jobs_pb2.SubmitJobRequest,
                               timeout: float) -> AsyncGenerator[Any, None]:
        """One RunJob call's JobEvents on the Session stream; its status, if it ends
        with one, raised as the error it stands for."""
        stream = multiplex.shared(self._sessions, "", self._channel, timeout,
                                  self._new_session)
        call = await stream.start(request, timeout)
        try:
            while (reply := await call.next()) is not None:
                if reply.HasField("status"):
                    st = reply.status
                    raise from_call_status(st.code, st.message, st.kind, self.address)
                yield reply.event
        finally:
            call.close()

    def _new_session(self, lifetime_s: float) -> multiplex.SharedStream:
        return multiplex.SharedStream(lambda t: self.jobs.Session(timeout=t), lifetime_s,
                                      call=jobs_pb2.SessionCall, body="run",
                                      last=_last_job_reply)

    async def get_job(self, job_id: str) -> jobs_pb2.Job:
        """One job: its state, detail and per-site states.

        Args:
            job_id: the job.
        """
        return await self._call(self.jobs.GetJob, jobs_pb2.GetJobRequest(id=job_id))

    async def list_jobs(self, limit: int = 50) -> list[jobs_pb2.Job]:
        """The caller's jobs (an admin's: everyone's), newest first.

        Args:
            limit: at most this many.
        """
        return list((await self._call(self.jobs.ListJobs,
                                      jobs_pb2.ListJobsRequest(limit=limit))).jobs)

    async def cancel(self, job_id: str) -> jobs_pb2.Job:
        """Cancel a job that has not ended.

        Args:
            job_id: the job.
        """
        return await self._call(self.jobs.CancelJob, jobs_pb2.CancelJobRequest(id=job_id))

    async def approve(self, job_id: str, remember: bool = False) -> jobs_pb2.Job:
        """Approve a script job awaiting review (admins).

        Args:
            job_id: the job.
            remember: approve the script (by SHA-256) for future jobs too.
        """
        return await self._call(self.jobs.ApproveJob,
                                jobs_pb2.ReviewJobRequest(id=job_id, remember=remember))

    async def deny(self, job_id: str) -> jobs_pb2.Job:
        """Deny a script job awaiting review (admins).

        Args:
            job_id: the job.
        """
        return await self._call(self.jobs.DenyJob, jobs_pb2.ReviewJobRequest(id=job_id))



def _last_job_reply(reply: Any) -> bool:
    return bool(reply.event.HasField("state") and reply.event.state.state in TERMINAL_STATES)
