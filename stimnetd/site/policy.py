"""Which researcher scripts this site runs: its script policy, the same for the jobs it is the
entry of and for the sub-jobs its peers send it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from stimnetd.store import SiteStore

# auto: run at once; review: an admin approves each script (by its hash) first; deny: never.
ScriptReview = Literal["auto", "review", "deny"]
# What a restart does with a script job that was running: interrupt it, or run it again.
RestartRule = Literal["interrupt", "requeue"]


@dataclass(frozen=True)
class ScriptPolicy:
    review: ScriptReview = "review"
    concurrency: int = 1
    on_restart: RestartRule = "interrupt"
    # Scripts one researcher may leave waiting for an admin here.
    max_pending_per_researcher: int = 16

    async def needs_review(self, store: SiteStore, sha256: str) -> bool:
        """Whether a script waits for an admin: under 'review', until its hash is approved."""
        return self.review == "review" and not await store.is_script_approved(sha256)
