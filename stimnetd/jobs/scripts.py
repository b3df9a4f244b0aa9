"""Researcher scripts: run in the sandbox, validated into Partials, then the privacy layer.

The script's output is untrusted data: `parse_result` checks it against the catalog's
declared schema and bounds (an n above the catalog's size, sums outside n·bounds, off-grid
maps are refused) and the site's privacy layer then applies k_min and DP with the
catalog's bounds — never with anything the script claims about itself.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

from stimnetd.catalog import Catalog
from stimnetd.errors import StimnetError
from stimnetd.jobs.signing import VerifiedJob
from stimnetd.query.aggregate import Partial
from stimnetd.query.spec import AggSpec, QuerySpec
from stimnetd.sandbox.result import parse_result
from stimnetd.sandbox.runner import SandboxRunner, job_manifest


class ScriptFailed(StimnetError):
    """The script ran and failed (or hit a limit); the message is the sanitised reason."""

    code = "FAILED_PRECONDITION"


class SandboxScripts:
    """The SiteExecutor's script runner: sandbox → validated Partials."""

    def __init__(self, runner: SandboxRunner, *, log_policy: str,
                 on_duration: Callable[[float], None] = lambda s: None) -> None:
        self._runner = runner
        self._log_policy = log_policy
        self._on_duration = on_duration

    async def __call__(self, job: VerifiedJob, catalog: Catalog,
                       on_event: Callable[[str, str], Awaitable[None]]
                       ) -> tuple[list[Partial], frozenset[str] | None]:
        manifest = job_manifest({t: str(p.relative_to(catalog.root))
                                 for t, p in catalog.config.tables.items()},
                                catalog.subject_key, catalog.fields)
        outcome = await self._runner.run(job.request.job_id, job.signed.script, catalog.root,
                                         manifest)
        self._on_duration(outcome.duration_s)
        if self._log_policy == "full":
            for line in outcome.log_lines:
                await on_event("log", line)
        if outcome.status != "succeeded":
            if self._log_policy != "none":
                await on_event("log", outcome.reason)
            raise ScriptFailed(f"script {outcome.status}: {outcome.reason}")
        geometry = {f: catalog.geometry(f) for f in catalog.image_fields()}
        # Off the loop: checking a result of voxel maps is seconds of numpy at worst.
        partials = await asyncio.to_thread(parse_result, outcome.result, outcome.arrays,
                                           catalog.fields, catalog.n_subjects, geometry=geometry)
        # A script's cohort is unknown to the site (it chose its rows itself), so the
        # overlap guard cannot apply; k_min and DP still do.
        return partials, None

    async def cancel(self, job_id: str) -> bool:
        return await self._runner.cancel(job_id)


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
        aggs[p.name] = _agg(p)
    return QuerySpec(catalog=catalog, where=None, group_by=tuple(group_by),
                     aggregates=tuple(aggs.values()))


def _agg(p: Partial) -> AggSpec:
    m: dict[str, Any] = p.meta
    func = m.get("func", p.kind)
    if p.kind == "count":
        return AggSpec("count", (), p.name)
    if p.kind == "moments":
        return AggSpec(func, (m["field"],), p.name)
    if p.kind == "histogram":
        return AggSpec("histogram", (m["field"],), p.name, tuple(m["edges"]))
    if p.kind == "crossprod":
        names = tuple(m["fields"])
        if func == "regression":
            return AggSpec("regression", (names[-1], *names[:-1]), p.name)
        return AggSpec("corr", names, p.name)
    if p.kind == "contingency":
        return AggSpec("contingency", tuple(m["fields"]), p.name)
    if p.kind == "voxel_map":
        fields = (m["column"],) + ((m["weight"],) if m.get("weight") else ())
        return AggSpec(func, fields, p.name)
    raise ScriptFailed(f"output {p.name!r}: kind {p.kind} cannot be presented")
