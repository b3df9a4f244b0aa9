"""Signed-request nonces: remembered once, by every verb that takes one, across restarts."""

from __future__ import annotations

from pathlib import Path

import pytest

from stimnet.errors import BudgetExhausted, Replayed
from stimnetd.store import NonceClaim, Store
from tests.store.contract import ALICE, StoreFactory, job_row, release, rules


async def test_nonce_is_remembered_once(store: Store) -> None:
    """A nonce is accepted once; the second use is a replay."""
    assert await store.remember_nonce("n1", "alice", 300) is True
    assert await store.remember_nonce("n1", "alice", 300) is False


async def test_a_claim_appends_its_entries_only_when_fresh(store: Store) -> None:
    """A claim's accepted entry and the extra entry are appended with a fresh nonce, and
    neither with a replayed one."""
    accepted = ("alice", "researcher", "submit", "accepted", {"job": "j1"})
    claim = NonceClaim("n1", "alice", 300, accepted=accepted)
    assert await store.claim_nonce(claim, audit=("alice", "researcher", "x", "ok", {})) is True
    assert claim.consumed is True
    assert await store.claim_nonce(NonceClaim("n1", "alice", 300, accepted=accepted)) is False
    assert [(r.action, r.decision) for r in await store.audit_rows()] == [
        ("submit", "accepted"), ("x", "ok")]


async def test_a_release_with_a_replayed_nonce_releases_nothing(store: Store) -> None:
    """A release whose nonce was already remembered raises Replayed and records nothing."""
    assert await store.remember_nonce("n1", "alice", 300) is True
    claim = NonceClaim("n1", "alice", 300)
    with pytest.raises(Replayed, match="already run at this site"):
        await store.release(release("j1"), decide=rules(), audit_actor=ALICE, nonce=claim)
    assert (claim.consumed, await store.get_release("j1")) == (True, None)


async def test_nonce_seen_covers_every_way_a_nonce_is_kept_and_survives_a_restart(
        factory: StoreFactory, tmp_path: Path) -> None:
    """`nonce_seen` (in memory, no database round trip) knows the nonces of claims, of
    releases and refusals, and of submitted jobs, and still knows them after a restart;
    nonces past twice the freshness window are pruned from the table (`nonce_seen_now`),
    while the fixed-size mirror may keep them: their requests fail the freshness check."""
    now = [1000.0]
    path = tmp_path / "node.sqlite3"
    s = await factory.open(path, clock=lambda: now[0])
    assert await s.claim_nonce(NonceClaim("claimed", "alice", 300)) is True
    await s.release(release("j1"), decide=rules(), audit_actor=ALICE,
                    nonce=NonceClaim("released", "alice", 300))
    with pytest.raises(BudgetExhausted):
        await s.release(release("j2", eps=5.0), decide=rules(), audit_actor=ALICE,
                        nonce=NonceClaim("refused", "alice", 300))
    assert await s.create_job(job_row("job1", at=now[0]), nonce=("submitted", 300)) is True
    kept = ("claimed", "released", "refused", "submitted")
    everyone = {n: True for n in kept} | {"other": False}
    assert {n: s.nonce_seen(n) for n in everyone} == everyone
    await s.close()

    s = await factory.open(path, clock=lambda: now[0])
    try:
        assert {n: s.nonce_seen(n) for n in everyone} == everyone
        assert {n: await s.nonce_seen_now(n) for n in everyone} == everyone
        now[0] += 2 * 300 + 1  # past every kept nonce's window: the next claim prunes them
        assert await s.claim_nonce(NonceClaim("later", "alice", 300)) is True
        assert {n: await s.nonce_seen_now(n) for n in (*kept, "later")} == {
            **{n: False for n in kept}, "later": True}
        assert s.nonce_seen("later")  # the mirror may keep the old ones: they are stale
    finally:
        await s.close()
