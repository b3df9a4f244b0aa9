"""A noised script job's share at this site: sample-and-aggregate (privacy/blocks.py).

The script runs once per block of subjects (jobs/blocks.py); the blocks' clamped outputs
are averaged and noised here, so what leaves the site is DP however the script behaves.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from stimnet.query.spec import QuerySpec
from stimnet.signing import VerifiedJob
from stimnetd.catalog import Catalog
from stimnetd.config import BlockSplit
from stimnetd.privacy import blocks
from stimnetd.privacy.noise import NoiseReport, NoiseSource
from stimnetd.query.aggregate import Partial


class BlockScripts(Protocol):
    """The part of a script runner (jobs/scripts.SandboxScripts) sample-and-aggregate uses."""

    def declaration(self, job: VerifiedJob, catalog: Catalog) -> QuerySpec | None:
        """The job's declared outputs checked against `catalog` (QueryError, StimnetError
        if they are unusable here); None when it declares none and the site allows that."""

    async def blocks(self, job: VerifiedJob, catalog: Catalog, declared: QuerySpec,
                     blocks: Sequence[Sequence[str]]) -> list[list[Partial] | None]:
        """The script once per block of subjects: each block's result, None if it failed."""


async def sample_aggregate(scripts: BlockScripts, job: VerifiedJob, catalog: Catalog,
                           epsilon: float, *, split: BlockSplit, noise: NoiseSource,
                           secret: bytes) -> tuple[list[Partial], NoiseReport]:
    """The job's released outputs and the ε they cost. PrivacyRefusal("dp") when its
    declaration gives no range for an output (before anything runs)."""
    declared = blocks.require_ranges(scripts.declaration(job, catalog), catalog.name)
    # Keyed per catalog, so one catalog's blocks say nothing of another's.
    key = secret + b"\0blocks\0" + catalog.name.encode()
    groups = blocks.assign(sorted(catalog.subject_ids()), key, split.blocks(catalog.n_subjects))
    per_block = await scripts.blocks(job, catalog, declared, groups)
    return blocks.release(declared, blocks.cells(declared, catalog.fields), per_block,
                          epsilon, noise, n_subjects=catalog.n_subjects)
