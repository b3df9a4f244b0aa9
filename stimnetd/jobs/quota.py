"""Queries running per researcher with this node as their entry, bounded."""

from __future__ import annotations

import collections

from stimnet.errors import Overloaded


class QueryQuota:
    def __init__(self, limit: int) -> None:
        self._limit = limit
        self._running: collections.Counter[str] = collections.Counter()
        self._holders: dict[str, str] = {}  # job id -> the researcher it counts for

    def reserve(self, owner: str) -> None:
        """Take one of `owner`'s places, or refuse. Synchronous, so of concurrent
        submissions no two pass on the same free place."""
        if self._running[owner] >= self._limit:
            # Names only the caller's own count and the node's setting: what to do, and
            # whom to ask, without anything about other researchers' work.
            raise Overloaded(f"you have {self._running[owner]} queries running with this node "
                             f"as their entry, its limit per researcher ([node] "
                             f"max_queries_per_researcher = {self._limit}), shared by every "
                             "client using your certificate; wait for one to finish (the limit "
                             "is on queries running at once, not per time window), run fewer "
                             "at once, or ask this node's admin to raise it")
        self._running[owner] += 1

    def unreserve(self, owner: str) -> None:
        self._running[owner] -= 1
        if not self._running[owner]:
            del self._running[owner]

    def hold(self, job_id: str, owner: str) -> None:
        """The job holds `owner`'s reserved place until `release(job_id)`."""
        self._holders[job_id] = owner

    def release(self, job_id: str) -> None:
        """Give back the job's place (once; later calls do nothing)."""
        if (owner := self._holders.pop(job_id, None)) is not None:
            self.unreserve(owner)
