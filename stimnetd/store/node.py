"""What a node keeps about itself and its peers: the gossip peer table (so a restart
rejoins without its seeds), the scripts its admins approved, and its site secret."""

from __future__ import annotations

import secrets
from collections.abc import Callable, Iterable
from typing import Any

import aiosqlite

from stimnetd.store.records import MemberRecord
from stimnetd.store.transaction import Transaction

SECRET_BYTES = 32


async def load_members(db: aiosqlite.Connection) -> list[MemberRecord]:
    rows = await db.execute_fetchall(
        "SELECT name, address, incarnation, status, last_heard, catalogs_json FROM members")
    return [MemberRecord.from_row(r) for r in rows]


def replace_members(members: Iterable[MemberRecord]) -> Callable[[Transaction], None]:
    rows = [m.to_row() for m in members]

    def tx(t: Transaction) -> None:
        t.conn.execute("DELETE FROM members")
        t.conn.executemany(
            "INSERT INTO members (name, address, incarnation, status, last_heard, catalogs_json)"
            " VALUES (?,?,?,?,?,?)", rows)

    return tx


def approve_script(sha256: str, by: str, now: float) -> Callable[[Transaction], Any]:
    return lambda t: t.conn.execute(
        "INSERT OR REPLACE INTO approvals (script_sha256, approved_by, at) VALUES (?,?,?)",
        (sha256, by, now))


async def is_script_approved(db: aiosqlite.Connection, sha256: str) -> bool:
    rows = await db.execute_fetchall("SELECT 1 FROM approvals WHERE script_sha256 = ?", (sha256,))
    return bool(list(rows))


def site_secret(t: Transaction) -> bytes:
    """The stored secret, made (and stored) on first use."""
    row = t.conn.execute("SELECT value FROM meta WHERE key = 'site_secret'").fetchone()
    if row:
        return bytes(row[0])
    secret = secrets.token_bytes(SECRET_BYTES)
    t.conn.execute("INSERT INTO meta (key, value) VALUES ('site_secret', ?)", (secret,))
    return secret


def installation_id(t: Transaction) -> str:
    """This store's random installation id (labels its sandbox containers); made once."""
    row = t.conn.execute("SELECT value FROM meta WHERE key = 'installation_id'").fetchone()
    if row:
        return bytes(row[0]).decode()
    made = secrets.token_hex(8)
    t.conn.execute("INSERT INTO meta (key, value) VALUES ('installation_id', ?)", (made.encode(),))
    return made
