"""What the servicers and the metrics may ask about this node: its settings, catalogs,
members and a status summary. Built by the daemon from the components it holds."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from typing import Any

from stimnet.states import WAITING_STATES
from stimnetd import __version__
from stimnetd.catalog import CatalogSet
from stimnetd.config import Config
from stimnetd.federation.fanout import SiteGrid
from stimnetd.gossip.swim import Swim
from stimnetd.store import SiteStore
from stimnetd.tls import ServerTls


class NodeState:
    """What servicers may ask about this node; a facade over the components."""

    def __init__(self, *, config: Config, catalogs: CatalogSet, store: SiteStore, tls: ServerTls,
                 membership: Callable[[], Swim | None], started_at: Callable[[], float],
                 grids: Callable[[str], Awaitable[list[SiteGrid]]]) -> None:
        self._config = config
        self.catalogs = catalogs
        self._store = store
        self._tls = tls
        self._membership = membership
        self._started_at = started_at
        # Every site's grid for a catalog, peers asked (Fanout.site_grids): `describe`.
        self.site_grids = grids

    name = property(lambda self: self._config.node.name)
    version = property(lambda self: __version__)
    k_min = property(lambda self: self._config.node.k_min)
    dp_policy = property(lambda self: self._config.privacy.dp)
    script_policy = property(lambda self: self._config.scripts.policy)
    privacy = property(lambda self: self._config.privacy)

    async def catalog_remaining(self) -> dict[str, float]:
        """Epsilon left per catalog under the site-wide cap (empty without one)."""
        cap = self._config.privacy.catalog_budget_epsilon
        if cap is None:
            return {}
        spent = await self._store.spent_by_catalog()
        return {c: max(cap - spent.get(c, 0.0), 0.0) for c in self.catalogs.names()}
    started_at = property(lambda self: self._started_at())

    def members(self) -> list[Any]:
        membership = self._membership()
        return membership.members() if membership is not None else []

    def remote_members(self) -> list[Any]:
        return [m for m in self.members() if m.name != self.name and m.status == "alive"]

    async def status(self) -> dict[str, Any]:
        peers: dict[str, int] = {}
        for m in self.members():
            if m.name != self.name:  # the node itself is no peer
                peers[m.status] = peers.get(m.status, 0) + 1
        jobs = await self._store.count_jobs_by_state()
        return {
            "name": self.name, "version": __version__,
            "uptime_s": time.time() - self.started_at,
            "peers_by_status": peers, "jobs_by_state": jobs,
            "queue_depth": sum(jobs.get(state, 0) for state in WAITING_STATES),
            "epsilon_spent": await self._store.spent_by_catalog(),
            "cert_expires_at": self._tls.material.identity.not_after.timestamp(),
        }
