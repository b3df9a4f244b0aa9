"""The release rules: may a release be recorded, given what the ledger already holds?

`decide` is pure. It reads a `LedgerView` (the store fills one inside the release's
`BEGIN IMMEDIATE` transaction, so two racing releases cannot both pass) and returns a
`Refusal` or None; the store then records the release or audits the refusal and raises
it. The budget rule (`budget_refusal`) also serves `SiteExecutor.precheck`, which refuses
before any work a query the budget certainly cannot cover.

Rules, in order: the budget (only a release that charges epsilon), then the overlap guard
on each cohort the release discloses (privacy/overlap.check_overlap), then on unions of its
cells (check_union_overlap). A suppressed release discloses nothing and is never guarded.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from stimnet.errors import BudgetExhausted, StimnetError
from stimnetd.privacy.overlap import check_overlap, check_union_overlap
from stimnetd.privacy.policy import PrivacyPolicy, PrivacyRefusal, RefusalRule
from stimnetd.privacy.span import isolates
from stimnetd.store.records import Disclosed, LedgerView, Release

# Sums of float epsilons drift: ten charges of 0.1 must fit a budget of 1.
BUDGET_SLACK = 1e-12

GROUPED = "a group's cohort (or the groups' together)"


@dataclass(frozen=True)
class Refusal:
    """A rule refused the release. `message` is shown to the researcher; `detail` is what
    the audit entry records beside the rule's name."""

    rule: RefusalRule
    message: str
    detail: Mapping[str, Any] = field(default_factory=dict)

    def audit_detail(self) -> dict[str, Any]:
        return {"policy": self.rule, **self.detail}

    def error(self) -> StimnetError:
        """The exception the researcher's call fails with."""
        if self.rule == "budget":
            return BudgetExhausted(self.message)
        return PrivacyRefusal(self.rule, self.message)


def budget_message(catalog: str, epsilon: float, spent: float, budget: float) -> str:
    return (f"privacy budget exhausted on catalog {catalog!r}: this query needs epsilon "
            f"{epsilon:g}, {max(budget - spent, 0):g} of {budget:g} remains for you at this site")


def budget_refusal(catalog: str, epsilon: float, spent: float,
                   policy: PrivacyPolicy) -> Refusal | None:
    """Refuse spending `epsilon` on `catalog` when `spent` is already charged there."""
    budget = policy.budget_epsilon
    if spent + epsilon <= budget + BUDGET_SLACK:
        return None
    return Refusal("budget", budget_message(catalog, epsilon, spent, budget),
                   {"epsilon": epsilon, "budget": budget})


def catalog_refusal(catalog: str, epsilon: float, view: LedgerView,
                    policy: PrivacyPolicy) -> Refusal | None:
    """Refuse past the site-wide cap on `catalog`, summed over every researcher."""
    cap = policy.catalog_budget_epsilon
    if cap is None:
        return None
    spent = view.catalog_spent()
    if spent + epsilon <= cap + BUDGET_SLACK:
        return None
    return Refusal("budget", f"this site's privacy budget for catalog {catalog!r} across all "
                   f"researchers is exhausted: this query needs epsilon {epsilon:g}, "
                   f"{max(cap - spent, 0):g} of {cap:g} remains (catalog_budget_epsilon)",
                   {"epsilon": epsilon, "catalog_budget": cap})


def delta_refusal(catalog: str, delta: float, spent: float,
                  policy: PrivacyPolicy) -> Refusal | None:
    """Refuse charging `delta` on `catalog` when `spent` delta is already charged there."""
    budget = policy.budget_delta
    if spent + delta <= budget * (1 + 1e-9):
        return None
    return Refusal("budget", f"privacy budget exhausted on catalog {catalog!r}: this query "
                   f"needs delta {delta:g}, {max(budget - spent, 0):g} of {budget:g} remains "
                   "for you at this site", {"delta": delta, "budget_delta": budget})


def decide(view: LedgerView, release: Release, policy: PrivacyPolicy, *,
           overlap_guard: bool = True) -> Refusal | None:
    """The first rule that refuses `release`, or None to record it.

    A noised release (one that charges epsilon) is judged by the budget alone: DP bounds
    what it adds to any earlier release, and a refusal decided on exact cohorts would be a
    data-dependent output outside the (epsilon, delta) guarantee.

    `overlap_guard`: the site's `[privacy] overlap_guard`; without it only the budget
    applies."""
    if release.epsilon:
        return (budget_refusal(release.catalog, release.epsilon, view.spent(), policy)
                or catalog_refusal(release.catalog, release.epsilon, view, policy)
                or (delta_refusal(release.catalog, release.delta, view.spent_delta(), policy)
                    if release.delta else None))
    if not overlap_guard or release.decision == "suppressed":
        return None
    if release.linear:
        return linear_refusal(view, release)
    disclosed = release.disclosed()
    if not disclosed:
        return None
    return overlap_refusal(view, release, disclosed, policy.k_min)


def describe(quantity: str) -> str:
    if quantity == "1":
        return "count (whether they are in a cohort)"
    kind, _, what = quantity.partition(":")
    if kind == "sum":
        return f"value of {' × '.join(what.split('*'))}"
    return f"image {' weighted by '.join(what.split('*'))}"


def linear_refusal(view: LedgerView, release: Release) -> Refusal | None:
    """Refuse an exact release whose linear statistics, with the researcher's earlier ones
    of the same quantity on the catalog, isolate one subject (privacy/span.py)."""
    by_quantity: dict[str, dict[str, frozenset[str]]] = {}
    for quantity, members, digest in release.linear:
        by_quantity.setdefault(quantity, {})[digest] = members
    for quantity, new in sorted(by_quantity.items()):
        if view.linear_known(quantity, list(new)):
            continue  # nothing this release adds to the span
        earlier = [(m, d, j) for m, d, j in view.linear_history(quantity) if d not in new]
        cohorts = [m for m, _, _ in earlier] + list(new.values())
        hit = isolates(cohorts)
        if hit is None:
            continue
        jobs = sorted({earlier[i][2] for i in hit.cohorts if i < len(earlier)})
        where = (f"your earlier job(s) {', '.join(jobs)}" if jobs
                 else "the other cells or bins of this same query")
        message = (
            f"refused by exact auditing (rule: no subject's contribution may be derivable): "
            f"together with {where}, this release would give one subject's "
            f"{describe(quantity)} exactly, by adding and subtracting released sums. Ask "
            "with differential privacy (--epsilon), or use a coarser grouping or a cohort "
            "that does not differ from those by single subjects")
        return Refusal("overlap", message, {"reason": message, "rule": "linear span",
                                            "quantity": quantity, "earlier_jobs": jobs})
    return None


def overlap_refusal(view: LedgerView, release: Release, disclosed: Disclosed,
                    k_min: int) -> Refusal | None:
    """Refuse a disclosed cohort, or a union of the release's cells, that differs from an
    earlier one by 1..k_min-1 subjects. The view is asked only for what is within k_min - 1,
    which is all the rules can refuse."""
    window = k_min - 1
    what = GROUPED if release.guarded else "cohort"
    try:
        for members, digest in disclosed:
            check_overlap(members, view.near_cohorts(members, digest, window), k_min, what)
        atoms = release.atoms or disclosed[:1]
        check_union_overlap([members for members, _ in atoms],
                            view.near_families(atoms, window), k_min)
    except PrivacyRefusal as refused:
        return Refusal("overlap", refused.message, {"reason": refused.message})
    return None
