"""Durable state: one SQLite file per node, accessed through aiosqlite."""

from stimnetd.store.db import Store, StoreCorrupt

__all__ = ["Store", "StoreCorrupt"]
