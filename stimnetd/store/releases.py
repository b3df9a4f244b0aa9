"""Releases: what a site let leave it, recorded with its epsilon charge and audit entry in
one transaction, after the release rules (passed in: privacy/release.decide) have spoken."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import aiosqlite

from stimnet.errors import Replayed
from stimnetd.store import cohorts, linear, nonces
from stimnetd.store.ledger import TransactionLedger
from stimnetd.store.records import NonceClaim, Release, ReleaseRule, cohort_digest
from stimnetd.store.transaction import Transaction

SELECT = ("SELECT job_id, researcher, catalog, decision, epsilon, cohort_digest, "
          "partials, at FROM releases")

REPLAYED = "replayed request: this signed job was already run at this site"


def record(release: Release, decide: ReleaseRule, audit_actor: tuple[str, str],
           nonce: NonceClaim | None, now: float, stored: bytes | None
           ) -> Callable[[Transaction], Release | Exception]:
    """The release transaction: the request's nonce (a replay returns Replayed), then the
    job's earlier release if it has one (returned as it is, charging nothing), then
    `decide`; a refusal is audited and returned as its error, otherwise the release is
    charged, recorded with the cohorts it discloses (its partials as `stored`, made by
    blobs.compact), and audited."""
    base = {"job": release.job_id, "catalog": release.catalog}
    digest = release.cohort_key or cohort_digest(release.cohort)

    def tx(t: Transaction) -> Release | Exception:
        if nonce is not None and not nonces.insert(t, nonce, now):
            return Replayed(REPLAYED)
        existing = t.conn.execute(SELECT + " WHERE job_id = ?", (release.job_id,)).fetchone()
        if existing is not None:
            return Release.from_row(existing)
        view = TransactionLedger(t.conn, release)
        refusal = decide(view, release)
        if refusal is not None:
            t.append(*audit_actor, "release", "refused", {**base, **refusal.audit_detail()})
            return refusal.error()
        write_disclosed(t, release, digest, view.sketches, stored)
        if nonce is not None:
            nonce.released = True  # a commit that fails leaves nothing to refund
        t.append(*audit_actor, "release", release.decision,
                 {**base, "epsilon": release.epsilon, "delta": release.delta,
                  "researcher": release.researcher,
                  **release.audit_detail})
        return release

    return tx


def write_disclosed(t: Transaction, release: Release, digest: str, sketches: dict[str, bytes],
           stored: bytes | None) -> None:
    conn = t.conn
    if release.epsilon:
        conn.execute(
            "INSERT INTO ledger (researcher, catalog, job_id, epsilon, delta, at) "
            "VALUES (?,?,?,?,?,?)",
            (release.researcher, release.catalog, release.job_id, release.epsilon,
             release.delta, release.at))
    conn.execute(
        "INSERT INTO releases (job_id, researcher, catalog, decision, epsilon,"
        " cohort_digest, partials, at) VALUES (?,?,?,?,?,?,?,?)",
        (release.job_id, release.researcher, release.catalog, release.decision,
         release.epsilon, digest, stored, release.at))
    # Only exact releases are audited against later ones: a noised one's cohort is
    # accounted for by its epsilon.
    exact = release.decision != "suppressed" and not release.epsilon
    disclosed = release.disclosed() if exact else ()
    cohorts.record_disclosed(conn, release, disclosed, sketches)
    if exact and release.linear:
        linear.record(conn, release)


async def get(db: aiosqlite.Connection, job_id: str) -> Release | None:
    rows: Any = await db.execute_fetchall(SELECT + " WHERE job_id = ?", (job_id,))
    return Release.from_row(list(rows)[0]) if rows else None


def drop_partials(before: float, batch: int) -> Callable[[Transaction], int]:
    """Forget the partials of up to `batch` releases made before `before`; how many."""

    def tx(t: Transaction) -> int:
        return t.conn.execute(
            "UPDATE releases SET partials = NULL WHERE rowid IN (SELECT rowid FROM releases"
            " WHERE at < ? AND partials IS NOT NULL LIMIT ?)", (before, batch)).rowcount

    return tx


def refund(job_id: str, audit_actor: tuple[str, str], reason: str,
           now: float) -> Callable[[Transaction], float]:
    """Refund job `job_id`'s charge, its partials dropped, audited; the ε refunded (0 if
    nothing was charged, or it was refunded before).

    The caller's to decide that no byte of the release left the site: the store keeps a
    refunded release's decision and nonce (its request is never run here again) but not
    its partials, so nothing can re-deliver what was not paid for."""

    def tx(t: Transaction) -> float:
        row = t.conn.execute(
            "SELECT catalog, epsilon, delta FROM ledger WHERE job_id = ? AND refunded_at IS NULL",
            (job_id,)).fetchone()
        if row is None:
            return 0.0
        catalog, epsilon, delta = row
        t.conn.execute("UPDATE ledger SET refunded_at = ? WHERE job_id = ?", (now, job_id))
        t.conn.execute("UPDATE releases SET partials = NULL WHERE job_id = ?", (job_id,))
        t.append(*audit_actor, "release", "refunded",
                 {"job": job_id, "catalog": catalog, "epsilon": epsilon, "delta": delta,
                  "researcher": audit_actor[0], "reason": reason})
        return float(epsilon)

    return tx
