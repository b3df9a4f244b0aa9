"""stimctl's exit statuses, one per class of error (documented in the README)."""

from __future__ import annotations

from stimctl.client.errors import (
    ConfigProblem,
    InvalidRequest,
    JobFailed,
    NotAuthenticated,
    NotFound,
    Overloaded,
    PermissionDenied,
    Refused,
    Unavailable,
)

# Exit statuses by class of error (README, "stimctl exit statuses"); the first matching
# class wins, so subclasses come before their bases.
EXIT_ERROR = 1        # anything else (e.g. an answer that could not be written)
EXIT_USAGE = 2        # bad arguments, a bad client config, a request refused as invalid
EXIT_AUTH = 3         # not authenticated, or not permitted (role, another node's admin)
EXIT_REFUSED = 4      # a site policy refused (k_min, budget, review), or too busy now
EXIT_FAILED = 5       # the job ran and failed (e.g. fewer than min_sites contributed)
EXIT_NOT_FOUND = 6    # no such job or catalog
EXIT_UNAVAILABLE = 7  # the node could not be reached, or did not answer in time
EXIT_INTERRUPTED = 130
EXIT_CODES: tuple[tuple[type[BaseException], int], ...] = (
    (InvalidRequest, EXIT_USAGE), (ConfigProblem, EXIT_USAGE),
    (NotAuthenticated, EXIT_AUTH), (PermissionDenied, EXIT_AUTH),
    (Refused, EXIT_REFUSED), (Overloaded, EXIT_REFUSED),
    (JobFailed, EXIT_FAILED), (NotFound, EXIT_NOT_FOUND), (Unavailable, EXIT_UNAVAILABLE),
)


def exit_code(exc: BaseException) -> int:
    """The exit status for an error of this class (EXIT_CODES)."""
    for cls, code in EXIT_CODES:
        if isinstance(exc, cls):
            return code
    return EXIT_ERROR
