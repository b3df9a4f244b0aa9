"""The queue of membership updates waiting to be piggybacked on probes."""

from __future__ import annotations

import heapq
import itertools

from stimnetd.gossip.membership import Member


class BroadcastQueue:
    """Recent updates awaiting piggybacking, at most one per member (newer news about a
    member replaces older), each sent `limit` times then dropped, like memberlist's
    TransmitLimitedQueue."""

    def __init__(self) -> None:
        self._items: dict[str, tuple[Member, int, int]] = {}
        self._seq = itertools.count()

    def __len__(self) -> int:
        return len(self._items)

    def enqueue(self, m: Member) -> None:
        self._items[m.name] = (m, 0, next(self._seq))

    def take(self, count: int, limit: int, exclude: str | None = None) -> list[Member]:
        """The `count` least-sent updates, newest first among equals."""
        candidates = (item for name, item in self._items.items() if name != exclude)
        chosen = heapq.nsmallest(count, candidates, key=lambda item: (item[1], -item[2]))
        for m, sent, seq in chosen:
            if sent + 1 >= limit:
                del self._items[m.name]
            else:
                self._items[m.name] = (m, sent + 1, seq)
        return [m for m, _, _ in chosen]
