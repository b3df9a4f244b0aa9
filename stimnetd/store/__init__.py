"""Durable state: one SQLite file per node, accessed through aiosqlite."""

from stimnetd.store.db import Store, StoreCorrupt
from stimnetd.store.records import NonceClaim

__all__ = ["NonceClaim", "Store", "StoreCorrupt"]
