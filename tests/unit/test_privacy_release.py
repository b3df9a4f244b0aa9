"""The release rules (privacy/release.py) over a ledger of plain lists: no database."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import pytest

from stimnet import errors
from stimnetd.privacy.policy import PrivacyPolicy, PrivacyRefusal
from stimnetd.privacy.release import Refusal, budget_message, budget_refusal, decide
from stimnetd.store.records import Disclosed, Release, cohort_digest

POLICY = PrivacyPolicy(k_min=5, budget_epsilon=2.0)
COHORT_WORDS = "cohort differs from an earlier released cohort by fewer than 5 subjects (k_min = 5)"


@dataclass
class ListedLedger:
    """A LedgerView over plain lists that hands over every earlier cohort and query (the
    rules must refuse as they would after the store's pruning) and notes each read."""

    spent_epsilon: float = 0.0
    spent_delta_: float = 0.0
    cohorts: list[frozenset[str]] = field(default_factory=list)
    families: list[list[frozenset[str]]] = field(default_factory=list)
    reads: list[tuple[str, int | None]] = field(default_factory=list)

    def spent(self) -> float:
        self.reads.append(("spent", None))
        return self.spent_epsilon

    def catalog_spent(self) -> float:
        return self.spent_epsilon

    def spent_delta(self) -> float:
        self.reads.append(("spent_delta", None))
        return self.spent_delta_

    def near_cohorts(self, members: frozenset[str], digest: str,
                     window: int) -> list[frozenset[str]]:
        self.reads.append(("cohorts", window))
        return [c for c in self.cohorts if cohort_digest(c) != digest]

    def near_families(self, atoms: Disclosed, window: int) -> list[list[frozenset[str]]]:
        self.reads.append(("families", window))
        return self.families


def ids(tag: str, n: int) -> frozenset[str]:
    return frozenset(f"{tag}-{i}" for i in range(n))


def release(cohort: frozenset[str], epsilon: float | None = None,
            decision: str = "released") -> Release:
    return Release(job_id="j", researcher="alice", catalog="c", decision=decision,
                   epsilon=epsilon, cohort=cohort, partials=b"", at=1.0)


def grouped(*cells: frozenset[str]) -> Release:
    """As the site builds it: each cell and their union disclosed, the cells its atoms."""
    union = frozenset().union(*cells)
    disclosed = tuple((c, cohort_digest(c)) for c in (*cells, union))
    return dataclasses.replace(release(union), guarded=disclosed, atoms=disclosed[:len(cells)])


class TestBudget:
    def test_a_charge_within_the_budget_passes(self) -> None:
        """Spending up to the budget is allowed, the last step included."""
        assert budget_refusal("c", 0.5, 1.5, POLICY) is None

    def test_float_drift_does_not_refuse_the_last_exact_step(self) -> None:
        """0.2 after 0.1 fits a budget of 0.3, though 0.1 + 0.2 exceeds 0.3 in floats."""
        assert 0.1 + 0.2 > 0.3  # the drift the slack is for
        assert budget_refusal("c", 0.2, 0.1, PrivacyPolicy(budget_epsilon=0.3)) is None
        assert budget_refusal("c", 0.2001, 0.1, PrivacyPolicy(budget_epsilon=0.3)) is not None

    def test_a_charge_beyond_the_budget_is_refused_with_what_remains(self) -> None:
        """The refusal names the catalog, the query's epsilon and what remains of the budget,
        and audits the epsilon asked for and the budget."""
        refusal = budget_refusal("dbs", 1.0, 1.5, POLICY)
        assert refusal == Refusal(
            "budget", "privacy budget exhausted on catalog 'dbs': this query needs epsilon 1, "
            "0.5 of 2 remains for you at this site", {"epsilon": 1.0, "budget": 2.0})
        assert refusal.audit_detail() == {"policy": "budget", "epsilon": 1.0, "budget": 2.0}

    def test_an_overspent_budget_reports_nothing_remaining(self) -> None:
        """Spent beyond the budget (a lowered budget) reads as 0 remaining, never negative."""
        assert budget_message("c", 1.0, 3.0, 2.0).endswith("0 of 2 remains for you at this site")

    def test_the_release_rule_is_the_precheck_rule(self) -> None:
        """decide refuses a charging release exactly as budget_refusal does."""
        view = ListedLedger(spent_epsilon=1.5)
        assert decide(view, release(ids("a", 20), epsilon=1.0), POLICY) == \
            budget_refusal("c", 1.0, 1.5, POLICY)

    def test_a_budget_refusal_reads_no_cohorts(self) -> None:
        """When the budget refuses, the overlap guard's cohorts are never asked for."""
        view = ListedLedger(spent_epsilon=2.0, cohorts=[ids("a", 19)])
        refusal = decide(view, release(ids("a", 20), epsilon=1.0), POLICY)
        assert (refusal.rule if refusal else None, view.reads) == ("budget", [("spent", None)])

    def test_a_release_without_epsilon_never_reads_the_budget(self) -> None:
        """A release that charges nothing is not checked against the budget."""
        view = ListedLedger(spent_epsilon=99.0)
        assert decide(view, release(ids("a", 20)), POLICY) is None
        assert ("spent", None) not in view.reads


class TestOverlap:
    def test_a_cohort_a_few_subjects_from_an_earlier_one_is_refused(self) -> None:
        """A cohort differing from an earlier one by 1..k_min-1 subjects is refused, in words
        that name the rule and k_min only; the view is asked within k_min - 1."""
        view = ListedLedger(cohorts=[ids("a", 20)])
        refusal = decide(view, release(ids("a", 18)), POLICY)
        assert refusal == Refusal("overlap", COHORT_WORDS, {"reason": COHORT_WORDS})
        assert view.reads == [("cohorts", 4)]

    def test_the_same_cohort_again_and_far_cohorts_pass(self) -> None:
        """Asking about the same cohort again, or one k_min or more away, is not refused."""
        view = ListedLedger(cohorts=[ids("a", 20), ids("a", 25)])
        assert decide(view, release(ids("a", 20)), POLICY) is None
        assert view.reads == [("cohorts", 4), ("families", 4)]

    def test_a_grouped_release_names_its_groups(self) -> None:
        """A grouped release's cell near an earlier cohort is refused as a group's cohort."""
        stn, gpi = ids("stn", 20), ids("gpi", 20)
        refusal = decide(ListedLedger(cohorts=[stn | {"x"}]), grouped(stn, gpi), POLICY)
        assert refusal is not None and refusal.message == (
            "a group's cohort (or the groups' together) differs from an earlier released "
            "cohort by fewer than 5 subjects (k_min = 5)")

    def test_a_union_of_some_cells_near_an_earlier_cohort_is_refused(self) -> None:
        """STN ∪ GPi plus one subject, then STN, GPi and VIM grouped: every cell and all of
        them are far from it, two of them together are not."""
        stn, gpi, vim = ids("stn", 10), ids("gpi", 10), ids("vim", 10)
        view = ListedLedger(families=[[stn | gpi | {"x"}]])
        refusal = decide(view, grouped(stn, gpi, vim), POLICY)
        words = ("a union of this query's groups differs from an earlier released cohort (or "
                 "a union of an earlier query's groups) by fewer than 5 subjects (k_min = 5)")
        assert refusal == Refusal("overlap", words, {"reason": words})
        assert view.reads == [("cohorts", 4)] * 4 + [("families", 4)]

    def test_an_ungrouped_release_is_its_own_single_cell(self) -> None:
        """Without atoms the union guard compares the release's one cohort."""
        view = ListedLedger(families=[[ids("a", 20), ids("b", 20)]])
        refusal = decide(view, release(ids("a", 20) | ids("b", 18)), POLICY)
        assert refusal is not None and refusal.rule == "overlap"

    def test_a_suppressed_release_discloses_nothing_to_guard(self) -> None:
        """A fully suppressed release is never compared with earlier cohorts."""
        view = ListedLedger(cohorts=[ids("a", 20)])
        assert decide(view, release(ids("a", 18), decision="suppressed"), POLICY) is None
        assert view.reads == []

    def test_the_guard_can_be_switched_off(self) -> None:
        """With the site's overlap guard off only the budget applies."""
        view = ListedLedger(cohorts=[ids("a", 20)], spent_epsilon=0.0)
        assert decide(view, release(ids("a", 18), epsilon=1.0), POLICY,
                      overlap_guard=False) is None
        assert view.reads == [("spent", None)]

    def test_the_budget_is_judged_before_the_overlap(self) -> None:
        """A release both rules would refuse is refused for its budget."""
        view = ListedLedger(spent_epsilon=2.0, cohorts=[ids("a", 20)])
        refusal = decide(view, release(ids("a", 18), epsilon=1.0), POLICY)
        assert refusal is not None and refusal.rule == "budget"


class TestRefusal:
    @pytest.mark.parametrize("rule, kind, code", [
        ("budget", errors.BudgetExhausted, "RESOURCE_EXHAUSTED"),
        ("overlap", PrivacyRefusal, "FAILED_PRECONDITION"),
    ])
    def test_each_rule_raises_its_own_error(self, rule: str, kind: type, code: str) -> None:
        """A refusal's error has the rule's class, wire status and rule name."""
        e = Refusal(rule, "words").error()  # type: ignore[arg-type]
        assert (type(e), e.code, str(e), getattr(e, "policy", None)) == (kind, code, "words", rule)
