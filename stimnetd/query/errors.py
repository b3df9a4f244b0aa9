"""Errors raised by the query engine.

They subclass the daemon's error vocabulary so the one RPC interceptor maps them to a
status code; messages are shown to callers verbatim, so they name the rule and the names
in the query, never a data value.
"""

from __future__ import annotations

from stimnetd.errors import InvalidRequest, StimnetError


class QueryError(InvalidRequest):
    """A query the engine refuses: malformed, unsupported, or wrong for this catalog."""


class DataContractViolation(StimnetError):
    """The site's data breaks what its catalog declares (an image off the common grid, or
    larger than the declared max_voxels). The privacy layer's sensitivities rest on those
    declarations, so the engine stops rather than compute past them."""

    code = "FAILED_PRECONDITION"


class IncompatiblePartials(StimnetError):
    """Sites returned partials that cannot be summed (different grids, edges, kinds).

    Raised at the entry node; it means the sites disagree on catalog metadata, not that
    the researcher asked something wrong.
    """

    code = "FAILED_PRECONDITION"
