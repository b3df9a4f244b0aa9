"""The researcher's and operator's client: async core, gRPC errors mapped in one place.

Every call carries a deadline. `AsyncClient` is for asyncio code; `Client` wraps it for
scripts and notebooks (it runs its own event loop on a background thread, so it also works
inside Jupyter, whose loop is already running).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import threading
import tomllib
from collections.abc import AsyncGenerator, AsyncIterator, Coroutine
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import grpc

from stimnet.v1 import admin_pb2, admin_pb2_grpc, jobs_pb2, jobs_pb2_grpc, node_pb2, node_pb2_grpc

DEFAULT_CONFIG = Path("~/.config/stimnet/client.toml").expanduser()
# How long close() waits for calls whose final event has come to end with their status.
DRAIN_S = 2.0
T = TypeVar("T")


class ClientError(Exception):
    """Base of every error the client raises; `str()` is one line for a human."""

    code: grpc.StatusCode | None = None


class ConfigProblem(ClientError):
    pass


class ConnectionFailed(ClientError):
    pass


class NotAuthenticated(ClientError):
    pass


class PermissionDenied(ClientError):
    pass


class NotFound(ClientError):
    pass


class InvalidRequest(ClientError):
    pass


class Refused(ClientError):
    pass


class BudgetExhausted(Refused):
    pass


class Overloaded(ClientError):
    """A node's limit on work in flight per caller (max_queries_per_researcher): retry
    once some of your jobs have finished."""


class DeadlineExceeded(ClientError):
    pass


class JobFailed(ClientError):
    def __init__(self, message: str, job: Any = None) -> None:
        super().__init__(message)
        self.job = job


_BY_CODE: dict[grpc.StatusCode, type[ClientError]] = {
    grpc.StatusCode.UNAVAILABLE: ConnectionFailed,
    grpc.StatusCode.UNAUTHENTICATED: NotAuthenticated,
    grpc.StatusCode.PERMISSION_DENIED: PermissionDenied,
    grpc.StatusCode.NOT_FOUND: NotFound,
    grpc.StatusCode.INVALID_ARGUMENT: InvalidRequest,
    grpc.StatusCode.FAILED_PRECONDITION: Refused,
    grpc.StatusCode.RESOURCE_EXHAUSTED: BudgetExhausted,
    grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceeded,
}


def _error_kind(exc: grpc.RpcError) -> str:
    """The daemon's error class a refusal names in its trailing metadata, or ""."""
    from stimnet.errors import ERROR_KIND_KEY

    trailing = exc.trailing_metadata() if hasattr(exc, "trailing_metadata") else None
    for key, value in trailing or ():
        if key == ERROR_KIND_KEY:
            return value.decode() if isinstance(value, bytes) else str(value)
    return ""


def map_rpc_error(exc: grpc.RpcError, address: str) -> ClientError:
    code = exc.code() if hasattr(exc, "code") else None
    details = (exc.details() if hasattr(exc, "details") else "") or ""
    return map_status(code, details, _error_kind(exc), address)


def map_status(code: grpc.StatusCode | None, details: str, kind: str,
               address: str) -> ClientError:
    """A failed call's status (code, details, the daemon's error class) as a typed error."""
    cls = _BY_CODE.get(code, ClientError) if code is not None else ClientError
    if cls is ConnectionFailed:
        if "handshake" in details.lower() or "ssl" in details.lower():
            msg = (f"TLS handshake with {address} failed: the node refused our certificate or we "
                   f"refused its certificate (wrong CA, expired, or wrong host)")
        else:
            msg = f"cannot reach node at {address}: {details.splitlines()[0] if details else 'unavailable'}"
    elif cls is DeadlineExceeded:
        msg = f"node at {address} did not answer in time"
    elif cls is BudgetExhausted and kind == "Overloaded":
        cls, msg = Overloaded, details  # a load limit, not the privacy budget
    else:
        msg = details or (code.name if code else "unknown error")
    err = cls(msg)
    err.code = code
    return err


@dataclass(frozen=True)
class ClientConfig:
    address: str
    ca: Path
    cert: Path
    key: Path
    timeout_s: float = 30.0

    @classmethod
    def load(cls, path: Path | str | None = None) -> ClientConfig:
        path = Path(path).expanduser() if path else DEFAULT_CONFIG
        try:
            raw = tomllib.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ConfigProblem(f"client config {path} does not exist "
                                "(pass --config FILE, or create it)") from None
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigProblem(f"client config {path} is unreadable: {exc}") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigProblem(f"client config {path} is not valid TOML: {exc}") from None
        allowed = {"address", "ca", "cert", "key", "timeout_s"}
        unknown = sorted(set(raw) - allowed)
        if unknown:
            raise ConfigProblem(f"client config {path}: unknown key {unknown[0]!r}")
        missing = [k for k in ("address", "ca", "cert", "key") if k not in raw]
        if missing:
            raise ConfigProblem(f"client config {path}: missing key {missing[0]!r}")
        base = path.resolve().parent

        def rel(p: str) -> Path:
            q = Path(p).expanduser()
            return q if q.is_absolute() else base / q

        return cls(address=str(raw["address"]), ca=rel(raw["ca"]), cert=rel(raw["cert"]),
                   key=rel(raw["key"]), timeout_s=float(raw.get("timeout_s", 30.0)))

    def credentials(self) -> grpc.ChannelCredentials:
        try:
            return grpc.ssl_channel_credentials(
                root_certificates=self.ca.read_bytes(), private_key=self.key.read_bytes(),
                certificate_chain=self.cert.read_bytes())
        except OSError as exc:
            raise ConfigProblem(f"cannot read {exc.filename}: {exc.strerror}") from None


class AsyncClient:
    def __init__(self, config: ClientConfig) -> None:
        self.config = config
        self.address = config.address
        self._channel = grpc.aio.secure_channel(config.address, config.credentials())
        self.node = node_pb2_grpc.NodeServiceStub(self._channel)
        self.jobs = jobs_pb2_grpc.JobServiceStub(self._channel)
        self.admin = admin_pb2_grpc.AdminServiceStub(self._channel)
        # Calls whose last event has arrived, read to their status in the background:
        # grpc cancels a call whose object is collected (the node would log a finished
        # RPC as cancelled), and one still open when the event loop closes breaks grpc's
        # next loop in this process (stimctl runs one per command).
        self._draining: set[asyncio.Task[None]] = set()
        self._entry: str | None = None
        # The Session stream queries run on (stimnetd/rpc/multiplex.py); False once the
        # node turned out not to serve it (an older version): RunJob calls then.
        self._sessions: dict[str, Any] = {}
        self._session_ok = True
        self._files: dict[Path, tuple[tuple[int, int, int], bytes]] = {}

    @classmethod
    def from_file(cls, path: Path | str | None = None) -> AsyncClient:
        return cls(ClientConfig.load(path))

    async def close(self) -> None:
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
        try:
            return await rpc(request, timeout=timeout or self.config.timeout_s)
        except grpc.RpcError as exc:
            raise map_rpc_error(exc, self.address) from None

    async def _stream(self, rpc: Any, request: Any, timeout: float | None) -> AsyncIterator[Any]:
        try:
            async for item in rpc(request, timeout=timeout):
                yield item
        except grpc.RpcError as exc:
            raise map_rpc_error(exc, self.address) from None

    # -- node ------------------------------------------------------------------------

    async def info(self) -> node_pb2.NodeInfo:
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
        resp = await self._call(self.node.ListCatalogs,
                                node_pb2.ListCatalogsRequest(federated=federated))
        return list(resp.catalogs)

    async def describe(self, name: str) -> node_pb2.CatalogDescription:
        return await self._call(self.node.DescribeCatalog, node_pb2.DescribeCatalogRequest(name=name))

    async def peers(self) -> list[node_pb2.Peer]:
        return list((await self._call(self.node.ListPeers, node_pb2.ListPeersRequest())).peers)

    async def status(self) -> node_pb2.NodeStatus:
        return await self._call(self.node.GetStatus, node_pb2.GetStatusRequest())

    # -- admin -----------------------------------------------------------------------

    async def audit_verify(self) -> admin_pb2.VerifyAuditResponse:
        return await self._call(self.admin.VerifyAudit, admin_pb2.VerifyAuditRequest())

    async def audit_export(self, since: float = 0.0) -> AsyncIterator[admin_pb2.AuditEntry]:
        async for e in self._stream(self.admin.ExportAudit,
                                    admin_pb2.ExportAuditRequest(since=since),
                                    self.config.timeout_s * 10):
            yield e

    # -- jobs ----------------------------------------------------------------------------

    def sign(self, request: Any, script: bytes | None = None) -> Any:
        from stimnet import signing

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

    async def submit(self, signed: Any) -> jobs_pb2.Job:
        from stimnet import convert

        return await self._call(self.jobs.SubmitJob,
                                jobs_pb2.SubmitJobRequest(job=convert.signed_job_pb(signed)))

    async def submit_query(self, query: str | dict[str, Any], *, federated: bool = False,
                           epsilon: float | None = None, min_sites: int = 1) -> jobs_pb2.Job:
        """Parse (SQL) or take a spec dict, sign it with our key, submit it."""
        return await self.submit(self.sign(await self._query_request(query, federated, epsilon,
                                                                     min_sites)))

    async def _query_request(self, query: str | dict[str, Any], federated: bool,
                             epsilon: float | None, min_sites: int) -> Any:
        spec = _spec(query, "query")
        return _new_request("query", spec.catalog, entry=await self.entry_node(),
                            scope="federated" if federated else "local",
                            spec=spec.to_dict(), epsilon=epsilon, min_sites=min_sites)

    async def submit_script(self, script: bytes, catalog: str, *, federated: bool = False,
                            epsilon: float | None = None, min_sites: int = 1,
                            outputs: str | dict[str, Any] | None = None) -> jobs_pb2.Job:
        """Sign a script job (its SHA-256 is in the signed payload) and submit it.

        `outputs` declares what the script emits, in the query language — SQL such as
        "SELECT count(*) AS n, avg(age) AS mean_age FROM c GROUP BY sex" (no WHERE) or
        the equivalent spec — and is signed with it: a site releases only a result that
        is exactly that (sites require it unless their `declared_outputs` is optional)."""
        spec = _spec(outputs, "declared outputs") if outputs is not None else None
        if spec is not None and spec.catalog != catalog:
            raise InvalidRequest(f"declared outputs refused before sending: they name catalog "
                                 f"{spec.catalog!r}, the script runs on {catalog!r}")
        req = _new_request("script", catalog, entry=await self.entry_node(),
                           scope="federated" if federated else "local",
                           spec=spec.to_dict() if spec is not None else None,
                           script=script, epsilon=epsilon, min_sites=min_sites)
        return await self.submit(self.sign(req, script))

    async def watch(self, job_id: str, timeout: float | None = None) -> AsyncIterator[Any]:
        """Yields ("state", Job), ("site", SiteEvent), ("log", str), ("result", QueryAnswer)."""
        async for item in self._events(self.jobs.WatchJob, jobs_pb2.WatchJobRequest(id=job_id),
                                       job_id, timeout):
            yield item

    async def _events(self, rpc: Any, request: Any, job_id: str,
                      timeout: float | None) -> AsyncIterator[Any]:
        call = rpc(request, timeout=timeout or self.config.timeout_s * 20)
        try:
            async for item in self._job_events(call, job_id, lambda: self._drain(call)):
                yield item
        except grpc.RpcError as exc:
            raise map_rpc_error(exc, self.address) from None

    async def _session_events(self, request: Any, timeout: float) -> AsyncIterator[Any]:
        """RunJob's events, the job run on this client's Session stream. Raises
        multiplex.NotMultiplexed, having sent nothing, if the node does not serve it."""
        from stimnet import multiplex

        stream = multiplex.shared(
            self._sessions, "", self._channel, timeout,
            lambda lifetime: multiplex.SharedStream(
                lambda t: self.jobs.Session(timeout=t), lifetime, call=jobs_pb2.SessionCall,
                body="run", last=_last_job_reply))

        async def replies() -> AsyncGenerator[Any, None]:
            call = await stream.start(request, timeout)
            try:
                while (reply := await call.next()) is not None:
                    if reply.HasField("status"):
                        st = reply.status
                        raise map_status(getattr(grpc.StatusCode, st.code, None), st.message,
                                         st.kind, self.address)
                    yield reply.event
            finally:
                call.close()

        events = replies()
        try:
            async with asyncio.timeout(timeout):
                try:
                    async for item in self._job_events(events, "", lambda: None):
                        yield item
                finally:
                    # The call ends here (at its final state, or as it fails), not when
                    # the garbage collector finalises its generator.
                    await events.aclose()
        except TimeoutError:
            raise DeadlineExceeded(f"node at {self.address} did not answer in time") from None
        except grpc.RpcError as exc:  # the stream broke (the node went away): the job may
            # have run, so it is not sent again (NotMultiplexed comes from start() alone)
            raise map_rpc_error(exc, self.address) from None
        except multiplex.StreamBroken as exc:
            raise ConnectionFailed(f"lost the session with the node at {self.address}: "
                                   f"{exc}") from None

    async def _job_events(self, events: AsyncIterator[Any], job_id: str,
                          done: Any) -> AsyncIterator[Any]:
        """A job's events as ("state" | "site" | "log" | "result", value), to its final
        state; `done()` is called when nothing else is to come."""
        from stimctl.results import QueryAnswer
        from stimnet import codec
        from stimnet.frames import feed
        from stimnet.states import TERMINAL_STATES

        asm: codec.Assembler | None = None
        seen: set[tuple[str, str]] = set()

        def unseen(sites: Any) -> list[Any]:
            fresh = [s for s in sites if (s.site, s.state) not in seen]
            seen.update((s.site, s.state) for s in fresh)
            return fresh

        answered = False
        async for ev in events:
            # Several fields may be set in one event: sites, then result, then state.
            if ev.HasField("state") and not job_id:
                job_id = ev.state.id
            # A job's state lists its sites' events so far: a quick job's only message
            # is its final state, so the events it lists come first (they happened
            # before it ended); a joining watcher's first state comes before the events
            # it lists.
            final = ev.HasField("state") and ev.state.state in TERMINAL_STATES
            sites = [ev.site] if ev.HasField("site") else []
            for site in unseen([*sites, *ev.sites, *(ev.state.sites if final else ())]):
                yield "site", site
            if ev.log_line:
                yield "log", ev.log_line
            if ev.HasField("result"):
                if ev.result.WhichOneof("frame") == "header":
                    asm = codec.Assembler()
                if asm is None:
                    raise ClientError("result stream started without a header")
                feed(asm, ev.result)
                if asm.complete:
                    doc, arrays = asm.result()
                    yield "result", QueryAnswer(job_id, doc, arrays)
                    asm = None
                    answered = True
            if ev.HasField("state"):
                yield "state", ev.state
                for site in unseen(ev.state.sites):
                    yield "site", site
            if final and (answered or ev.state.state != "succeeded"):
                # Nothing else is to come: the answer does not wait for the stream's
                # status, a further hop behind it. (A succeeded state without its
                # answer, from a node that sends it after, is read on.)
                done()
                return

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

    async def result(self, job_id: str) -> Any:
        from stimctl.results import QueryAnswer
        from stimnet import codec
        from stimnet.frames import feed

        asm = codec.Assembler()
        async for frame in self._stream(self.jobs.GetResult, jobs_pb2.GetResultRequest(id=job_id),
                                        self.config.timeout_s * 10):
            feed(asm, frame)
        try:
            doc, arrays = asm.result()
        except codec.CodecError as exc:
            raise ClientError(f"incomplete result from the node: {exc}") from None
        return QueryAnswer(job_id, doc, arrays)

    async def run_job(self, job: jobs_pb2.Job, on_event: Any = None) -> Any:
        """Watch a submitted job to its end; the answer, or a typed error saying why not."""
        return await _follow(self.watch(job.id), on_event, job)

    async def query(self, query: str | dict[str, Any], *, federated: bool = False,
                    epsilon: float | None = None, min_sites: int = 1, on_event: Any = None) -> Any:
        """Submit and follow in one call (RunJob, on this client's Session stream): the
        answer, or a typed error."""
        from stimnet import convert, multiplex

        signed = self.sign(await self._query_request(query, federated, epsilon, min_sites))
        request = jobs_pb2.SubmitJobRequest(job=convert.signed_job_pb(signed))
        if self._session_ok:
            # On the session: a question is one message each way, not a call (see
            # stimnetd/rpc/multiplex.py); a notebook asking many saves that on each.
            try:
                return await _follow(self._session_events(request, self.config.timeout_s * 20),
                                     on_event, None)
            except multiplex.NotMultiplexed:
                self._session_ok = False  # an older node: it ran nothing; RunJob from now
        return await _follow(self._events(self.jobs.RunJob, request, "", None), on_event, None)

    async def get_job(self, job_id: str) -> jobs_pb2.Job:
        return await self._call(self.jobs.GetJob, jobs_pb2.GetJobRequest(id=job_id))

    async def list_jobs(self, limit: int = 50) -> list[jobs_pb2.Job]:
        return list((await self._call(self.jobs.ListJobs, jobs_pb2.ListJobsRequest(limit=limit))).jobs)

    async def cancel(self, job_id: str) -> jobs_pb2.Job:
        return await self._call(self.jobs.CancelJob, jobs_pb2.CancelJobRequest(id=job_id))

    async def approve(self, job_id: str, remember: bool = False) -> jobs_pb2.Job:
        return await self._call(self.jobs.ApproveJob,
                                jobs_pb2.ReviewJobRequest(id=job_id, remember=remember))

    async def deny(self, job_id: str) -> jobs_pb2.Job:
        return await self._call(self.jobs.DenyJob, jobs_pb2.ReviewJobRequest(id=job_id))


def _last_job_reply(reply: Any) -> bool:
    from stimnet.states import TERMINAL_STATES

    return reply.event.HasField("state") and reply.event.state.state in TERMINAL_STATES


async def _follow(events: AsyncIterator[Any], on_event: Any, job: Any) -> Any:
    """Consume a job's events to the end: its answer, or JobFailed naming the final state."""
    answer, final = None, job
    async for kind, value in events:
        if on_event is not None:
            on_event(kind, value)
        if kind == "state":
            final = value
        elif kind == "result":
            answer = value
    if final is None or final.state != "succeeded" or answer is None:
        state = final.state if final is not None else "unknown"
        detail = (final.detail if final is not None else "") or "no result"
        raise JobFailed(f"job {final.id if final is not None else '?'} {state}: {detail}", final)
    return answer


def _new_request(kind: str, catalog: str, **fields: Any) -> Any:
    """signing.new_request, its refusals (epsilon NaN, min_sites 0, …) as this client's
    InvalidRequest: a job no node would accept is not sent."""
    from stimnet import errors, signing

    try:
        return signing.new_request(kind, catalog, **fields)
    except errors.InvalidRequest as exc:
        raise InvalidRequest(f"job refused before sending: {exc}") from None


def _spec(query: str | dict[str, Any], what: str) -> Any:
    """A QuerySpec from SQL or a spec dict; InvalidRequest naming `what` if it is not one."""
    from stimnet.errors import QueryError
    from stimnet.query.spec import QuerySpec

    try:
        return _parse_cached(query) if isinstance(query, str) else QuerySpec.from_dict(query)
    except QueryError as exc:
        raise InvalidRequest(f"{what} refused before sending: {exc}") from None


@functools.lru_cache(maxsize=256)
def _parse_cached(sql: str) -> Any:
    # Specs are immutable; re-running a query (notebooks do) need not re-parse its SQL.
    from stimnet.query.sql import parse_sql

    return parse_sql(sql)


async def wait_serving(address: str, credentials: grpc.ChannelCredentials, *,
                       timeout_s: float, exited: Any = lambda: None, interval_s: float = 0.1) -> None:
    """Until the node answers a standard health check with SERVING.

    `exited()` returns an exit code if the node's process is gone (so a crashed node fails
    at once instead of after the timeout); raises RuntimeError or TimeoutError.
    """
    import time

    from grpc_health.v1 import health_pb2, health_pb2_grpc

    deadline = time.monotonic() + timeout_s
    while True:
        code = exited()
        if code is not None:
            raise RuntimeError(f"node at {address} exited with code {code}")
        try:
            async with grpc.aio.secure_channel(address, credentials) as ch:
                r = await health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(),
                                                               timeout=2)
            if r.status == health_pb2.HealthCheckResponse.SERVING:
                return
        except grpc.RpcError:
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"node at {address} not serving after {timeout_s:.0f}s")
        await asyncio.sleep(interval_s)


class Client:
    """Blocking facade over `AsyncClient` for scripts and notebooks."""

    def __init__(self, config: ClientConfig | Path | str | None = None) -> None:
        cfg = config if isinstance(config, ClientConfig) else ClientConfig.load(config)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True,
                                        name="stimctl-client")
        self._thread.start()
        self._async = self._run(_make_async(cfg))

    def _run(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result()

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._async, name)
        if not callable(attr):
            return attr

        def call(*args: Any, **kwargs: Any) -> Any:
            result = attr(*args, **kwargs)
            if hasattr(result, "__aiter__"):
                return self._run(_collect(result))
            return self._run(result)

        return call

    def close(self) -> None:
        self._run(self._async.close())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=5)
        self._loop.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


async def _make_async(cfg: ClientConfig) -> AsyncClient:
    return AsyncClient(cfg)


async def _collect(it: AsyncIterator[T]) -> list[T]:
    return [x async for x in it]
