"""Durable state: one SQLite file per node, behind the storage verbs of `Store` (db.py)."""

from stimnetd.store.db import Store, StoreCorrupt
from stimnetd.store.identity import StoreReplaced
from stimnetd.store.records import NonceClaim

__all__ = ["NonceClaim", "Store", "StoreCorrupt", "StoreReplaced"]
