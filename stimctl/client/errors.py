"""The client's errors are the classes of `stimnet.errors`, rebuilt from a failed call.

A node sends a refusal's class name in the trailing metadata `ERROR_KIND_KEY`, so a
notebook catches the `BudgetExhausted` the site raised. `translated` is the one place
where grpc's and the multiplexer's exceptions become those classes; a call refused on the
Session stream ends with a CallStatus of the same (code, message, kind), and
`from_call_status` maps both.

A status without a kind never passed a node's interceptor: grpc's transport produced it.
Then UNAVAILABLE and DEADLINE_EXCEEDED get messages naming the node's address, which is
all a researcher can act on (grpc's own details name sockets and TLS alerts).
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
    "DeadlineExceeded", "InvalidRequest", "JobFailed", "NotAuthenticated", "NotFound",
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
        lowered = details.lower()
        if "handshake" in lowered or "ssl" in lowered:
            return ConnectionFailed(
                f"TLS handshake with {address} failed: the node refused our certificate or "
                f"we refused its certificate (wrong CA, expired, or wrong host)")
        first = details.splitlines()[0] if details else "unavailable"
        return ConnectionFailed(f"cannot reach node at {address}: {first}")
    if not kind and code == "DEADLINE_EXCEEDED":
        return deadline_exceeded(address)
    return from_status(code, details or code, kind)


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
