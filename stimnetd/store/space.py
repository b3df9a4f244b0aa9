"""Room on the state volume: the site-wide free-space floor and the per-researcher quota on
stored answers, checked before a job is accepted so the disk never fills with answers.

Checked at admission (the entry keeps the combined answer) and before a site computes its
share (it keeps its release's partials for re-delivery). A check, not a reservation: two
jobs admitted together may both pass: the floor is what keeps the ledger and audit chain
room to commit whatever gets past it, and a full volume is refused cleanly (StorageFull).
"""

from __future__ import annotations

import shutil
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from stimnet.errors import StorageFull, StorageQuotaExceeded
from stimnetd.store.transaction import NO_SPACE

if TYPE_CHECKING:
    from stimnetd.store.contract import SiteStore

MB = 1024 * 1024
# After a write failed for want of space, new jobs are admitted again once this much is free.
RECOVERED = 4 * MB
# Below this, whatever `min_free_mb` says, the store could not record a job (its row, a
# release, their audit entries and the WAL's growth): the job is refused before anything
# runs. At an entry that matters beyond this node: a job it cannot keep is never fanned
# out, so no peer computes or charges for an answer the entry would fail to deliver.
WRITABLE = 1 * MB


class StorageGuard:
    """Refuses new work when the state volume is low or the researcher's stored answers are
    at their quota. `stored_bytes` reads the store (Store.stored_bytes)."""

    def __init__(self, state_dir: Path, stored_bytes: Callable[[str], Awaitable[int]], *,
                 min_free_mb: float, max_stored_mb_per_researcher: float,
                 out_of_space: Callable[[], bool] = lambda: False,
                 free_bytes: Callable[[Path], int] | None = None,
                 max_answer_mb: float | None = None) -> None:
        self._dir = state_dir
        self._stored = stored_bytes
        self._min_free = min_free_mb * MB
        self._quota = max_stored_mb_per_researcher * MB
        self._free_bytes = free_bytes or (lambda p: shutil.disk_usage(p).free)
        self._out_of_space = out_of_space
        self.min_free_mb = min_free_mb
        self.max_stored_mb_per_researcher = max_stored_mb_per_researcher
        # [storage] max_answer_mb, checked against a query's plan by the site (None: none).
        self.max_answer_mb = max_answer_mb

    @classmethod
    def of(cls, store: SiteStore, settings: Any) -> StorageGuard:
        """The guard of `store`'s volume, with `settings` ([storage], config.StorageSettings)."""
        return cls(store.state_dir or Path("."), store.stored_bytes, min_free_mb=settings.min_free_mb,
                   max_stored_mb_per_researcher=settings.max_stored_mb_per_researcher,
                   out_of_space=lambda: store.out_of_space,
                   max_answer_mb=settings.max_answer_mb)

    def check_space(self) -> None:
        try:
            free = self._free_bytes(self._dir)
        except OSError:
            return  # the store's own writes will say what is wrong with the volume
        if free < WRITABLE or (self._out_of_space() and free < RECOVERED):
            # Nearly full, or the store's last write found it full and nothing has freed
            # much since: accepting the job would only fail it after its sites computed.
            raise StorageFull(NO_SPACE)
        if free < self._min_free:
            raise StorageFull(
                f"this node's state volume has {free / MB:.0f} MiB free, below its "
                f"[storage] min_free_mb = {self.min_free_mb:g}: it accepts no new jobs until "
                "its operator frees space (reads, status and audit still work)")

    async def check(self, researcher: str) -> None:
        """Raise StorageFull or StorageQuotaExceeded if `researcher` may not add an answer."""
        self.check_space()
        stored = await self._stored(researcher)
        if stored >= self._quota:
            raise StorageQuotaExceeded(
                f"your answers stored at this node take {stored / MB:.1f} MiB, its limit "
                f"([storage] max_stored_mb_per_researcher = "
                f"{self.max_stored_mb_per_researcher:g}); they are freed as your finished "
                "jobs pass the node's job retention, or ask its operator for a larger quota")
