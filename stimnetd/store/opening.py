"""Which store a node's config names: the SQLite file in its state directory, or the
PostgreSQL database of `[store] url` that the site's replicas share."""

from __future__ import annotations

from stimnetd.config import Config
from stimnetd.store.contract import SiteStore
from stimnetd.store.db import Store

SQLITE_NAME = "stimnetd.sqlite3"


def site_store(config: Config) -> SiteStore:
    """The (unopened) store of `config`."""
    if config.store.url is None:
        return Store(config.node.state_dir / SQLITE_NAME)
    from stimnetd.store.pg import PgStore

    return PgStore(config.store.url, state_dir=config.node.state_dir)
