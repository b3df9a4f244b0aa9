"""One error vocabulary on both sides of the wire.

The daemon raises these; its one interceptor maps `code` (a gRPC status name, kept as a
string so domain code never imports grpc) to the status, and sends the class name in the
trailing metadata `ERROR_KIND_KEY`. The client rebuilds the same class from (code, kind)
with `from_status`, so a notebook catches `BudgetExhausted` whichever node raised it.
Messages are shown to callers: they name the rule and the threshold, never a data value.

A class the client does not know (a daemon-internal subclass) comes back as the nearest
class registered for its status code.
"""

from __future__ import annotations

from typing import Any, ClassVar, TypeVar

# Trailing metadata of a refused call: the error's class name (Overloaded, BudgetExhausted,
# …), so a client can tell apart refusals that share a status code.
ERROR_KIND_KEY = "x-stimnet-error"

E = TypeVar("E", bound="type[StimnetError]")


class StimnetError(Exception):
    """Base of every error either side raises; `str()` is one line for a human."""

    code: ClassVar[str] = "INTERNAL"


KINDS: dict[str, type[StimnetError]] = {}
# The class a status code stands for when its kind is unknown (or absent).
BY_CODE: dict[str, type[StimnetError]] = {}


def wire_kind(cls: E) -> E:
    """Register `cls` by name, so it crosses the wire as itself."""
    KINDS[cls.__name__] = cls
    return cls


def _default_for_code(cls: E) -> E:
    BY_CODE[cls.code] = cls
    return wire_kind(cls)


@_default_for_code
class InvalidRequest(StimnetError):
    code = "INVALID_ARGUMENT"


@_default_for_code
class NotFound(StimnetError):
    code = "NOT_FOUND"


@_default_for_code
class PermissionDenied(StimnetError):
    code = "PERMISSION_DENIED"


@_default_for_code
class Unauthenticated(StimnetError):
    code = "UNAUTHENTICATED"


@_default_for_code
class Refused(StimnetError):
    """A privacy or site policy refused the request; the message says which and why.

    Every class a node sends as FAILED_PRECONDITION derives from it, and so does
    BudgetExhausted: a caller's `except Refused` catches each refusal of its request."""

    code = "FAILED_PRECONDITION"


@_default_for_code
class BudgetExhausted(Refused):
    """The privacy budget (ε, δ) left cannot cover the request; the message says how much.
    `policy` names the rule for the audit log, as a PrivacyRefusal's does."""

    code = "RESOURCE_EXHAUSTED"
    policy = "budget"


@wire_kind
class Overloaded(StimnetError):
    """A per-caller limit on work in flight at this node; the message names the limit."""

    code = "RESOURCE_EXHAUSTED"


@wire_kind
class StorageFull(StimnetError):
    """The node's state volume is full, or below the free space its operator reserved
    (`[storage] min_free_mb`): it refuses writes (new jobs, releases) and keeps serving
    reads, health, status and audit verification. Retry once the operator has freed space."""

    code = "RESOURCE_EXHAUSTED"


@wire_kind
class StorageQuotaExceeded(StimnetError):
    """The caller's answers stored at this node are at its per-researcher limit
    (`[storage] max_stored_mb_per_researcher`); they shrink as finished jobs expire."""

    code = "RESOURCE_EXHAUSTED"


@wire_kind
class AnswerTooLarge(StimnetError):
    """The query's planned answer (grid × groups × map arrays, known before compute) is
    over the site's `[storage] max_answer_mb`."""

    code = "RESOURCE_EXHAUSTED"


@wire_kind
class Conflict(Refused):
    """The request does not fit the job's state (already decided, no result, replayed)."""


@wire_kind
class Replayed(Conflict):
    """A signed request whose nonce this site has already seen."""


@_default_for_code
class Unavailable(StimnetError):
    code = "UNAVAILABLE"


@_default_for_code
class DeadlineExceeded(StimnetError):
    """The node did not answer within the caller's deadline."""

    code = "DEADLINE_EXCEEDED"


@wire_kind
class QueryError(InvalidRequest):
    """A query the engine refuses: malformed, unsupported, or wrong for this catalog."""


@wire_kind
class DataContractViolation(Refused):
    """The site's data breaks what its catalog declares (an image off the common grid, or
    larger than the declared max_voxels). The privacy layer's sensitivities rest on those
    declarations, so the engine stops rather than compute past them."""

    code = "FAILED_PRECONDITION"


@wire_kind
class IncompatiblePartials(Refused):
    """Sites returned partials that cannot be summed (different grids, edges, kinds).

    Raised at the entry node; it means the sites disagree on catalog metadata, not that
    the researcher asked something wrong.
    """

    code = "FAILED_PRECONDITION"


# -- raised by the client alone (never sent by a node) ---------------------------------


class ConfigProblem(StimnetError):
    """The client's own configuration or key files are missing or unreadable."""

    code = "FAILED_PRECONDITION"


class ConnectionFailed(Unavailable):
    """The node could not be reached, or the TLS handshake with it failed."""


class HandshakeLimited(ConnectionFailed):
    """The node is limiting concurrent TLS handshakes (per source address and in all), and
    this connection was turned away; retry with backoff, or open fewer at once."""


# The TLS alert a node's TLS front sends, in place of a ServerHello, to a connection it
# turns away for its handshake limits: user_canceled, "canceled for some reason unrelated
# to a protocol failure" (RFC 8446 6.1), which no certificate check sends, so the client
# can say `HandshakeLimited` and never "certificate refused".
HANDSHAKE_LIMIT_ALERT = 90


class JobFailed(StimnetError):
    """A job ended without an answer; the message names its final state and why."""

    code = "ABORTED"

    def __init__(self, message: str, job: Any = None) -> None:
        super().__init__(message)
        self.job = job


def from_status(code: str, message: str, kind: str = "") -> StimnetError:
    """The error a failed call's status stands for: its kind's class when known, else the
    class of its status code, else StimnetError."""
    cls = KINDS.get(kind) or BY_CODE.get(code) or StimnetError
    return cls(message)
