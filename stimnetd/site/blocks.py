"""A noised script job's share at this site: sample-and-aggregate (privacy/blocks.py).

The script runs once per block of subjects (jobs/blocks.py); the blocks' clamped outputs
are averaged and noised here, so what leaves the site is DP however the script behaves.

How long the blocks ran is the script's to choose (a sleep that depends on a subject's
value), and the answer's release time would carry it past DP. So the share is held until
the first multiple of `[scripts] release_slot_s` after its start: its release time says
only how many slots the job took, and nothing when every run of it fits in one (a site
makes that so with a slot of at least ceil(B / concurrency) × (timeout_s + a container's
start)).
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Callable, Sequence
from typing import Protocol

import structlog

from stimnet.query.spec import QuerySpec
from stimnet.signing import VerifiedJob
from stimnetd.catalog import Catalog
from stimnetd.config import BlockSplit
from stimnetd.privacy import blocks
from stimnetd.privacy.noise import NoiseReport, NoiseSource
from stimnetd.query.aggregate import Partial

log = structlog.get_logger("stimnetd.site.blocks")


class BlockScripts(Protocol):
    """The part of a script runner (jobs/scripts.SandboxScripts) sample-and-aggregate uses."""

    @property
    def release_slot_s(self) -> float:
        """A noised share is released at a multiple of this after its start (0: at once)."""

    def declaration(self, job: VerifiedJob, catalog: Catalog) -> QuerySpec | None:
        """The job's declared outputs checked against `catalog` (QueryError, StimnetError
        if they are unusable here); None when it declares none and the site allows that."""

    def check_blocks(self) -> None:
        """PrivacyRefusal("dp") if this runner cannot give each block its own data."""

    async def blocks(self, job: VerifiedJob, catalog: Catalog, declared: QuerySpec,
                     blocks: Sequence[Sequence[str]]) -> list[list[Partial] | None]:
        """The script once per block of subjects: each block's result, None if it failed."""


async def sample_aggregate(scripts: BlockScripts, job: VerifiedJob, catalog: Catalog,
                           epsilon: float, *, split: BlockSplit, noise: NoiseSource,
                           secret: bytes, clock: Callable[[], float] = time.monotonic
                           ) -> tuple[list[Partial], NoiseReport]:
    """The job's released outputs and the ε they cost, returned at a multiple of the
    release slot after the call. PrivacyRefusal("dp") when its declaration gives no range
    for an output (before anything runs)."""
    started = clock()
    declared = require_noised(scripts, scripts.declaration(job, catalog), catalog.name)
    # Keyed per catalog, so one catalog's blocks say nothing of another's.
    key = secret + b"\0blocks\0" + catalog.name.encode()
    groups = blocks.assign(sorted(catalog.subject_ids()), key, split.blocks(catalog.n_subjects))
    per_block = await scripts.blocks(job, catalog, declared, groups)
    released = blocks.release(declared, blocks.cells(declared, catalog.fields), per_block,
                              epsilon, noise, n_subjects=catalog.n_subjects)
    ran_s = clock() - started
    slots = await hold_to_slot(started, scripts.release_slot_s, clock)
    log.info("noised script share held to its release slot", job_id=job.request.job_id,
             ran_s=round(ran_s, 3), slots=slots, slot_s=scripts.release_slot_s)
    return released


def require_noised(scripts: BlockScripts, declared: QuerySpec | None,
                   catalog: str) -> QuerySpec:
    """The declaration of a script job to be noised, once this site can run it so:
    PrivacyRefusal("dp") naming why not (its backend cannot run blocks, an output has no
    range) before anything runs."""
    scripts.check_blocks()
    return blocks.require_ranges(declared, catalog)


async def hold_to_slot(started: float, slot_s: float,
                       clock: Callable[[], float] = time.monotonic) -> int:
    """Sleep until the first multiple of `slot_s` after `started` (at least one slot);
    how many slots that is (0 when `slot_s` is 0: no hold)."""
    if slot_s <= 0:
        return 0
    slots = max(1, math.ceil((clock() - started) / slot_s))
    while (left := started + slots * slot_s - clock()) > 0:
        await asyncio.sleep(left)
    if slots > 1:
        log.warning("a noised script share overran its release slot: its release time "
                    "says how many slots it took", slots=slots, slot_s=slot_s)
    return slots
