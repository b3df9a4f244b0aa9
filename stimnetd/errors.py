"""The daemon's error vocabulary.

Domain modules raise these; one interceptor maps `code` (a gRPC status name, kept as a
string so domain code never imports grpc) to the wire. Messages are shown to callers:
they name the rule and the threshold, never a data value.
"""

from __future__ import annotations

# Trailing metadata of a refused call: the error's class name (Overloaded, BudgetExhausted,
# …), so a client can tell apart refusals that share a status code.
ERROR_KIND_KEY = "x-stimnet-error"


class StimnetError(Exception):
    code = "INTERNAL"


class InvalidRequest(StimnetError):
    code = "INVALID_ARGUMENT"


class NotFound(StimnetError):
    code = "NOT_FOUND"


class PermissionDenied(StimnetError):
    code = "PERMISSION_DENIED"


class Unauthenticated(StimnetError):
    code = "UNAUTHENTICATED"


class Refused(StimnetError):
    """A privacy or site policy refused the request; the message says which and why."""

    code = "FAILED_PRECONDITION"


class BudgetExhausted(StimnetError):
    """The privacy budget cannot cover the request; `policy` names the rule for the audit
    log, as a PrivacyRefusal's does."""

    code = "RESOURCE_EXHAUSTED"
    policy = "budget"


class Overloaded(StimnetError):
    """A per-caller limit on work in flight at this node; the message names the limit."""

    code = "RESOURCE_EXHAUSTED"


class Conflict(StimnetError):
    code = "FAILED_PRECONDITION"


class Replayed(Conflict):
    """A signed request whose nonce this site has already seen."""


class Unavailable(StimnetError):
    code = "UNAVAILABLE"
