"""Releases and the ledger: charged once, refused by the rules passed in, racing safely,
and the cohort history the overlap guard reads."""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import json
from pathlib import Path

import pytest

from stimnet.errors import BudgetExhausted, Refused
from stimnetd.store import Store
from stimnetd.store.audit import AuditVerification
from stimnetd.store.records import Release, cohort_digest
from tests.store.contract import (
    ALICE,
    StoreFactory,
    disclosing,
    grouped,
    logged,
    release,
    rules,
)


def fps(ids: range) -> frozenset[str]:
    """Fingerprints (uniform hex, as the site's HMACs are) of subjects numbered `ids`."""
    return frozenset(hashlib.sha256(str(i).encode()).hexdigest()[:32] for i in ids)


def tagged(tag: str, n: int = 20) -> frozenset[str]:
    """Fingerprints of `n` subjects of their own (`tag`)."""
    return frozenset(hashlib.sha256(f"{tag}{i}".encode()).hexdigest()[:32] for i in range(n))


async def test_release_charges_once_and_is_idempotent(store: Store) -> None:
    """A job's release charges epsilon once; releasing the same job again returns the stored one."""
    await store.release(release("j1", 1.0), decide=rules(budget=2.0), audit_actor=ALICE)
    again = await store.release(release("j1", 1.0), decide=rules(budget=2.0), audit_actor=ALICE)
    assert (again.job_id, again.epsilon, again.partials) == ("j1", 1.0, b"p")
    assert await store.spent("alice", "c") == pytest.approx(1.0)
    assert await store.spent_by_catalog() == {"c": pytest.approx(1.0)}


async def test_budget_refusal_is_audited_and_charges_nothing(store: Store) -> None:
    """A release beyond the budget raises RESOURCE_EXHAUSTED, leaves the ledger alone, and is audited."""
    await store.release(release("j1", 1.5), decide=rules(budget=2.0), audit_actor=ALICE)
    with pytest.raises(BudgetExhausted, match="0.5 of 2 remains"):
        await store.release(release("j2", 1.0), decide=rules(budget=2.0), audit_actor=ALICE)
    assert await store.spent("alice", "c") == pytest.approx(1.5)
    assert await store.get_release("j2") is None
    rows = await store.audit_rows()
    assert (rows[-1].decision, json.loads(rows[-1].detail_json)) == ("refused", {
        "job": "j2", "catalog": "c", "policy": "budget", "epsilon": 1.0, "budget": 2.0})
    assert await store.verify_audit() == AuditVerification(True, len(rows))


async def test_a_refund_uncharges_once_is_audited_and_keeps_nothing_to_redeliver(
        store: Store) -> None:
    """A refunded charge stops counting against the budget (a release it blocked now
    passes), is audited once with its ε and reason, and leaves its release without
    partials: the job released again returns that release, charging and carrying nothing."""
    await store.release(release("j1", 1.5), decide=rules(budget=2.0), audit_actor=ALICE)
    with pytest.raises(BudgetExhausted):
        await store.release(release("j2", 1.0), decide=rules(budget=2.0), audit_actor=ALICE)
    assert await store.refund("j1", audit_actor=ALICE, reason="never sent") == 1.5
    assert await store.refund("j1", audit_actor=ALICE, reason="again") == 0.0
    assert await store.refund("unknown", audit_actor=ALICE, reason="nothing") == 0.0
    assert await store.spent("alice", "c") == 0.0
    assert await store.spent_by_catalog() == {}
    again = await store.release(release("j1", 1.5), decide=rules(budget=2.0), audit_actor=ALICE)
    assert again.partials is None and await store.spent("alice", "c") == 0.0
    await store.release(release("j2", 1.0), decide=rules(budget=2.0), audit_actor=ALICE)
    assert await store.spent("alice", "c") == pytest.approx(1.0)
    rows = await store.audit_rows()
    refunds = [json.loads(r.detail_json) for r in rows if r.decision == "refunded"]
    assert refunds == [{"job": "j1", "catalog": "c", "epsilon": 1.5, "delta": 0.0,
                        "researcher": "alice", "reason": "never sent"}]
    assert await store.verify_audit() == AuditVerification(True, len(rows))


async def test_concurrent_releases_cannot_overspend(store: Store) -> None:
    """Twenty racing releases against a budget for five: exactly five are charged."""
    async def one(i: int) -> bool:
        try:
            await store.release(release(f"j{i}", 1.0), decide=rules(budget=5.0),
                                audit_actor=ALICE)
            return True
        except BudgetExhausted:
            return False
    results = await asyncio.gather(*[one(i) for i in range(20)])
    assert sum(results) == 5 and await store.spent("alice", "c") == pytest.approx(5.0)


async def test_overlap_guard_sees_earlier_cohorts_of_similar_size(store: Store) -> None:
    """The rules are handed earlier released cohorts within the size window."""
    seen: list[list[frozenset[str]]] = []
    await store.release(release("j1", cohort=frozenset("abcdef")), decide=rules(),
                        audit_actor=ALICE)
    with pytest.raises(Refused):
        await store.release(release("j2", cohort=frozenset("abcde")),
                            decide=logged(rules(k_min=5), seen), audit_actor=ALICE)
    assert seen == [[frozenset("abcdef")]]
    assert await store.get_release("j2") is None
    reason = ("cohort differs from an earlier released cohort by fewer than 5 subjects "
              "(k_min = 5)")
    last = (await store.audit_rows())[-1]
    assert json.loads(last.detail_json) == {"job": "j2", "catalog": "c", "policy": "overlap",
                                            "reason": reason}


async def test_every_disclosed_cohort_is_guarded_and_recorded(store: Store,
                                                              factory: StoreFactory) -> None:
    """A release disclosing several cohorts (a grouped query's cells and their union) has
    each checked against earlier ones and each recorded, so a later query near any of them
    is refused; a refusal records none of them."""
    kw = {"decide": rules(k_min=3), "audit_actor": ALICE}
    await store.release(disclosing("j1", "abcdefgh", "ijklmnop", "abcdefghijklmnop"), **kw)
    with pytest.raises(Refused):
        await store.release(disclosing("j2", "abcdefg"), **kw)  # one from a cell
    with pytest.raises(Refused):
        await store.release(disclosing("j3", "abcdefghijklmnopq"), **kw)  # one from the union
    with pytest.raises(Refused):  # the second cohort of a release is checked too
        await store.release(disclosing("j4", "qrstuvwxyz", "ijklmno"), **kw)
    await store.release(disclosing("j5", "qrstuvwxyz"), **kw)
    assert await factory.rows(store, "SELECT size FROM cohorts ORDER BY size") == [
        (8,), (8,), (10,), (16,)]


async def test_guard_parses_only_cohorts_whose_sketch_could_be_near(
        store: Store, factory: StoreFactory) -> None:
    """Of earlier cohorts of the same size, the rules are handed those whose sketches are
    within the window (the near one) and not the rest; a row stored without a sketch
    (before schema v3) is handed over and sketched, so it is judged by sketch next time."""
    seen: list[list[frozenset[str]]] = []
    for i, start in enumerate((0, 1000, 2000, 3000)):  # four far-apart cohorts of 200
        await store.release(release(f"far{i}", cohort=fps(range(start, start + 200))),
                            decide=rules(), audit_actor=ALICE)
    last = cohort_digest(fps(range(3000, 3200)))
    await factory.run(store, f"DELETE FROM cohort_sketches WHERE digest = '{last}'")
    near = fps(range(2, 202))  # two off the first cohort
    with pytest.raises(Refused):
        await store.release(release("near", cohort=near), decide=logged(rules(k_min=5), seen),
                            audit_actor=ALICE)
    assert sorted(len(e ^ near) for e in seen[0]) == [4, 400]  # the near one + the unsketched
    assert await factory.rows(store, "SELECT COUNT(*) FROM cohorts LEFT JOIN cohort_sketches"
                              " USING (researcher, catalog, digest) WHERE sketch IS NULL") == [(0,)]


async def test_a_suppressed_release_records_no_cohort(store: Store,
                                                      factory: StoreFactory) -> None:
    """A fully suppressed release is stored (and audited) but discloses no cohort."""
    suppressed = dataclasses.replace(grouped("s1", tagged("stn"), tagged("gpi")),
                                     decision="suppressed")
    stored = await store.release(suppressed, decide=rules(k_min=5), audit_actor=ALICE)
    assert stored.decision == "suppressed"
    assert (await store.get_release("s1")).decision == "suppressed"  # type: ignore[union-attr]
    assert await factory.rows(store, "SELECT (SELECT COUNT(*) FROM cohorts),"
                              " (SELECT COUNT(*) FROM cohort_families)") == [(0, 0)]


async def test_unions_of_some_groups_are_guarded_in_either_order(
        factory: StoreFactory, tmp_path: Path) -> None:
    """STN ∪ GPi plus one subject, and a query grouped into STN, GPi and VIM: each cell
    and all three together are far from it, STN and GPi together one subject away. Refused
    whichever comes first, and when both are grouped; a repeated grouped query, and one
    grouped differently but far from every union, are not."""
    stn, gpi, vim, other = tagged("stn"), tagged("gpi"), tagged("vim"), tagged("other", 40)
    near = stn | gpi | tagged("x", 1)
    kw = {"decide": rules(k_min=5), "audit_actor": ALICE}
    for name, first, second in (
            ("cohort-then-groups", release("a1", cohort=near), grouped("a2", stn, gpi, vim)),
            ("groups-then-cohort", grouped("b1", stn, gpi, vim), release("b2", cohort=near)),
            ("groups-then-groups", grouped("c1", stn, gpi, vim), grouped("c2", near, other))):
        s = await factory.open(tmp_path / name / "node.sqlite3")
        try:
            await s.release(first, **kw)
            with pytest.raises(Refused, match="union of"):  # not the pairwise guard's words
                await s.release(second, **kw)
            if name == "groups-then-cohort":
                await s.release(grouped("b3", stn, gpi, vim), **kw)  # the same again
                await s.release(grouped("b4", stn | gpi | vim, other), **kw)
                assert await factory.rows(s, "SELECT COUNT(*) FROM cohort_families") == [(2,)]
        finally:
            await s.close()


async def test_exact_auditing_reads_the_linear_history_in_release_order(store: Store) -> None:
    """Each exact release's linear cohorts are recorded once, under their quantity; a later
    release's rule reads them oldest first (members, digest, job), and knows which digests
    it was given before."""
    a, b = tagged("a", 6), tagged("b", 7)
    seen: list[tuple[list[tuple[frozenset[str], str, str]], bool, bool]] = []

    def rule(view, rel):  # type: ignore[no-untyped-def]
        seen.append((view.linear_history("sum:age"), view.linear_known("sum:age", [digest(a)]),
                     view.linear_known("sum:age", [digest(a), digest(b)])))
        return None

    def digest(cohort: frozenset[str]) -> str:
        return hashlib.sha256(",".join(sorted(cohort)).encode()).hexdigest()

    def linear(job: str, *cohorts: frozenset[str]) -> Release:
        return dataclasses.replace(release(job, cohort=frozenset().union(*cohorts)),
                                   linear=tuple(("sum:age", c, digest(c)) for c in cohorts))

    await store.release(linear("j1", a), decide=rule, audit_actor=ALICE)
    await store.release(linear("j2", b, a), decide=rule, audit_actor=ALICE)
    await store.release(linear("j3"), decide=rule, audit_actor=ALICE)
    assert [(h, k1, k2) for h, k1, k2 in seen] == [
        ([], False, False),
        ([(a, digest(a), "j1")], True, False),
        ([(a, digest(a), "j1"), (b, digest(b), "j2")], True, True)]
