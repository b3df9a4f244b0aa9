"""Errors raised by the query engine; the RPC layer maps them to status codes in one place."""

from __future__ import annotations


class QueryError(Exception):
    """A query the engine refuses: malformed, unsupported, or wrong for this catalog.

    The message names the offending part and the rule, because it is shown to the
    researcher verbatim (it never contains a data value, only names from the query).
    """


class IncompatiblePartials(Exception):
    """Sites returned partials that cannot be summed (different grids, edges, kinds).

    Raised at the entry node; it means the sites disagree on catalog metadata, not that
    the researcher asked something wrong.
    """
