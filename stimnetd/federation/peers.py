"""Who this node asks for a federated job's shares: its configured peers, or, once gossip
runs, the live members holding the catalog."""

from __future__ import annotations

import time
from collections.abc import Callable

from stimnetd.federation.fanout import Absent, Target
from stimnetd.gossip.swim import Swim


class StaticPeers:
    """Peers from the config, until gossip tells us who holds what."""

    def __init__(self, *, node: str, peers: tuple[str, ...],
                 membership: Callable[[], Swim | None],
                 own_addresses: Callable[[], set[str | None]]) -> None:
        self._node = node
        self._peers = peers
        self._membership = membership
        self._own = own_addresses

    def targets(self, catalog: str) -> list[Target]:
        membership = self._membership()
        if membership is not None:
            return [Target(m.address, m.name) for m in membership.alive_with_catalog(catalog)
                    if m.name != self._node]
        own = self._own()
        return [Target(a) for a in self._peers if a not in own]

    def absent(self, catalog: str) -> list[Absent]:
        """Members gossip knows to hold `catalog` that are not asked (not alive)."""
        membership = self._membership()
        if membership is None:
            return []  # static peers are all asked; a dead one fails in the manifest
        out = []
        for m in membership.members():
            if m.name == self._node or m.status == "alive" or not m.has_catalog(catalog):
                continue
            ago = max(0.0, time.time() - m.last_heard)
            detail = {"left": "left the federation",
                      "dead": "declared dead (no answer to probes)",
                      "suspect": "suspected (missed probes); not asked"}.get(m.status, m.status)
            out.append(Absent(m.name, m.status, f"{detail}; last heard {ago:.0f}s ago"))
        return out
