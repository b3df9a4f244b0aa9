"""The daemon's TLS front: client TLS terminated in code we control, so every caller is
answered with a gRPC status and audited — including callers the TLS layer would reject.

Why: gRPC Python can only "require and verify" client certificates (no verify callback,
grpc/grpc#32635), so a caller with no certificate, one from another CA or an expired one
would be cut off in the handshake: the client sees UNAVAILABLE and the node cannot audit
it. Here the handshake asks for a client certificate and accepts whatever is presented
(the TLS layer still proves the caller holds its key); the front then decides, with
`pki.verify_chain`, and records a verdict for the connection. Plaintext HTTP/2 goes to
the in-process gRPC server over a unix socket in a private (0700) directory; our end of
each such connection is bound to an unguessable abstract name, which gRPC reports as the
call's peer, and the guard looks the verdict up by it (see `verdict_for`). Unverified
callers are refused with UNAUTHENTICATED — in an RPC, so the refusal has a method, a
status and an audit entry. A connection closed before any call could be made on it (its
handshake failed or timed out, or it waited too long for a handshake slot) has no status
to get, but is audited too, under the same per-source budget (`on_refused`, Guard.refuse_connection).
The verdict is the only path to an identity: a process that reaches the inner socket some
other way has no verdict and is refused too.

The cost is one extra copy of each byte through the event loop (bench/rpc.py measures
it); `[tls] terminate = "grpc"` switches back to gRPC's own TLS for a site that prefers
the speed and accepts unaudited handshake refusals.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import socket
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, cast

import structlog
from cryptography import x509
from cryptography.hazmat.primitives.serialization import load_pem_private_key
from OpenSSL import SSL

from stimnet.errors import HANDSHAKE_LIMIT_ALERT
from stimnet.pki import Identity, PkiError, identity_from_cert, verify_chain
from stimnetd.handshake_slots import Admission, HandshakeSlots

log = structlog.get_logger("stimnetd.tlsfront")

# One TLS record carries at most 16 KiB of plaintext; pyOpenSSL allocates a buffer of the
# requested size per call, and above malloc's mmap threshold (128 KiB) that costs syscalls.
_RECORD = 16 * 1024
_BIO_READ = 64 * 1024
_NAME_PREFIX = "stimnet-front-"
# A peer that opens a connection and never finishes the handshake holds a slot: bound how
# long, and how many such connections there may be at once, in all and from one source
# address; beyond that, new connections wait for a slot, at most `HANDSHAKE_WAIT_S` and as
# many as there are slots in all (handshake_slots.py). Defaults of `[tls]` in the config.
HANDSHAKE_TIMEOUT_S = 10.0
HANDSHAKE_WAIT_S = 10.0
MAX_HANDSHAKING = 256
MAX_HANDSHAKING_PER_HOST = 32
# A connection refused for the limits gets this fatal alert in place of a ServerHello, and
# then an orderly close, so the client can tell "busy" from "certificate refused" (a reset
# during the handshake says neither).
_LIMIT_ALERT = bytes([0x15, 0x03, 0x03, 0x00, 0x02, 0x02, HANDSHAKE_LIMIT_ALERT])
# What a connection waiting for a slot may send before it is reset (a ClientHello is a
# few hundred bytes; with many post-quantum key shares, a few KiB).
_EARLY_MAX = 64 * 1024
# How long a refused connection may take to read the alert and hang up before it is reset,
# and how many may be doing so at once (per slot in all), beyond which they are reset.
_LINGER_S = 2.0
_LINGERING_PER_SLOT = 4


@dataclass(frozen=True)
class Verdict:
    """What the front decided about one client connection."""

    remote: str
    identity: Identity | None = None
    refusal: str | None = None
    # Who the refused caller claims to be, for the audit log only (never trusted).
    claimed_name: str = ""
    claimed_role: str = "anonymous"


def judge(chain: list[x509.Certificate], ca_cert: x509.Certificate, remote: str,
          now: datetime | None = None) -> Verdict:
    if not chain:
        return Verdict(remote, refusal="a client certificate issued by the federation CA "
                                       "is required (none was presented)")
    leaf = chain[0]
    try:
        claimed = identity_from_cert(leaf)
        claimed_name, claimed_role = claimed.name, claimed.role
    except PkiError:
        claimed_name, claimed_role = leaf.subject.rfc4514_string(), "unparseable-cert"
    try:
        identity = verify_chain(leaf, ca_cert, now=now or datetime.now(UTC))
    except PkiError as exc:
        return Verdict(remote, refusal=str(exc), claimed_name=claimed_name,
                       claimed_role=claimed_role)
    return Verdict(remote, identity=identity)


def server_context(ca_pem: bytes, cert_pem: bytes, key_pem: bytes) -> SSL.Context:
    ctx = SSL.Context(SSL.TLS_SERVER_METHOD)
    ctx.set_min_proto_version(SSL.TLS1_2_VERSION)
    ctx.set_options(SSL.OP_NO_COMPRESSION | SSL.OP_NO_RENEGOTIATION | SSL.OP_CIPHER_SERVER_PREFERENCE)
    certs = x509.load_pem_x509_certificates(cert_pem)
    ctx.use_certificate(certs[0])
    for extra in certs[1:]:
        ctx.add_extra_chain_cert(extra)
    ctx.use_privatekey(load_pem_private_key(key_pem, password=None))  # type: ignore[arg-type]
    ctx.check_privatekey()
    # Ask for a certificate naming our CA, accept whatever comes: the decision is made
    # after the handshake, by `judge`, so that it can be answered and audited. OpenSSL
    # still checks the CertificateVerify signature, i.e. that the caller holds the key.
    ctx.set_verify(SSL.VERIFY_PEER, lambda *_: True)
    for ca in x509.load_pem_x509_certificates(ca_pem):
        ctx.add_client_ca(ca)
    ctx.set_alpn_select_callback(_select_h2)
    return ctx


def _select_h2(_conn: SSL.Connection, offered: list[bytes]) -> bytes:
    # pyOpenSSL's "no overlap" sentinel is of a private type.
    return b"h2" if b"h2" in offered else SSL.NO_OVERLAPPING_PROTOCOLS  # type: ignore[return-value]


class TlsFront:
    """Listens on the public address; forwards each client, its verdict recorded, to the
    in-process gRPC server's unix socket."""

    def __init__(self, ca_pem: bytes, cert_pem: bytes, key_pem: bytes, *,
                 handshake_timeout_s: float = HANDSHAKE_TIMEOUT_S,
                 handshake_wait_s: float = HANDSHAKE_WAIT_S,
                 max_handshaking: int = MAX_HANDSHAKING,
                 max_handshaking_per_host: int = MAX_HANDSHAKING_PER_HOST) -> None:
        self.handshake_timeout_s = handshake_timeout_s
        self.handshake_wait_s = handshake_wait_s
        self.slots = HandshakeSlots(max_handshaking, max_handshaking_per_host,
                                    max_waiting=max_handshaking)
        self._inner = ""
        self._ca_cert = x509.load_pem_x509_certificate(ca_pem)
        self._ctx = server_context(ca_pem, cert_pem, key_pem)
        self._server: asyncio.Server | None = None
        self._verdicts: dict[str, Verdict] = {}
        self._conns: set[_Client] = set()
        self.refusing = 0  # connections told of the limits, not yet closed
        # Told (remote "host:port", reason) of each connection closed before a call could
        # be made on it (handshake failed or timed out, waited too long for a slot): the daemon
        # audits these (Guard.refuse_connection). Unset (the front on its own), they are
        # logged.
        self.on_refused: Callable[[str, str], None] | None = None

    def reload(self, ca_pem: bytes, cert_pem: bytes, key_pem: bytes) -> None:
        """New connections use the new material; open ones keep theirs."""
        self._ctx = server_context(ca_pem, cert_pem, key_pem)
        self._ca_cert = x509.load_pem_x509_certificate(ca_pem)

    async def start(self, host: str, port: int, inner: str) -> int:
        """Listen on host:port, forwarding to the gRPC server's unix socket at `inner`;
        returns the bound port. Raises OSError if it cannot listen."""
        self._inner = inner
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(lambda: _Client(self), host, port,
                                                reuse_address=True, backlog=512)
        return self._server.sockets[0].getsockname()[1]

    def verdict_for(self, peer: str) -> Verdict | None:
        """The verdict for a gRPC peer string (``unix-abstract:<our name>``)."""
        return self._verdicts.get(peer)

    def stop_accepting(self) -> None:
        if self._server is not None:
            self._server.close()

    def close(self) -> None:
        self.stop_accepting()
        for conn in list(self._conns):
            conn.abort()

    @property
    def open_connections(self) -> int:
        return len(self._conns)

    @property
    def handshaking(self) -> int:
        """Connections handshaking now (waiting ones not included)."""
        return self.slots.handshaking


class _Client(asyncio.Protocol):
    """One client connection: TLS on the outside, plaintext to the inner gRPC server."""

    def __init__(self, front: TlsFront) -> None:
        self._front = front
        self._tls = SSL.Connection(front._ctx, None)
        self._tls.set_accept_state()
        self._transport: asyncio.Transport | None = None
        self._inner: _Inner | None = None
        self._pending: list[bytes] = []
        self._early: list[bytes] = []  # received while waiting for a handshake slot
        self._handshaken = False
        self._in_slot = False  # holds one of the front's handshake slots
        self._refusing = False  # refused for the limits: its input is discarded
        self._closed = False
        self._remote = "?"
        self._host = "?"
        self._timer: asyncio.TimerHandle | None = None

    # -- outside ------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]  # uvloop's is no subclass
        peer = transport.get_extra_info("peername")
        if peer:
            host = f"[{peer[0]}]" if ":" in peer[0] else peer[0]
            self._remote = f"{host}:{peer[1]}"
            self._host = str(peer[0])
        front = self._front
        front._conns.add(self)
        admission = front.slots.admit(self, self._host, self._start_handshake)
        if admission is Admission.NOW:
            self._start_handshake()
        elif admission is Admission.WAIT:
            # Its ClientHello waits in the socket for its turn (uvloop may deliver what
            # came before the pause: `data_received` holds that).
            cast(asyncio.Transport, transport).pause_reading()
            self._timer = asyncio.get_running_loop().call_later(
                front.handshake_wait_s, self._waited_too_long)
        else:
            self._refuse_for_limits("the waiting room is full")

    def _start_handshake(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._in_slot = True
        self._timer = asyncio.get_running_loop().call_later(self._front.handshake_timeout_s,
                                                            self._timeout)
        if self._transport is not None and not self._closed:
            self._transport.resume_reading()
            if self._early:
                early, self._early = b"".join(self._early), []
                self.data_received(early)

    def _waited_too_long(self) -> None:
        self._front.slots.withdraw(self)
        self._refuse_for_limits(f"waited {self._front.handshake_wait_s:g}s for a slot")

    def _refuse_for_limits(self, why: str) -> None:
        """Answer the ClientHello with the limit alert and close in order; reset only a
        peer that does not hang up in time."""
        slots = self._front.slots
        self._refused(f"too many unfinished TLS handshakes (limits {slots.max_in_all} in all, "
                      f"{slots.max_per_host} from one host) and {why}")
        transport = self._transport
        if transport is None or self._front.refusing >= _LINGERING_PER_SLOT * slots.max_in_all:
            # A flood: a reset costs nothing. An honest client hangs up as soon as it has
            # read the alert, so only a burst this large, or one that does not, gets here.
            self.abort()
            return
        self._refusing = True
        self._front.refusing += 1
        transport.resume_reading()  # and discard: unread bytes would turn the close into a reset
        transport.write(_LIMIT_ALERT)
        if transport.can_write_eof():
            transport.write_eof()
        self._timer = asyncio.get_running_loop().call_later(_LINGER_S, self.abort)

    def data_received(self, data: bytes) -> None:
        if self._refusing:
            return
        if not self._in_slot and not self._handshaken:
            self._early.append(data)
            if sum(map(len, self._early)) > _EARLY_MAX:
                self.abort()  # no ClientHello is this long
            return
        self._tls.bio_write(data)
        if not self._handshaken:
            try:
                self._tls.do_handshake()
            except SSL.WantReadError:
                self._flush()
                return
            except SSL.Error as exc:
                self._flush()
                self._refused(f"TLS handshake failed: {_ssl_reason(exc)}")
                self.abort()
                return
            self._handshaken = True
            self._leave_slot()
            if self._timer is not None:
                self._timer.cancel()
            self._flush()
            self._connect_inner()
        self._pump()

    def _pump(self) -> None:
        while True:
            try:
                chunk = self._tls.recv(_RECORD)
            except SSL.WantReadError:
                break
            except SSL.ZeroReturnError:
                self._close_inner()
                break
            except SSL.Error as exc:
                log.info("tls connection error", remote=self._remote, reason=_ssl_reason(exc))
                self.abort()
                return
            if self._inner is not None and self._inner.transport is not None:
                self._inner.transport.write(chunk)
            else:
                self._pending.append(chunk)
        self._flush()

    def _flush(self) -> None:
        if self._transport is None or self._transport.is_closing():
            return
        out = []
        while True:
            try:
                chunk = self._tls.bio_read(_BIO_READ)
            except SSL.WantReadError:
                break
            out.append(chunk)
            if len(chunk) < _BIO_READ:  # drained: spare the exception
                break
        if out:
            self._transport.write(b"".join(out) if len(out) > 1 else out[0])

    def send(self, plain: bytes) -> None:
        if self._closed:
            return
        try:
            self._tls.sendall(plain)
        except SSL.Error as exc:
            log.info("tls connection error", remote=self._remote, reason=_ssl_reason(exc))
            self.abort()
            return
        self._flush()

    def eof_received(self) -> bool | None:
        self._close_inner()
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        self._closed = True
        if self._timer is not None:
            self._timer.cancel()
        self._front._conns.discard(self)
        self._front.slots.withdraw(self)
        if self._refusing:
            self._refusing = False
            self._front.refusing -= 1
        self._leave_slot()
        self._close_inner()

    def _leave_slot(self) -> None:
        if self._in_slot:
            self._in_slot = False
            self._front.slots.release(self._host)

    def pause_writing(self) -> None:
        if self._inner is not None and self._inner.transport is not None:
            self._inner.transport.pause_reading()

    def resume_writing(self) -> None:
        if self._inner is not None and self._inner.transport is not None:
            self._inner.transport.resume_reading()

    def _timeout(self) -> None:
        if not self._handshaken:
            self._refused(f"no TLS handshake within {self._front.handshake_timeout_s:g}s")
            self.abort()

    def _refused(self, reason: str) -> None:
        hook = self._front.on_refused
        if hook is None:
            log.warning("tls connection refused", remote=self._remote, reason=reason)
        else:
            hook(self._remote, reason)

    def abort(self) -> None:
        self._closed = True
        if self._transport is not None:
            self._transport.abort()
        if self._inner is not None and self._inner.transport is not None:
            self._inner.transport.abort()

    def shutdown(self) -> None:
        """The inner server closed: close TLS cleanly after what is buffered."""
        if self._closed or self._transport is None:
            return
        self._closed = True
        with contextlib.suppress(SSL.Error):
            self._tls.shutdown()
        self._flush()
        self._transport.close()

    # -- inside -------------------------------------------------------------------

    def _connect_inner(self) -> None:
        # Server side, OpenSSL's peer chain omits the leaf; the leaf is what we judge (our
        # CA issues leaves directly).
        leaf = self._tls.get_peer_certificate(as_cryptography=True)
        chain = [leaf] if leaf is not None else []
        verdict = judge(chain, self._front._ca_cert, self._remote)
        if verdict.refusal:
            log.info("tls caller unverified", remote=self._remote, reason=verdict.refusal)
        self._inner = _Inner(self, verdict)
        task = asyncio.get_running_loop().create_task(self._open_inner(self._inner))
        task.add_done_callback(self._inner_connected)

    async def _open_inner(self, inner: _Inner) -> Any:
        loop = asyncio.get_running_loop()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            # Our end gets an unguessable abstract name: the server side sees it as the
            # peer, which is how the guard finds this connection's verdict.
            sock.bind(f"\0{_NAME_PREFIX}{secrets.token_hex(16)}")
            sock.setblocking(False)
            await loop.sock_connect(sock, self._front._inner)
            return await loop.create_unix_connection(lambda: inner, sock=sock)
        except BaseException:
            sock.close()
            raise

    def _inner_connected(self, task: asyncio.Task[Any]) -> None:
        if task.cancelled() or task.exception() is not None:
            reason = "cancelled" if task.cancelled() else str(task.exception())
            log.error("inner gRPC server unreachable", reason=reason)
            self.abort()
        elif self._closed:
            task.result()[0].abort()

    def inner_ready(self, transport: asyncio.Transport) -> None:
        """The inner connection is up (its verdict registered): send what arrived so far,
        in order, before anything `_pump` forwards from now on."""
        for chunk in self._pending:
            transport.write(chunk)
        self._pending.clear()

    def _close_inner(self) -> None:
        if self._inner is not None and self._inner.transport is not None:
            if self._inner.transport.can_write_eof():
                with contextlib.suppress(OSError, RuntimeError):
                    self._inner.transport.write_eof()
                    return
            self._inner.transport.close()


class _Inner(asyncio.Protocol):
    def __init__(self, client: _Client, verdict: Verdict) -> None:
        self._client = client
        self._verdict = verdict
        self.transport: asyncio.Transport | None = None
        self._peer: str | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        # Registered before a single byte is sent, so the server cannot see a request on
        # this connection without its verdict in place.
        name = transport.get_extra_info("sockname")
        self._peer = f"unix-abstract:{name[1:].decode() if isinstance(name, bytes) else name[1:]}"
        self._client._front._verdicts[self._peer] = self._verdict
        self._client.inner_ready(self.transport)  # type: ignore[arg-type]  # just set

    def data_received(self, data: bytes) -> None:
        self._client.send(data)

    def pause_writing(self) -> None:
        if self._client._transport is not None:
            self._client._transport.pause_reading()

    def resume_writing(self) -> None:
        if self._client._transport is not None:
            self._client._transport.resume_reading()

    def eof_received(self) -> bool | None:
        self._client.shutdown()
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        if self._peer is not None:
            self._client._front._verdicts.pop(self._peer, None)
        self._client.shutdown()


def _ssl_reason(exc: SSL.Error) -> str:
    args = exc.args[0] if exc.args else None
    if isinstance(args, list) and args and isinstance(args[0], tuple):
        return "; ".join(str(part[-1]) for part in args)
    return str(exc) or type(exc).__name__
