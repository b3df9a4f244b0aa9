"""The states that cross the wire, named once for the daemon and the client."""

from __future__ import annotations

from typing import Final, Literal

JobState = Literal["queued", "awaiting_approval", "running", "succeeded", "failed", "cancelled",
                   "interrupted"]
JOB_STATES: Final[tuple[JobState, ...]] = ("queued", "awaiting_approval", "running", "succeeded",
                                           "failed", "cancelled", "interrupted")
TERMINAL_STATES: Final[frozenset[JobState]] = frozenset({"succeeded", "failed", "cancelled",
                                                         "interrupted"})
