"""`stimnetd init-store --force`: a new, empty store for a node that has run before.

The only way past a refused store (store/identity.py). The old file is moved aside, never
deleted (it may be the one to restore), and the new store's first audit entry records the
forced re-init and the identity it replaced, so the chain shows where it restarted.
"""

from __future__ import annotations

import os
import time

from stimnetd.config import Config
from stimnetd.store import Store, identity
from stimnetd.store.lock import StateDirLock


async def init_store(config: Config) -> str:
    """Replace the store; the line to print. Raises StateDirLocked if a daemon runs on it."""
    if config.store.url is not None:
        return await _adopt_database(config)
    path = config.node.state_dir / "stimnetd.sqlite3"
    lock = StateDirLock(config.node.state_dir)
    lock.acquire()
    try:
        previous = identity.read(path)
        moved = None
        if path.exists():
            moved = path.with_name(f"{path.name}.replaced-{int(time.time())}")
            os.replace(path, moved)
            for suffix in ("-wal", "-shm"):  # a WAL belongs with its database file
                side = path.with_name(path.name + suffix)
                if side.exists():
                    os.replace(side, moved.with_name(moved.name + suffix))
        store = Store(path)
        await store.open()
        try:
            await store.audit(config.node.name, "admin", "init-store", "forced",
                              {"previous_identity": previous,
                               "previous_store": str(moved) if moved else None})
            await store.keep_identity(replace=True)
        finally:
            await store.close()
    finally:
        lock.release()
    kept = f"; the old file is kept as {moved}" if moved else ""
    return f"started a new store at {path}{kept}"


async def _adopt_database(config: Config) -> str:
    """With `[store] url`: nothing is moved (the database is the server's; a new store is a
    new, empty database the operator creates). This replica adopts the configured database
    as its store, audited there, and records it as its store identity."""
    from stimnetd.store.pg import IDENTITY_ANCHOR, PgStore

    store = PgStore(config.store.url or "", state_dir=config.node.state_dir)
    await store.open(lock_dir=True)
    try:
        previous = identity.read(config.node.state_dir / IDENTITY_ANCHOR)
        await store.audit(config.node.name, "admin", "init-store", "forced",
                          {"previous_identity": previous, "previous_store": None})
        await store.keep_identity(replace=True)
    finally:
        await store.close()
    return f"this replica now runs on {store.where}"
