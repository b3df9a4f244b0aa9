"""Job requests built and checked before anything is sent: a job no node would accept
(epsilon NaN, min_sites 0, SQL outside the query language) is refused here, as
InvalidRequest, and costs no call and no budget."""

from __future__ import annotations

import functools
from typing import Any

from stimnet import signing
from stimnet.errors import InvalidRequest, QueryError
from stimnet.query.spec import QuerySpec
from stimnet.query.sql import parse_sql


def new_request(kind: str, catalog: str, **fields: Any) -> signing.JobRequest:
    """`signing.new_request`, its refusals as InvalidRequest saying nothing was sent."""
    try:
        return signing.new_request(kind, catalog, **fields)
    except InvalidRequest as exc:
        raise InvalidRequest(f"job refused before sending: {exc}") from None


def query_spec(query: str | dict[str, Any], what: str) -> QuerySpec:
    """A QuerySpec from SQL or a spec dict; InvalidRequest naming `what` if it is not one.

    Args:
        query: restricted SQL, or a spec as `QuerySpec.to_dict` writes it.
        what: what the query is for, in the error ("query", "declared outputs").
    """
    try:
        return _parsed(query) if isinstance(query, str) else QuerySpec.from_dict(query)
    except QueryError as exc:
        raise InvalidRequest(f"{what} refused before sending: {exc}") from None


@functools.lru_cache(maxsize=256)
def _parsed(sql: str) -> QuerySpec:
    # Specs are immutable; a notebook re-running a query need not re-parse its SQL.
    return parse_sql(sql)
