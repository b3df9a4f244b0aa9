"""Store identity: which store this node has been running on, kept outside the store.

A store truncated, deleted or swapped for another node's file while the daemon was stopped
would otherwise start as a new one: ε spent back to 0, the audit chain restarted. The
identity is the hash of the store's first audit entry; it is also what an audit export
starts with (entry 1's hash). It lives in `store-identity` in the state directory, next to
the store, written once the first entry is committed. At start a store whose first entry
differs, or that is empty or missing while the identity file says the node has run, is
refused; `stimnetd init-store --force` starts a new store, audited, and moves the old
file aside. Deleting the identity file as well goes unnoticed (it is adopted again from
the store): the identity guards against accidents and a careless restore, not against
someone who can rewrite the whole state directory.
"""

from __future__ import annotations

import os
import sqlite3
from pathlib import Path

from stimnet.errors import StimnetError
from stimnetd.store.audit import SELECT_ROWS, AuditRow, verify_rows

IDENTITY_NAME = "store-identity"
FIRST_HASH = "SELECT hash FROM audit WHERE seq = 1"
FORCE = ("restore this node's own store from a backup, or run `stimnetd init-store --force` "
         "to start a new one (audited)")


class StoreReplaced(StimnetError):
    code = "FAILED_PRECONDITION"


def identity_path(store_path: Path) -> Path:
    return store_path.parent / IDENTITY_NAME


def read(store_path: Path) -> str | None:
    """The identity this node last ran with; None for a node that never has."""
    try:
        return identity_path(store_path).read_text().strip() or None
    except FileNotFoundError:
        return None


def write(store_path: Path, store_id: str) -> None:
    """Atomically, and durably (a power cut leaves the old file or the new one)."""
    path = identity_path(store_path)
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, f"{store_id}\n".encode())
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def check_file_present(store_path: Path) -> None:
    """Before opening (which would create a new file): refuse a missing or empty store
    on a node that has run before."""
    expected = read(store_path)
    if expected is None:
        return
    if not store_path.exists():
        raise StoreReplaced(f"store {store_path} is missing, but this node has run before "
                            f"(store identity {expected[:16]} in {identity_path(store_path)}); "
                            f"{FORCE}")
    if store_path.stat().st_size == 0:
        raise StoreReplaced(f"store {store_path} is empty (truncated?), but this node has run "
                            f"before (store identity {expected[:16]}); {FORCE}")


def first_hash(conn: sqlite3.Connection) -> str | None:
    row = conn.execute(FIRST_HASH).fetchone()
    return str(row[0]) if row is not None else None


def check_store(store_path: Path, conn: sqlite3.Connection) -> None:
    """On the opened (migrated) store: its first audit entry is the one this node knows."""
    expected = read(store_path)
    if expected is None:
        return
    actual = first_hash(conn)
    if actual is None:
        raise StoreReplaced(f"store {store_path} has no audit entries, but this node has run "
                            f"before (store identity {expected[:16]}); {FORCE}")
    if actual != expected:
        raise StoreReplaced(f"store {store_path} is not this node's store (its identity "
                            f"{actual[:16]}, this node's {expected[:16]} in "
                            f"{identity_path(store_path)}); {FORCE}")


def chain_problem(conn: sqlite3.Connection) -> str | None:
    """The whole audit chain, re-hashed: an edit inside a row's payload (which SQLite's
    page structure check cannot see) shows here. None if it verifies."""
    rows = [AuditRow(*r) for r in conn.execute(SELECT_ROWS, (0.0,))]
    v = verify_rows(rows)
    return None if v.ok else v.problem
