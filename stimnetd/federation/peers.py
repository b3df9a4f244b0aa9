"""Who this node asks for a federated job's shares: its configured peers, or, once gossip
runs, the live members holding the catalog."""

from __future__ import annotations

from collections.abc import Callable

from stimnetd.federation.fanout import Target
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
