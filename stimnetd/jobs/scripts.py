"""Researcher scripts: run in the sandbox, validated into Partials, then the privacy layer.

The script's output is untrusted data: `parse_result` checks it against the catalog's
declared schema and bounds (an n above the catalog's size, sums outside n·bounds, off-grid
maps are refused) and the site's privacy layer then applies k_min and DP with the
catalog's bounds — never with anything the script claims about itself.

A script job declares its outputs in the signed request, in the query language
(`SELECT count(*) AS n, avg(age) AS mean_age FROM c GROUP BY sex`: no WHERE, the script
picks its rows): `declared_spec` checks the declaration against the catalog before the
script runs, and `stimnetd.sandbox.check_declared` holds the result to it exactly (why:
stimnetd/sandbox/declared.py). Sites require the declaration by default
(`[scripts] declared_outputs`).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, Any

import structlog

from stimnet.errors import QueryError, StimnetError
from stimnet.query.spec import AggSpec, QuerySpec, validate
from stimnet.signing import VerifiedJob
from stimnetd.catalog import Catalog
from stimnetd.jobs.blocks import require_block_runner, run_blocks
from stimnetd.jobs.fair import FairSlots
from stimnetd.query.aggregate import Partial
from stimnetd.sandbox import (
    NAME_RE,
    SandboxRunner,
    agg_spec,
    check_declared,
    job_manifest,
    parse_result,
)
from stimnetd.sandbox.failure import (
    CANCELLED,
    CRASHED,
    INVALID_OUTPUT,
    TIMED_OUT,
    public_reason,
)
from stimnetd.sandbox.result import ResultRejected

# What a script can emit (stimnet_runtime's emit_* and the result format's kinds).
SCRIPT_FUNCS = ("count", "sum", "mean", "var", "sd", "histogram", "corr", "regression",
                "contingency", "count_map", "mean_map")
# A grouped output's cells are every combination of its group fields' levels: bounded.
if TYPE_CHECKING:
    from stimnetd.sandbox.kube import KubeRunner

MAX_DECLARED_CELLS = 10_000
log = structlog.get_logger("stimnetd.jobs.scripts")


class ScriptFailed(StimnetError):
    """The script ran and failed (or hit a limit); the message is the sanitised reason."""

    code = "FAILED_PRECONDITION"


class SandboxScripts:
    """LocalSite's script runner (site.ScriptRunner): sandbox → validated Partials."""

    def __init__(self, runner: SandboxRunner | KubeRunner, *, log_policy: str,
                 declared_outputs: str = "required", concurrency: int = 1,
                 on_duration: Callable[[float], None] = lambda s: None,
                 release_slot_s: float = 0.0) -> None:
        self._runner = runner
        # site/blocks.py: a noised share is released at a multiple of this after its start.
        self.release_slot_s = release_slot_s
        # `[scripts] concurrency` containers at once, whoever asks: this site's own jobs
        # (JobService also queues those) and the sub-jobs of every entry node, which would
        # otherwise each start a container the moment they arrive.
        # Shared fairly between researchers (jobs/fair.py), as JobRunner's are.
        self._slots = FairSlots(concurrency)
        self._log_policy = log_policy
        self._declared_outputs = declared_outputs
        self._on_duration = on_duration

    def declaration(self, job: VerifiedJob, catalog: Catalog) -> QuerySpec | None:
        """The job's declared outputs, checked against this catalog (before its script
        runs); None when it declares none and this site allows that."""
        doc = job.request.spec
        if doc is None:
            if self._declared_outputs == "required":
                raise DeclarationRefused(
                    "this site requires a script job to declare its outputs ([scripts] "
                    "declared_outputs = 'required'): submit it with the aggregates it emits, "
                    "e.g. stimctl submit SCRIPT --outputs \"SELECT count(*) AS n FROM "
                    f"{catalog.name}\"")
            return None
        return declared_spec(doc, catalog)

    async def __call__(self, job: VerifiedJob, catalog: Catalog,
                       on_log: Callable[[str], Awaitable[None]]
                       ) -> tuple[list[Partial], frozenset[str] | None]:
        declared = self.declaration(job, catalog)
        manifest = job_manifest({t: str(p.relative_to(catalog.root))
                                 for t, p in catalog.config.tables.items()},
                                catalog.subject_key, catalog.fields)
        async with self._slots.slot(job.researcher.name):
            outcome = await self._runner.run(job.request.job_id, job.signed.script,
                                             catalog.root, manifest)
        self._on_duration(outcome.duration_s)
        if self._log_policy == "full":
            for line in outcome.log_lines:
                await on_log(line)
        if outcome.status != "succeeded":
            # The detail (an exception type and line, an exit status) is the script's to
            # choose, so it stays in the site's log unless log_policy is "full".
            log.info("script job failed", job_id=job.request.job_id, status=outcome.status,
                     reason=outcome.reason)
            reason = self._told(outcome.kind or _default_kind(outcome.status), outcome.reason)
            if self._log_policy != "none":
                await on_log(reason)
            raise ScriptFailed(f"script {outcome.status}: {reason}")
        geometry = {f: catalog.geometry(f) for f in catalog.image_fields()}
        try:
            # Off the loop: a result may hold MAX_RESULT_ELEMENTS numbers to check.
            partials = await asyncio.to_thread(parse_result, outcome.result, outcome.arrays,
                                               catalog.fields, catalog.n_subjects,
                                               geometry=geometry)
        except ResultRejected as exc:
            if self._log_policy == "full":
                raise
            log.info("script result rejected", job_id=job.request.job_id, reason=str(exc))
            raise ResultRejected(self._told(INVALID_OUTPUT, str(exc))) from None
        if declared is not None:
            # Its refusals quote only the job's own signed declaration, never the script.
            check_declared(partials, declared, catalog.fields)
        # A script's cohort is unknown to the site (it chose its rows itself), so the
        # overlap guard cannot apply; k_min and DP still do.
        return partials, None

    async def blocks(self, job: VerifiedJob, catalog: Catalog, declared: QuerySpec,
                     blocks: Sequence[Sequence[str]]) -> list[list[Partial] | None]:
        """The script run once per block of subjects (sample-and-aggregate, jobs/blocks.py):
        each block's checked result, or None where it failed."""
        return await run_blocks(self._runner, self._slots, job, catalog, declared, blocks,
                                self._on_duration)

    def check_blocks(self) -> None:
        """PrivacyRefusal("dp") if this site's backend cannot run sample-and-aggregate."""
        require_block_runner(self._runner)

    def _told(self, kind: str, detail: str) -> str:
        """What the researcher is told of a failure: the detail only under "full"."""
        if self._log_policy == "full":
            return detail
        return public_reason(kind, getattr(self._runner, "limits", None), detail)

    async def cancel(self, job_id: str) -> bool:
        return await self._runner.cancel(job_id)


def _default_kind(status: str) -> str:
    return {"timeout": TIMED_OUT, "cancelled": CANCELLED}.get(status, CRASHED)


class DeclarationRefused(StimnetError):
    """A script job's output declaration is missing or unusable at this site."""

    code = "FAILED_PRECONDITION"
    policy = "declared_outputs"


def declared_spec(doc: Any, catalog: Catalog) -> QuerySpec:
    """A script job's declaration (a query spec's aggregates and GROUP BY), checked against
    `catalog`: each output something a script can emit, each group field with declared
    levels. QueryError says what is wrong."""
    if not isinstance(doc, dict):
        raise QueryError("a script's declared outputs must be a query spec (an object)")
    spec = QuerySpec.from_dict(doc)
    if spec.catalog != catalog.name:
        raise QueryError(f"the declared outputs name catalog {spec.catalog!r}, the job "
                         f"{catalog.name!r}")
    if spec.where is not None:
        raise QueryError("a script's declared outputs have no WHERE: the script chooses its "
                         "rows itself")
    validate(spec, catalog.fields)
    for agg in spec.aggregates:
        if agg.func not in SCRIPT_FUNCS:
            raise QueryError(f"output {agg.name!r}: a script cannot emit {agg.func} (it can "
                             f"emit {', '.join(SCRIPT_FUNCS)})")
        if agg.func == "count" and agg.fields:
            raise QueryError(f"output {agg.name!r}: a script's count is count(*) (the rows it "
                             "chose)")
        if not NAME_RE.match(agg.name):
            raise QueryError(f"output {agg.name!r}: not a name a script can emit "
                             f"({NAME_RE.pattern})")
    cells = 1
    for name in spec.group_by:
        levels = catalog.fields[name].levels
        if not levels:
            raise QueryError(f"GROUP BY {name!r}: a script's groups are its fields' declared "
                             f"levels, and {name!r} declares none")
        cells *= len(levels)
    if cells > MAX_DECLARED_CELLS:
        raise QueryError(f"GROUP BY {', '.join(spec.group_by)}: {cells} group cells; at most "
                         f"{MAX_DECLARED_CELLS} for a script")
    return spec


def spec_from_partials(catalog: str, partials: list[Partial]) -> QuerySpec:
    """The query a script's outputs correspond to, so the finaliser can present them."""
    aggs: dict[str, AggSpec] = {}
    group_by: list[str] = []
    for p in partials:
        for field, _ in p.group:
            if field not in group_by:
                group_by.append(field)
        if p.name in aggs:
            continue
        agg = agg_spec(p)
        if agg is None:
            raise ScriptFailed(f"output {p.name!r}: kind {p.kind} cannot be presented")
        aggs[p.name] = agg
    return QuerySpec(catalog=catalog, where=None, group_by=tuple(group_by),
                     aggregates=tuple(aggs.values()))
