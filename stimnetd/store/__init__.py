"""Durable state: one SQLite file per node (`Store`, db.py), or a PostgreSQL database its
replicas share (`PgStore`, pg.py), behind the storage verbs of `SiteStore` (contract.py)."""

from stimnetd.store.contract import SiteStore
from stimnetd.store.db import Store, StoreCorrupt
from stimnetd.store.identity import StoreReplaced
from stimnetd.store.records import NonceClaim

__all__ = ["NonceClaim", "SiteStore", "Store", "StoreCorrupt", "StoreReplaced"]
