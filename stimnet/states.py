"""The words a job's and a site's progress are told in, shared by the daemon and the client.

Each vocabulary is a `Literal`, so a misspelt state is a type error, not a silent branch
that never runs. This module imports nothing from `stimnetd`: the client reads the same
states off the wire.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final, Literal, get_args

JobState = Literal["queued", "awaiting_approval", "running", "succeeded", "failed", "cancelled",
                   "interrupted"]
JOB_STATES: Final[tuple[JobState, ...]] = get_args(JobState)
# Nothing follows these: a watcher's stream ends, a restart leaves the job alone.
TERMINAL_STATES: Final[frozenset[JobState]] = frozenset(
    {"succeeded", "failed", "cancelled", "interrupted"})
# A job in one of these waits for a slot or for an admin: the node's queue.
WAITING_STATES: Final[tuple[JobState, ...]] = ("queued", "awaiting_approval")
# A job in one of these was under way: a restart interrupts or re-queues it.
UNFINISHED_STATES: Final[tuple[JobState, ...]] = ("queued", "running")
# How many times a job interrupted mid-run is re-queued (`on_restart = "requeue"`): once,
# so a job that itself brings its node down is interrupted the second time, not re-run
# in a loop.
MAX_REQUEUES: Final = 1

SiteState = Literal["accepted", "running", "done", "suppressed", "refused", "failed",
                    "timed_out"]
SITE_STATES: Final[tuple[SiteState, ...]] = get_args(SiteState)
# A site's share under way: reported once each, then its final state.
SITE_PROGRESS: Final[frozenset[SiteState]] = frozenset({"accepted", "running"})
SITE_FINAL: Final[frozenset[SiteState]] = frozenset(
    {"done", "suppressed", "refused", "failed", "timed_out"})

# Which rule refused a release: the audit log and the researcher's report key on it.
RefusalKind = Literal["k_min", "dp", "budget", "overlap", "declared_outputs"]
REFUSAL_KINDS: Final[tuple[RefusalKind, ...]] = get_args(RefusalKind)


@dataclass(frozen=True)
class SiteEvent:
    """One site's step in a job, as the entry node heard it (`at`: when, epoch seconds)."""

    site: str
    state: SiteState
    detail: str = ""
    n: int = 0
    at: float = 0.0


__all__ = ["JOB_STATES", "JobState", "MAX_REQUEUES", "REFUSAL_KINDS", "RefusalKind", "SITE_FINAL",
           "SITE_PROGRESS", "SITE_STATES", "SiteEvent", "SiteState", "TERMINAL_STATES",
           "UNFINISHED_STATES", "WAITING_STATES"]
