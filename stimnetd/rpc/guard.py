"""The one place every RPC passes through: identity, role, revocation, errors, logs, audit.

Identity and role come from the client certificate, never from a request field: by default
from the verdict our TLS front recorded for the connection (stimnetd/tlsfront.py), so a
caller with no certificate, one from another CA or an expired one is refused here with
UNAUTHENTICATED and audited like any other refusal. With `[tls] terminate = "grpc"` they
come from gRPC's TLS auth context instead, and such callers never get past gRPC's handshake
(no RPC exists to refuse or audit; see tlsfront.py for why).

gRPC Python has no CRL option, so revocation is checked here on every call; that also
covers channels opened before the revocation, and certificates expiring on an open one.
"""

from __future__ import annotations

import asyncio
import collections
import contextvars
import inspect
import itertools
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import grpc
import structlog
from grpc._cython import cygrpc  # ExecuteBatchError: a status not sent, the caller gone (no public name)

from stimnet.errors import ERROR_KIND_KEY, StimnetError, StorageFull
from stimnet.pki import Identity, PkiError, identity_from_cert
from stimnetd.rpc.malformed import readable
from stimnetd.rpc.refusals import RefusalLimiter, Summary
from stimnetd.rpc.roles import ADMIN, admin_scoped, allowed_roles
from stimnetd.tlsfront import TlsFront

log = structlog.get_logger("stimnetd.rpc")

T = TypeVar("T")

_CURRENT: contextvars.ContextVar[Caller] = contextvars.ContextVar("stimnet_caller")

REQUEST_ID_KEY = "x-stimnet-request-id"
# The audit action of a connection the TLS front closed before any call (no method to name).
TLS_HANDSHAKE = "tls-handshake"
# Condensed-refusal entries kept for a retry while the audit log cannot be written.
MAX_UNWRITTEN_SUMMARIES = 10_000
# Allowed calls audited as one count per caller and method per window instead of one entry
# each: membership gossip between nodes and health checks, several a second at every node
# (about a million entries a day on an idle three-node federation), and no data behind
# them. Their refusals are audited as any other's.
QUIET_METHODS = frozenset({
    "/stimnet.v1.FederationService/Ping",
    "/stimnet.v1.FederationService/PingReq",
    "/stimnet.v1.FederationService/PushPull",
    "/grpc.health.v1.Health/Check",
    "/grpc.health.v1.Health/Watch",
})
QUIET_WINDOW_S = 600.0


class SubcallEnded(Exception):
    """A multiplexed call (Guard.subcall) ended as a failed call would: with this status."""

    def __init__(self, code: str, message: str, kind: str = "") -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.kind = kind  # the daemon's error class, as a call's x-stimnet-error says


@dataclass(frozen=True)
class Caller:
    identity: Identity
    request_id: str

    @property
    def name(self) -> str:
        return self.identity.name

    @property
    def role(self) -> str:
        return self.identity.role


def current_caller() -> Caller:
    return _CURRENT.get()


class Revocations:
    """The CRL in force; swapped atomically when the daemon reloads it (SIGHUP)."""

    def __init__(self, serials: frozenset[int] = frozenset()) -> None:
        self.serials = serials

    def replace(self, serials: frozenset[int]) -> None:
        self.serials = serials


class _RpcRefused(Exception):
    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code


class AuthContextIdentities:
    """Identities from gRPC's own TLS (`[tls] terminate = "grpc"`): the handshake already
    verified the chain, so only certificates issued by our CA get here."""

    def __init__(self) -> None:
        # Parsing a certificate per call would dominate a cheap RPC; a connection presents
        # the same PEM on every call.
        self._cache: dict[bytes, Identity | PkiError] = {}

    def identity(self, context: grpc.aio.ServicerContext) -> Identity:
        pems = context.auth_context().get("x509_pem_cert")
        if not pems:
            raise _RpcRefused(grpc.StatusCode.UNAUTHENTICATED,
                              "a client certificate issued by the federation CA is required")
        pem = pems[0]
        cached = self._cache.get(pem)
        if cached is None:
            try:
                cached = identity_from_cert(pem)
            except PkiError as exc:
                cached = exc
            if len(self._cache) > 4096:
                self._cache.clear()
            self._cache[pem] = cached
        if isinstance(cached, PkiError):
            raise _RpcRefused(grpc.StatusCode.UNAUTHENTICATED, f"unusable certificate: {cached}")
        return cached

    def who(self, context: grpc.aio.ServicerContext) -> tuple[str, str, dict[str, str]]:
        """Best-effort name of a refused caller for the audit log (never trusted for access)."""
        pems = context.auth_context().get("x509_pem_cert")
        if not pems:
            return (context.peer() or "unknown", "anonymous", {})
        try:
            ident = identity_from_cert(pems[0])
        except PkiError:
            return (context.peer() or "unknown", "unparseable-cert", {})
        return (ident.name, ident.role, {})


class FrontIdentities:
    """Identities from the verdicts of our TLS front (the default)."""

    def __init__(self, front: TlsFront) -> None:
        self._front = front

    def identity(self, context: grpc.aio.ServicerContext) -> Identity:
        verdict = self._front.verdict_for(context.peer() or "")
        if verdict is None:
            raise _RpcRefused(grpc.StatusCode.UNAUTHENTICATED,
                              "connection did not arrive through the node's TLS front")
        if verdict.identity is None:
            raise _RpcRefused(grpc.StatusCode.UNAUTHENTICATED, verdict.refusal or "unverified")
        return verdict.identity

    def who(self, context: grpc.aio.ServicerContext) -> tuple[str, str, dict[str, str]]:
        verdict = self._front.verdict_for(context.peer() or "")
        if verdict is None:
            return (context.peer() or "unknown", "anonymous", {})
        if verdict.identity is not None:
            return (verdict.identity.name, verdict.identity.role, {"remote": verdict.remote})
        # An unverified certificate's name is a claim: the audit row is keyed by address.
        claim = (f"{verdict.claimed_role}/{verdict.claimed_name}" if verdict.claimed_name
                 else "")
        return (verdict.remote, "anonymous" if not claim else "unverified",
                {"remote": verdict.remote, **({"claimed": claim} if claim else {})})


class Guard(grpc.aio.ServerInterceptor):
    """Authenticates, authorises, audits, logs and maps errors for every RPC."""

    def __init__(self, *, identities: AuthContextIdentities | FrontIdentities,
                 revocations: Revocations,
                 audit_refusal: Callable[[str, str, str, str, dict[str, Any]], Awaitable[Any]],
                 audit_allowed: Callable[[str, str, str, str, dict[str, Any]], None],
                 observe: Callable[[str, str, float], None] | None = None,
                 refusals: RefusalLimiter | None = None,
                 admins: frozenset[str] | None = None, node: str = "",
                 clock: Callable[[], float] = time.time) -> None:
        # None: every admin certificate is obeyed (in-process tests of other logic only;
        # the daemon always passes its `[node] admins`).
        self._admins = admins
        self._node = node
        self._revocations = revocations
        self._audit_refusal = _bounded(audit_refusal)
        self._audit_allowed = audit_allowed
        self._refusals = refusals or RefusalLimiter(clock=clock)
        self._unwritten_refusals: list[Summary] = []
        self._quiet: collections.Counter[tuple[str, str, str]] = collections.Counter()
        self._quiet_since = clock()
        self._observe = observe
        self._clock = clock
        self._identities = identities
        # A concrete logger (the module-level proxy re-binds on every call), and one
        # wrapped handler per method instead of one per call: both are per-RPC costs.
        self._log = log.bind()
        self._handlers: dict[str, tuple[Any, Any]] = {}
        # Request ids name calls in logs across sites: unique, not secret. A random
        # per-process prefix and a counter spare a getrandom() syscall per call.
        self._rid_prefix = secrets.token_hex(5)
        self._rid_counter = itertools.count(1)

    def _next_request_id(self) -> str:
        return f"{self._rid_prefix}{next(self._rid_counter):06x}"

    async def intercept_service(self, continuation: Any, details: grpc.HandlerCallDetails) -> Any:
        handler = await continuation(details)
        if handler is None:
            return None
        wrapped = self._handlers.get(details.method)
        if wrapped is None or wrapped[0] is not handler:
            wrapped = (handler, self._wrap(details.method, handler))
            if len(self._handlers) < 1024:  # bounded by the methods we serve
                self._handlers[details.method] = wrapped
        return wrapped[1]

    def _wrap(self, method: str, handler: Any) -> Any:
        h = readable(handler)  # bytes that are not the request message: INVALID_ARGUMENT
        io = {"request_deserializer": h.request_deserializer,
              "response_serializer": h.response_serializer}
        if h.unary_unary is not None:
            return grpc.unary_unary_rpc_method_handler(self._wrap_unary(method, h.unary_unary), **io)
        if h.unary_stream is not None:
            return grpc.unary_stream_rpc_method_handler(self._wrap_stream(method, h.unary_stream), **io)
        if h.stream_unary is not None:
            return grpc.stream_unary_rpc_method_handler(self._wrap_unary(method, h.stream_unary), **io)
        return grpc.stream_stream_rpc_method_handler(self._wrap_stream(method, h.stream_stream),
                                                     **io)

    # -- per-call checks -------------------------------------------------------------

    def _check(self, method: str, context: grpc.aio.ServicerContext) -> Identity:
        ident = self._identities.identity(context)
        if ident.serial in self._revocations.serials:
            raise _RpcRefused(grpc.StatusCode.UNAUTHENTICATED,
                              f"certificate {ident.role}/{ident.name} (serial {ident.serial:x}) "
                              "has been revoked")
        if ident.not_after.timestamp() < self._clock():
            raise _RpcRefused(grpc.StatusCode.UNAUTHENTICATED,
                              f"certificate {ident.role}/{ident.name} expired at "
                              f"{ident.not_after:%Y-%m-%d %H:%M} UTC")
        roles = allowed_roles(method)
        if ident.role not in roles:
            allowed = ", ".join(sorted(roles)) or "nobody"
            raise _RpcRefused(grpc.StatusCode.PERMISSION_DENIED,
                              f"role {ident.role!r} may not call {method} (allowed: {allowed})",
                              ) from None
        if (ident.role == ADMIN and self._admins is not None and ident.name not in self._admins
                and admin_scoped(method)):
            named = ", ".join(sorted(self._admins)) or "none"
            raise _RpcRefused(grpc.StatusCode.PERMISSION_DENIED,
                              f"admin {ident.name!r} is not an admin of node {self._node!r} "
                              f"(its [node] admins: {named})")
        return ident

    async def _enter(self, method: str, context: grpc.aio.ServicerContext) -> Caller:
        metadata = dict(context.invocation_metadata() or ())
        request_id = str(metadata.get(REQUEST_ID_KEY) or self._next_request_id())[:64]
        try:
            return await self._admit(method, context, request_id)
        except _RpcRefused as refused:
            await context.abort(refused.code, str(refused))
            raise AssertionError("unreachable") from None

    async def _admit(self, method: str, context: grpc.aio.ServicerContext,
                     request_id: str) -> Caller:
        """The caller of `method`, checked and audited; a refusal is audited, logged and
        raised as _RpcRefused."""
        structlog.contextvars.bind_contextvars(method=method, request_id=request_id)
        try:
            ident = self._check(method, context)
        except _RpcRefused as refused:
            name, role, extra = self._identities.who(context)
            if self._refusals.admit(_source(name, role), role, method, str(refused)):
                await self._audit_refusal(name, role, method, "denied",
                                          {"reason": str(refused), "request_id": request_id,
                                           **extra})
                self._log.warning("rpc refused", caller=f"{role}/{name}",
                                  status=refused.code.name, reason=str(refused))
            # Otherwise counted, for one entry when the source's minute ends (see refusals).
            if self._observe:
                self._observe(method, refused.code.name, 0.0)
            raise
        caller = Caller(ident, request_id)
        _CURRENT.set(caller)
        structlog.contextvars.bind_contextvars(caller=f"{ident.role}/{ident.name}")
        if method in QUIET_METHODS:
            self._quiet[(ident.name, ident.role, method)] += 1
        else:
            self._audit_allowed(ident.name, ident.role, method, "allowed",
                                {"request_id": request_id})
        return caller

    async def subcall(self, method: str, context: grpc.aio.ServicerContext, request_id: str,
                      behavior: Callable[[Caller], AsyncIterator[T]]) -> AsyncIterator[T]:
        """One call multiplexed on a stream (rpc/multiplex.py: FederationService/SubJobs,
        JobService/Session) under `method`'s rules, as if it were a call of its own: the
        stream's caller checked again (role,
        revocation, expiry), the call audited, logged, measured and its errors mapped —
        ending in SubcallEnded instead of aborting the stream the others share."""
        started = time.perf_counter()
        try:
            caller = await self._admit(method, context, request_id or self._next_request_id())
        except _RpcRefused as refused:
            raise SubcallEnded(refused.code.name, str(refused)) from None
        try:
            async for item in behavior(caller):
                yield item
        except StimnetError as exc:
            code = await self._refused(method, exc, started)
            raise SubcallEnded(code.name, _cut(str(exc)), type(exc).__name__) from None
        except Exception:  # noqa: BLE001 - this is the one place errors are mapped
            raise SubcallEnded("INTERNAL", self._internal(method, started)) from None
        self._done(method, "OK", started)

    def audit_quiet_calls(self, *, everything: bool = False) -> int:
        """Group-commit one entry per (caller, method) counted in QUIET_METHODS since the
        last window ended (every QUIET_WINDOW_S; all of them, `everything`)."""
        now = self._clock()
        if not self._quiet or (not everything and now - self._quiet_since < QUIET_WINDOW_S):
            return 0
        counts, self._quiet = self._quiet, collections.Counter()
        since, self._quiet_since = self._quiet_since, now
        for (name, role, method), calls in sorted(counts.items()):
            self._audit_allowed(name, role, method, "allowed-condensed",
                                {"calls": calls, "since": round(since, 3), "until": round(now, 3)})
        return len(counts)

    async def _fail(self, context: grpc.aio.ServicerContext, method: str, exc: BaseException,
                    started: float) -> None:
        if context.cancelled() or isinstance(exc, cygrpc.ExecuteBatchError):  # caller gone
            self._done(method, "CANCELLED", started)
            raise asyncio.CancelledError
        if isinstance(exc, StimnetError):
            code = await self._refused(method, exc, started)
            # Also bounded on the wire: a status message echoing a megabyte of the request
            # would exceed the caller's metadata limit and arrive as a transport error.
            await context.abort(code, _cut(str(exc)),
                                trailing_metadata=((ERROR_KIND_KEY, type(exc).__name__),))
        if type(exc) is NotImplementedError:  # a generated base class's (grpc health's List)
            self._done(method, "UNIMPLEMENTED", started)
            await context.abort(grpc.StatusCode.UNIMPLEMENTED, f"this node does not serve {method}")
        await context.abort(grpc.StatusCode.INTERNAL, self._internal(method, started))

    async def _refused(self, method: str, exc: StimnetError, started: float) -> grpc.StatusCode:
        """A domain refusal: audited durably, with the rule that refused it, and logged."""
        code = getattr(grpc.StatusCode, exc.code, grpc.StatusCode.INTERNAL)
        caller = _CURRENT.get(None)
        if caller is not None:
            await self._audit_refusal(
                caller.name, caller.role, method, "refused",
                {"code": code.name, "reason": str(exc), "request_id": caller.request_id,
                 **({"policy": exc.policy} if hasattr(exc, "policy") else {})})
        self._done(method, code.name, started, reason=_cut(str(exc)))
        return code

    def _internal(self, method: str, started: float) -> str:
        """An unexpected error (called while it is handled): logged with its traceback;
        the caller learns only where to look."""
        log.exception("rpc failed", status="INTERNAL")
        self._done(method, "INTERNAL", started, logged=True)
        caller = _CURRENT.get(None)
        rid = caller.request_id if caller else "?"
        return (f"internal error (request id {rid}); the node's operator can find it in the "
                "logs")

    def refuse_connection(self, remote: str, reason: str) -> None:
        """The TLS front closed a connection before any call could be made on it (its
        handshake failed or timed out, or it got no handshake slot): audited like a refused
        call, against the same per-source budget, but group-committed (no call waits for
        it, and a flood of these must not set the node's fsync rate)."""
        if self._refusals.admit(_source(remote, "anonymous"), "anonymous", TLS_HANDSHAKE,
                                reason):
            self._audit_allowed(_cut(remote), "anonymous", TLS_HANDSHAKE, "denied",
                                {"reason": _cut(reason), "remote": _cut(remote)})
            self._log.warning("tls connection refused", remote=remote, reason=reason)
        if self._observe:
            self._observe(TLS_HANDSHAKE, "UNAUTHENTICATED", 0.0)

    async def audit_condensed_refusals(self, *, everything: bool = False) -> int:
        """One audit entry per source whose refusals beyond the per-minute burst were
        counted in a window that has ended (every window, `everything`, at shutdown); the
        counts of quiet allowed calls ride along (`audit_quiet_calls`)."""
        self.audit_quiet_calls(everything=everything)
        pending = self._unwritten_refusals + self._refusals.due(everything=everything)
        self._unwritten_refusals = []
        for i, summary in enumerate(pending):
            try:
                await self._audit_refusal(summary.source, summary.role, "rpc",
                                          "denied-condensed", summary.detail())
            except BaseException:
                # Kept for the next round (bounded: a store that stays broken loses the
                # oldest counts, not memory).
                self._unwritten_refusals = pending[i:][-MAX_UNWRITTEN_SUMMARIES:]
                raise
            self._log.warning("rpc refusals condensed", source=summary.source,
                              count=summary.count, audited_per_minute=self._refusals.burst)
        return len(pending)

    async def condense_refusals_loop(self) -> None:
        while True:
            await asyncio.sleep(self._refusals.window_s / 4)
            try:
                await self.audit_condensed_refusals()
            except Exception:  # noqa: BLE001 - the counts stay; the next round retries
                log.exception("condensed refusals not audited")

    def _done(self, method: str, status: str, started: float, *, reason: str | None = None,
              logged: bool = False) -> None:
        latency = time.perf_counter() - started
        if not logged:
            # Gossip and health checks (several a second, no data behind them) log at
            # debug when they succeed: at info they were nearly every line of the log.
            emit = self._log.debug if method in QUIET_METHODS and status == "OK" \
                else self._log.info
            emit("rpc", status=status, latency_ms=round(latency * 1000, 3),
                 **({"reason": reason} if reason else {}))
        if self._observe:
            self._observe(method, status, latency)
        structlog.contextvars.clear_contextvars()

    def _wrap_unary(self, method: str, behavior: Callable[..., Awaitable[Any]]) -> Any:
        async def wrapper(request: Any, context: grpc.aio.ServicerContext) -> Any:
            started = time.perf_counter()
            await self._enter(method, context)
            try:
                response = await behavior(request, context)
            except grpc.aio.AbortError:
                self._done(method, _status_name(context), started)
                raise
            except Exception as exc:  # noqa: BLE001 - this is the one place errors are mapped
                await self._fail(context, method, exc, started)
            self._done(method, "OK", started)
            return response

        return wrapper

    def _wrap_stream(self, method: str, behavior: Callable[..., Any]) -> Any:
        if not inspect.isasyncgenfunction(behavior):
            # Streaming handlers written with context.write() (e.g. grpc health's Watch)
            # are plain coroutines; grpc forbids mixing write() with an async generator.
            return self._wrap_unary(method, behavior)

        async def wrapper(request: Any, context: grpc.aio.ServicerContext) -> Any:
            started = time.perf_counter()
            await self._enter(method, context)
            try:
                async for item in behavior(request, context):
                    yield item
            except grpc.aio.AbortError:
                self._done(method, _status_name(context), started)
                raise
            except Exception as exc:  # noqa: BLE001
                await self._fail(context, method, exc, started)
            self._done(method, "OK", started)

        return wrapper


# A refusal's reason often quotes the request (a job id, a catalog name, a gossip sender)
# and the audit log keeps every refusal for good: a caller must not be able to make an
# entry megabytes long.
MAX_AUDIT_TEXT = 2000


def _cut(value: Any) -> Any:
    return value[:MAX_AUDIT_TEXT] + "…" if isinstance(value, str) \
        and len(value) > MAX_AUDIT_TEXT else value


def _bounded(audit: Callable[[str, str, str, str, dict[str, Any]], Awaitable[Any]]
             ) -> Callable[[str, str, str, str, dict[str, Any]], Awaitable[Any]]:
    async def bounded(actor: str, role: str, action: str, decision: str,
                      detail: dict[str, Any]) -> Any:
        try:
            return await audit(_cut(actor), _cut(role), action, decision,
                               {k: _cut(v) for k, v in detail.items()})
        except StorageFull:  # the refusal still reaches its caller; its entry is said lost
            log.warning("refusal not audited: state volume full", actor=_cut(actor))
    return bounded


def _source(name: str, role: str) -> str:
    """Whom a refusal is counted against: the certificate's identity when it was verified,
    else the remote host (the port changes with every connection)."""
    if role in ("anonymous", "unverified", "unparseable-cert"):
        host, sep, port = name.rpartition(":")
        return host if sep and port.isdigit() else name
    return f"{role}/{name}"


def _status_name(context: grpc.aio.ServicerContext) -> str:
    code = context.code()
    return code.name if isinstance(code, grpc.StatusCode) else "ABORTED"
