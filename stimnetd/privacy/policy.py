"""A site's privacy policy and the refusals it produces.

The policy is the site's, never the researcher's: the researcher may *ask* for an epsilon,
the site decides whether and how much noise is added. Refusal messages are shown to the
researcher verbatim, so they name the rule and the site's threshold and never a count,
value or anything else computed from data.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

from stimnet import errors
from stimnetd.config import BlockSplit

DpMode = Literal["off", "optional", "required"]
DP_MODES: tuple[DpMode, ...] = ("off", "optional", "required")

# Which rule refused; the audit log and the caller's report key on it.
RefusalRule = Literal["k_min", "dp", "budget", "overlap"]


class PrivacyRefusal(errors.Refused):
    """The site's privacy policy refuses to release (or to compute) a result.

    `policy` names the rule that refused: "k_min", "dp" or "overlap" (the budget rule's
    refusal is errors.BudgetExhausted, whose wire status differs).
    """

    def __init__(self, policy: RefusalRule, message: str) -> None:
        super().__init__(message)
        self.policy = policy
        self.message = message


@dataclass(frozen=True)
class PrivacyPolicy:
    """What a site lets leave it: the k_min threshold and its differential-privacy rules.

    `dp` is "off" (never add noise), "optional" (noise only when the researcher asks for an
    epsilon) or "required" (always; the researcher's epsilon or else `default_epsilon`).
    `budget_epsilon` is the total a (researcher, catalog) pair may spend
    (privacy/release.budget_refusal, run in the release's transaction).
    `delta` is what each noised query is charged beside its epsilon: the bound on the
    chance that a cell of fewer than k_min subjects passes the noisy threshold
    (privacy/threshold.py); `budget_delta` caps its sum like `budget_epsilon`.
    """

    k_min: int = 5
    dp: DpMode = "off"
    default_epsilon: float = 1.0
    max_epsilon_per_query: float = 5.0
    budget_epsilon: float = 10.0
    delta: float = 1e-6
    budget_delta: float = 1e-4
    # Site-wide cap per catalog across every researcher (None: no cap): what colluding
    # researchers, or one with many certificates, can spend together.
    catalog_budget_epsilon: float | None = None
    # How a noised script job's cohort is split for sample-and-aggregate (privacy/blocks.py).
    blocks: BlockSplit = BlockSplit()

    def __post_init__(self) -> None:
        # Config validation lives in config.py; this only stops a policy that would make
        # every check below meaningless from being built by mistake (e.g. in a test).
        if self.k_min < 1:
            raise ValueError(f"k_min must be at least 1, got {self.k_min}")
        if self.dp not in DP_MODES:
            raise ValueError(f"dp must be one of {DP_MODES}, got {self.dp!r}")
        for name in ("default_epsilon", "max_epsilon_per_query", "budget_epsilon"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                raise ValueError(f"{name} must be a positive finite number, got {value}")
        if self.default_epsilon > self.max_epsilon_per_query:
            raise ValueError("default_epsilon exceeds max_epsilon_per_query")
        if not (0 < self.delta < 1 and self.delta <= self.budget_delta):
            raise ValueError("delta must be in (0, 1) and at most budget_delta")


# The smallest epsilon a query may ask for (see _check_requested).
MIN_EPSILON = 1e-6


def decide_epsilon(policy: PrivacyPolicy, requested: float | None) -> float | None:
    """The epsilon this site will spend on a query, or None for no noise.

    dp="off" with a requested epsilon is refused rather than silently ignored: a researcher
    who asked for a DP guarantee must not receive exact values believing them noised.
    """
    if requested is not None:
        if policy.dp == "off":
            raise PrivacyRefusal(
                "dp", "site policy dp=off: this site does not add noise, so it cannot honour "
                "a requested epsilon; resubmit without one"
            )
        _check_requested(policy, requested)
        return float(requested)
    if policy.dp == "required":
        return policy.default_epsilon
    return None


def _check_requested(policy: PrivacyPolicy, requested: float) -> None:
    # bool is an int subclass; True would otherwise pass as epsilon 1.
    if isinstance(requested, bool) or not isinstance(requested, int | float):
        raise PrivacyRefusal("dp", "requested epsilon must be a number")
    if math.isnan(requested) or requested <= 0:
        raise PrivacyRefusal("dp", "requested epsilon must be a number greater than 0")
    if requested < MIN_EPSILON:
        # Split over a query's arrays a subnormal epsilon rounds to 0 (5e-324 / 2 == 0).
        raise PrivacyRefusal("dp", f"requested epsilon {requested:g} is below {MIN_EPSILON:g}, "
                             "the smallest this site accepts: its noise would drown any answer")
    if requested > policy.max_epsilon_per_query:
        raise PrivacyRefusal(
            "dp", f"requested epsilon exceeds this site's maximum per query "
            f"(max_epsilon_per_query = {policy.max_epsilon_per_query:g})"
        )
