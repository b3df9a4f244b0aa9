"""The PostgreSQL store's signed-request nonces and the site's own state: its secret, its
installation id, approved scripts and the gossip peer table."""

from __future__ import annotations

import secrets
from collections.abc import Iterable

import asyncpg

from stimnetd.store.node import SECRET_BYTES
from stimnetd.store.nonces import NonceMirror
from stimnetd.store.pg_base import MEMBERS_LOCK, PgBase
from stimnetd.store.records import MemberRecord, NonceClaim
from stimnetd.store.transaction import AuditEntry


class PgNode(PgBase):
    _nonces: NonceMirror

    # -- signed-request nonces ----------------------------------------------------------

    async def claim_nonce(self, claim: NonceClaim, audit: AuditEntry | None = None) -> bool:
        """`Store.claim_nonce`: remember `claim` (with its accepted entry, then `audit`);
        False on a replay, whichever replica saw the request first."""
        now = self._clock()
        async with self.chained() as conn:
            fresh = await self._insert_nonce(conn, claim, now)
            if fresh and audit is not None:
                await self._append(conn, *audit)
        claim.consumed = True
        if fresh:
            self._nonces.add(claim.nonce)
        return fresh

    async def _insert_nonce(self, conn: asyncpg.Connection, claim: NonceClaim,
                            now: float) -> bool:
        """Remember `claim` (and append its accepted entry); False if it is a replay.
        Nonces older than twice the freshness window are pruned, as in the SQLite store.
        The caller holds CHAIN_LOCK."""
        await conn.execute("DELETE FROM nonces WHERE seen_at < $1", now - 2 * claim.max_age_s)
        inserted = await conn.fetchval(
            "INSERT INTO nonces (nonce, signer, seen_at) VALUES ($1, $2, $3)"
            " ON CONFLICT (nonce) DO NOTHING RETURNING 1", claim.nonce, claim.signer, now)
        if inserted is not None and claim.accepted is not None:
            await self._append(conn, *claim.accepted)
        return inserted is not None

    async def remember_nonce(self, nonce: str, signer: str, max_age_s: float, *,
                             audit: AuditEntry | None = None) -> bool:
        return await self.claim_nonce(NonceClaim(nonce, signer, max_age_s, audit))

    def nonce_seen(self, nonce: str) -> bool:
        """Whether this process has seen `nonce` committed (a fast early answer, as in the
        SQLite store). A nonce another replica remembered is not in it: the transaction
        that inserts it refuses that replay instead."""
        return nonce in self._nonces

    def _nonce_committed(self, nonce: tuple[str, float] | None, now: float) -> None:
        if nonce is not None:
            self._nonces.add(nonce[0])

    def _nonce_claimed(self, claim: NonceClaim, now: float) -> None:
        self._nonces.add(claim.nonce)

    async def nonce_seen_now(self, nonce: str) -> bool:
        """Whether any replica has remembered `nonce` (a database read)."""
        return bool(await self.pool.fetchval(
            "SELECT EXISTS (SELECT 1 FROM nonces WHERE nonce = $1)", nonce))

    async def _load_nonces(self) -> None:
        rows = await self.pool.fetch("SELECT nonce, seen_at FROM nonces ORDER BY seen_at")
        self._nonces.load([(str(n), float(at)) for n, at in rows])

    # -- the site's own state ----------------------------------------------------------

    async def site_secret(self) -> bytes:
        """`Store.site_secret`: made on first use; replicas asking at once get one secret."""
        await self.pool.execute(
            "INSERT INTO meta (key, value) VALUES ('site_secret', $1) ON CONFLICT DO NOTHING",
            secrets.token_bytes(SECRET_BYTES))
        return bytes(await self.pool.fetchval("SELECT value FROM meta WHERE key = 'site_secret'"))

    async def installation_id(self) -> str:
        """`Store.installation_id`: made on first use; replicas share one."""
        await self.pool.execute(
            "INSERT INTO meta (key, value) VALUES ('installation_id', $1) ON CONFLICT DO NOTHING",
            secrets.token_hex(8).encode())
        got = await self.pool.fetchval("SELECT value FROM meta WHERE key = 'installation_id'")
        return bytes(got).decode()

    async def approve_script(self, sha256: str, by: str) -> None:
        await self.pool.execute(
            "INSERT INTO approvals (script_sha256, approved_by, at) VALUES ($1, $2, $3)"
            " ON CONFLICT (script_sha256) DO UPDATE SET approved_by = EXCLUDED.approved_by,"
            " at = EXCLUDED.at", sha256, by, self._clock())

    async def is_script_approved(self, sha256: str) -> bool:
        return bool(await self.pool.fetchval(
            "SELECT EXISTS (SELECT 1 FROM approvals WHERE script_sha256 = $1)", sha256))

    # -- gossip members ------------------------------------------------------------------

    async def load_members(self) -> list[MemberRecord]:
        rows = await self.pool.fetch("SELECT name, address, incarnation, status, last_heard,"
                                     " catalogs_json FROM members")
        return [MemberRecord.from_row(tuple(r)) for r in rows]

    async def save_members(self, members: Iterable[MemberRecord]) -> None:
        """The peer table, replaced whole (as in the SQLite store). Replicas share it: the
        last to save wins, which is a view of the same federation a moment apart."""
        rows = [m.to_row() for m in members]
        async with self.pool.acquire() as conn, conn.transaction():
            await conn.execute("SET LOCAL synchronous_commit = off")
            # Two replicas replacing it at once would otherwise insert the same names.
            await conn.execute("SELECT pg_advisory_xact_lock($1)", MEMBERS_LOCK)
            await conn.execute("DELETE FROM members")
            await conn.executemany(
                "INSERT INTO members (name, address, incarnation, status, last_heard,"
                " catalogs_json) VALUES ($1,$2,$3,$4,$5,$6)", rows)
