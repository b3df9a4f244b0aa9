"""The client's errors are the classes of `stimnet.errors`, rebuilt from a failed call.

A node sends a refusal's class name in the trailing metadata `ERROR_KIND_KEY`, so a
notebook catches the `BudgetExhausted` the site raised. `translated` is the one place
where grpc's and the multiplexer's exceptions become those classes; a call refused on the
Session stream ends with a CallStatus of the same (code, message, kind), and
`from_call_status` maps both.

A status without a kind never passed a node's interceptor: grpc's transport produced it.
Then UNAVAILABLE and DEADLINE_EXCEEDED get messages naming the node's address and what to
do. grpc's details (BoringSSL's reason, which this reads) tell apart: the node turning us
away for its handshake limits (its alert `HANDSHAKE_LIMIT_ALERT`: `HandshakeLimited`), the
node refusing our certificate (an alert naming it), our refusing the node's (verification
failed, or it does not name the host), and a connection dropped mid-handshake without a
word, which says neither for certain.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import grpc

from stimnet import multiplex
from stimnet.errors import (
    ERROR_KIND_KEY,
    BudgetExhausted,
    ConfigProblem,
    Conflict,
    ConnectionFailed,
    DeadlineExceeded,
    HandshakeLimited,
    InvalidRequest,
    JobFailed,
    NotFound,
    Overloaded,
    PermissionDenied,
    Refused,
    StimnetError,
    Unauthenticated,
    Unavailable,
    from_status,
)

# The names the client's callers catch (README): the same classes under the words a
# researcher reads, so `except ClientError` catches every error either side raises.
ClientError = StimnetError
NotAuthenticated = Unauthenticated

__all__ = [
    "BudgetExhausted", "ClientError", "ConfigProblem", "Conflict", "ConnectionFailed",
    "DeadlineExceeded", "HandshakeLimited", "InvalidRequest", "JobFailed", "NotAuthenticated", "NotFound",
    "Overloaded", "PermissionDenied", "Refused", "StimnetError", "Unauthenticated",
    "Unavailable", "deadline_exceeded", "from_call_status", "from_rpc_error", "translated",
]


def from_call_status(code: str, details: str, kind: str, address: str) -> StimnetError:
    """The error a failed call's status stands for.

    Args:
        code: the gRPC status code's name, e.g. ``"RESOURCE_EXHAUSTED"``.
        details: the status message.
        kind: the node's error class name (``x-stimnet-error``), or ``""``.
        address: the node the call went to, for the messages of transport failures.
    """
    if not kind and code == "UNAVAILABLE":
        return transport_failure(details, address)
    if not kind and code == "DEADLINE_EXCEEDED":
        return deadline_exceeded(address)
    return from_status(code, details or code, kind)


# BoringSSL's names of the alerts a TLS server sends when it refuses a client certificate.
_CERT_ALERTS = ("alert_bad_certificate", "alert_unknown_ca", "alert_certificate_expired",
                "alert_certificate_revoked", "alert_certificate_unknown",
                "alert_unsupported_certificate", "alert_certificate_required",
                "alert_access_denied")
# How grpc reports a connection the server closed or reset while it was being set up.
_DROPPED = ("handshake read failed", "handshake write failed", "socket closed",
            "connection reset", "end of tcp stream")


def transport_failure(details: str, address: str) -> ConnectionFailed:
    """The error of a call grpc failed UNAVAILABLE before it reached the node, from the
    details grpc gave."""
    lowered = details.lower()
    if "alert_user_cancel" in lowered:  # HANDSHAKE_LIMIT_ALERT, in BoringSSL's words
        return HandshakeLimited(
            f"the node at {address} is limiting concurrent TLS handshakes (by default 32 at "
            f"once from one address and 256 in all) and turned this connection away after "
            f"it waited for a turn: retry with backoff, or open fewer connections at once "
            f"(one client runs many queries); its admin can raise [tls] "
            f"max_handshakes_per_host or handshake_wait_s")
    if "hostname verification" in lowered:
        return ConnectionFailed(
            f"TLS handshake with {address} failed: we refused the node's certificate, which "
            f"does not name the host in that address (use the name or IP address its "
            f"certificate was issued for)")
    if "certificate_verify_failed" in lowered:
        why = _after(details, "CERTIFICATE_VERIFY_FAILED:")
        return ConnectionFailed(
            f"TLS handshake with {address} failed: we refused the node's certificate "
            f"({why or 'it did not verify'}): it is not issued by the CA file of our client "
            f"config, or it has expired")
    if alert := next((a for a in _CERT_ALERTS if a in lowered), None):
        return ConnectionFailed(
            f"TLS handshake with {address} failed: the node refused our certificate "
            f"({alert.removeprefix('alert_').replace('_', ' ')}): not issued by the "
            f"federation's CA, expired, or revoked")
    if "failed to connect" in lowered and any(d in lowered for d in _DROPPED):
        return ConnectionFailed(
            f"the node at {address} closed the connection during the TLS handshake without "
            f"saying why: it may be limiting concurrent handshakes from one address (retry "
            f"with backoff, or open fewer connections at once), or, if it terminates TLS in "
            f"gRPC ([tls] terminate = \"grpc\"), it refused our certificate (not issued by "
            f"the federation's CA, expired, or revoked)")
    if "handshake" in lowered or "ssl" in lowered:
        return ConnectionFailed(f"TLS handshake with {address} failed: "
                                f"{details.partition('last error:')[2].strip() or details}")
    first = details.splitlines()[0] if details else "unavailable"
    return ConnectionFailed(f"cannot reach node at {address}: {first}")


def _after(details: str, marker: str) -> str:
    """The words after `marker` in grpc's details, up to the next colon."""
    _, found, rest = details.partition(marker)
    return rest.split(":")[0].strip() if found else ""


def from_rpc_error(exc: grpc.RpcError, address: str) -> StimnetError:
    """A failed grpc call (`grpc.RpcError`) as the error its status stands for."""
    code = exc.code() if hasattr(exc, "code") else None
    details = (exc.details() if hasattr(exc, "details") else "") or ""
    return from_call_status(code.name if code is not None else "UNKNOWN", details,
                            _error_kind(exc), address)


def deadline_exceeded(address: str) -> DeadlineExceeded:
    """The error of a call the node did not answer within its deadline."""
    return DeadlineExceeded(f"node at {address} did not answer in time")


@contextlib.contextmanager
def translated(address: str) -> Iterator[None]:
    """Raise grpc's and the Session stream's exceptions inside as `stimnet.errors` classes.

    Args:
        address: the node the calls inside go to.
    """
    try:
        yield
    except grpc.RpcError as exc:
        raise from_rpc_error(exc, address) from None
    except multiplex.StreamBroken as exc:
        # The job may have run: it is not sent again.
        raise ConnectionFailed(f"lost the session with the node at {address}: {exc}") from None
    except multiplex.NotMultiplexed:
        raise ConnectionFailed(f"the node at {address} does not serve JobService/Session "
                               "(is it a StimNet node?)") from None


def _error_kind(exc: grpc.RpcError) -> str:
    """The node's error class a refusal names in its trailing metadata, or ""."""
    trailing = exc.trailing_metadata() if hasattr(exc, "trailing_metadata") else None
    for key, value in trailing or ():
        if key == ERROR_KIND_KEY:
            return value.decode() if isinstance(value, bytes) else str(value)
    return ""
