"""Sample-and-aggregate's runs: the script once per block, each in a container of its own
that sees only its block's rows and files (sandbox/blockdata.py).

What each run ended in (its status, exit code, failure reason, logs, output) stays at the
site, in its log at most: a block that failed counts as its outputs' default values
(privacy/blocks.py), so the researcher learns nothing per block, not even that one failed.
The runs share nothing: a fresh container each, over a fresh copy of its block's data,
removed before the next begins.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import structlog

from stimnet.query.spec import QuerySpec
from stimnet.signing import VerifiedJob
from stimnetd.catalog import Catalog
from stimnetd.jobs.fair import FairSlots
from stimnetd.privacy.policy import PrivacyRefusal
from stimnetd.query.aggregate import Partial
from stimnetd.sandbox import SandboxOutcome, SandboxRunner, check_declared, job_manifest, parse_result
from stimnetd.sandbox.blockdata import remove_block, write_block
from stimnetd.sandbox.result import ResultRejected

if TYPE_CHECKING:
    from stimnetd.sandbox.kube import KubeRunner

log = structlog.get_logger("stimnetd.jobs.blocks")


def require_block_runner(runner: SandboxRunner | KubeRunner) -> None:
    """PrivacyRefusal("dp") unless `runner` can give each block its own data: the Docker
    runner writes each block's share where its container alone mounts it; the Kubernetes
    runner mounts the catalog's volume as it is, so a block would see every subject."""
    if not isinstance(runner, SandboxRunner):
        raise PrivacyRefusal("dp", "this site runs scripts on Kubernetes ([scripts] backend), "
                             "which cannot give each block of subjects its own data, so it "
                             "cannot run a script under differential privacy "
                             "(sample-and-aggregate needs backend = \"docker\"); ask without "
                             "noise where the site allows it, or as a query")


async def run_blocks(runner: SandboxRunner | KubeRunner, slots: FairSlots, job: VerifiedJob,
                     catalog: Catalog, declared: QuerySpec, blocks: Sequence[Sequence[str]],
                     on_duration: Callable[[float], None]) -> list[list[Partial] | None]:
    """Each block's checked result, or None where its run failed or its result is not
    exactly the declaration. Each block takes a fair slot of its own (`[scripts]
    concurrency` of them run at once), so other researchers' jobs interleave with a long
    sample-and-aggregate job."""
    require_block_runner(runner)
    assert isinstance(runner, SandboxRunner)
    tables = {t: str(p.relative_to(catalog.root)) for t, p in catalog.config.tables.items()}
    manifest = job_manifest(tables, catalog.subject_key, catalog.fields)
    job_id = job.request.job_id
    job_dir = runner.claim_blocks(job_id)
    # A re-queued job's earlier attempt may have left its blocks' data behind.
    await asyncio.to_thread(remove_block, job_dir)
    researcher = job.researcher.name

    async def run_one(i: int, subjects: Sequence[str]) -> list[Partial] | None:
        dest = job_dir / f"b{i}"
        async with slots.slot(researcher):
            # Written once the block's turn comes: at most `concurrency` blocks on disk.
            await asyncio.to_thread(write_block, dest, catalog.root, tables,
                                    catalog.subject_key, catalog.image_fields(), subjects)
            try:
                outcome = await runner.run(f"{job_id}.b{i}", job.signed.script, dest, manifest)
            finally:
                await asyncio.shield(asyncio.to_thread(remove_block, dest))
        on_duration(outcome.duration_s)
        if outcome.status != "succeeded":
            log.info("sample-and-aggregate block failed", job_id=job_id, block=i,
                     status=outcome.status, reason=outcome.reason)
        return await _checked(outcome, catalog, declared, len(subjects))

    try:
        async with asyncio.TaskGroup() as tg:
            runs = [tg.create_task(run_one(i, s)) for i, s in enumerate(blocks)]
    finally:
        await asyncio.shield(asyncio.to_thread(remove_block, job_dir))
        runner.release_blocks(job_id)
    results = [r.result() for r in runs]
    log.info("sample-and-aggregate blocks ran", job_id=job_id, blocks=len(blocks),
             failed=sum(r is None for r in results))
    return results


async def _checked(outcome: SandboxOutcome, catalog: Catalog, declared: QuerySpec,
                   rows: int) -> list[Partial] | None:
    if outcome.status != "succeeded":
        return None
    geometry = {f: catalog.geometry(f) for f in catalog.image_fields()}
    try:
        partials = await asyncio.to_thread(parse_result, outcome.result, outcome.arrays,
                                           catalog.fields, rows, geometry=geometry)
        check_declared(partials, declared, catalog.fields)
    except ResultRejected as exc:
        log.info("sample-and-aggregate block result rejected", reason=str(exc))
        return None
    return partials
