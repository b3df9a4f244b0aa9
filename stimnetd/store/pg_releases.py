"""The PostgreSQL store's releases and privacy ledger: `Store.release` and its reads.

A release decides under CHAIN_LOCK, so a charge sees every earlier charge on any replica:
two replicas cannot both spend the last of a budget. The rule and the cohort bookkeeping
are the SQLite store's own code (ledger.TransactionLedger, releases.write_disclosed), run
in a worker thread over the release's connection (pg_sync.py): the overlap guard and exact
auditing decide the same on either store.
"""

from __future__ import annotations

import asyncio
import dataclasses

from stimnet.errors import Replayed
from stimnetd.store import releases
from stimnetd.store.db import compacted
from stimnetd.store.ledger import COUNTED, SPENT, SPENT_DELTA, TransactionLedger
from stimnetd.store.pg_base import PgBase
from stimnetd.store.pg_sync import SyncConnection, translate
from stimnetd.store.records import NonceClaim, RefusalRecord, Release, ReleaseRule, cohort_digest
from stimnetd.store.releases import REPLAYED


@dataclasses.dataclass
class _Tx:
    """What releases.write_disclosed reads of a transaction: its connection."""

    conn: SyncConnection


class PgReleases(PgBase):
    async def spent(self, researcher: str, catalog: str) -> float:
        return float(await self.pool.fetchval(translate(SPENT), researcher, catalog))

    async def spent_delta(self, researcher: str, catalog: str) -> float:
        return float(await self.pool.fetchval(translate(SPENT_DELTA), researcher, catalog))

    async def spent_by_catalog(self) -> dict[str, float]:
        rows = await self.pool.fetch(f"SELECT catalog, SUM(epsilon) FROM ledger WHERE {COUNTED}"
                                     " GROUP BY catalog")
        return {str(c): float(e) for c, e in rows}

    async def get_release(self, job_id: str) -> Release | None:
        row = await self.pool.fetchrow(translate(releases.SELECT + " WHERE job_id = ?"), job_id)
        return Release.from_row(tuple(row)) if row is not None else None

    async def stored_bytes(self, researcher: str) -> int:
        """`Store.stored_bytes`: released partials and job answers, as stored."""
        return int(await self.pool.fetchval(
            "SELECT (SELECT coalesce(sum(octet_length(partials)), 0) FROM releases"
            " WHERE researcher = $1) + (SELECT coalesce(sum(octet_length(result)), 0)"
            " FROM jobs WHERE owner = $1)", researcher))

    async def release(self, release: Release, *, decide: ReleaseRule,
                      audit_actor: tuple[str, str], nonce: NonceClaim | None = None) -> Release:
        """`Store.release`: record, charge and audit in one transaction unless `decide`
        refuses (the refusal's audit entry commits, then its error is raised); a job
        released before returns the stored release, charging nothing. With `nonce`, the
        request's nonce is remembered first in this transaction; a replay (on any replica)
        raises `Replayed` and nothing is released."""
        base = {"job": release.job_id, "catalog": release.catalog}
        now = self._clock()
        stored = await compacted(release.partials)
        loop = asyncio.get_running_loop()
        async with self.chained() as conn:
            if nonce is not None:
                nonce.consumed = True
                if not await self._insert_nonce(conn, nonce, now):
                    raise Replayed(REPLAYED)
            existing = await conn.fetchrow(translate(releases.SELECT + " WHERE job_id = ?"),
                                           release.job_id)
            if existing is not None:
                self._nonce_claimed_if(nonce, now)
                return Release.from_row(tuple(existing))
            sync = SyncConnection(conn, loop)
            refusal = await asyncio.to_thread(_decide_and_write, sync, release, decide, stored)
            if refusal is not None:
                await self._append(conn, *audit_actor, "release", "refused",
                                   {**base, **refusal.audit_detail()})
            else:
                if nonce is not None:
                    nonce.released = True
                await self._append(conn, *audit_actor, "release", release.decision,
                                   {**base, "epsilon": release.epsilon, "delta": release.delta,
                                    "researcher": release.researcher, **release.audit_detail})
        self._nonce_claimed_if(nonce, now)
        if refusal is not None:
            raise refusal.error()
        return release

    def _nonce_claimed_if(self, nonce: NonceClaim | None, now: float) -> None:
        if nonce is not None:
            self._nonce_claimed(nonce, now)

    async def refund(self, job_id: str, *, audit_actor: tuple[str, str], reason: str) -> float:
        """`Store.refund`: `job_id`'s charge no longer counts and its partials are dropped,
        audited; the ε refunded (0 if nothing was charged or it was refunded before)."""
        async with self.chained() as conn:
            row = await conn.fetchrow(
                "SELECT catalog, epsilon, delta FROM ledger WHERE job_id = $1"
                " AND refunded_at IS NULL FOR UPDATE", job_id)
            if row is None:
                return 0.0
            catalog, epsilon, delta = row
            await conn.execute("UPDATE ledger SET refunded_at = $1 WHERE job_id = $2",
                               self._clock(), job_id)
            await conn.execute("UPDATE releases SET partials = NULL WHERE job_id = $1", job_id)
            await self._append(conn, *audit_actor, "release", "refunded",
                               {"job": job_id, "catalog": catalog, "epsilon": epsilon,
                                "delta": delta, "researcher": audit_actor[0],
                                "reason": reason})
        return float(epsilon)


def _decide_and_write(sync: SyncConnection, release: Release, decide: ReleaseRule,
                      stored: bytes | None) -> RefusalRecord | None:
    """In a worker thread: the rule, then (unless it refuses) the release's rows."""
    view = TransactionLedger(sync, release)  # type: ignore[arg-type]
    refusal = decide(view, release)
    if refusal is None:
        releases.write_disclosed(_Tx(sync), release,  # type: ignore[arg-type]
                                 release.cohort_key or cohort_digest(release.cohort),
                                 view.sketches, stored)
    return refusal
