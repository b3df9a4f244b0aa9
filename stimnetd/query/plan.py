"""How large a query's answer will be, known before anything is computed.

A voxel map's partial is a dense float64 grid per array (and a byte per voxel for its
withheld-cell mask) for every group, at the site that computes it and at the entry that
combines the sites' shares: grid × groups × arrays, from the spec and the catalog's
declarations alone. `[storage] max_answer_mb` refuses a query whose plan exceeds it
before any image is read (site/local.py's precheck).

The plan uses no data: a group field with declared levels has that many groups; one
without counts as one group per subject (the most it can have), so the decision depends
on the site's subject count, never on which values the query's rows hold.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from stimnet.errors import AnswerTooLarge
from stimnet.query.spec import AggSpec, QuerySpec
from stimnet.query.voxeltests import VOXEL_TESTS
from stimnetd.catalog.view import CatalogView

MB = 2**20


@dataclass(frozen=True)
class AnswerPlan:
    bytes: int
    groups: int
    maps: int
    # Every group field declares its levels: `groups` is exact, and may be named.
    declared: bool


def _arrays(a: AggSpec, continuous: bool) -> int:
    """Float64 arrays per voxel of one map aggregate, as its partial carries them: the
    covering count, Σ weight for a weighted mean, n, Σw and Σw² for the voxel tests; a
    continuous image's n, Σx (mean_map) and Σx², Σxw (corr_map)."""
    if a.func == "count_map":
        return 1
    if a.func == "mean_map":
        return 2 if len(a.fields) > 1 or continuous else 1
    if a.func == "corr_map":
        return 4
    if a.func in VOXEL_TESTS:
        return 3
    return 0  # roi_overlap and table statistics: a few numbers per group


def answer_plan(spec: QuerySpec, catalog: CatalogView) -> AnswerPlan:
    groups, declared = 1, True
    for name in spec.group_by:
        meta = catalog.fields.get(name)
        levels = len(meta.levels) if meta is not None and meta.levels else 0
        if levels:
            groups *= levels
        else:
            groups, declared = groups * max(1, len(catalog.subject_ids())), False
    per_group, maps = 0, 0
    for a in spec.aggregates:
        meta = catalog.fields.get(a.fields[0]) if a.fields else None
        arrays = _arrays(a, meta is not None and meta.continuous)
        # The plan runs before the spec is checked against the catalog: a map of what is
        # not an image field has no grid, and validation refuses it naming the field.
        if arrays and meta is not None and meta.type == "image":
            maps += 1
            voxels = math.prod(catalog.geometry(a.fields[0]).shape)
            per_group += voxels * (8 * arrays + 1)
    return AnswerPlan(bytes=groups * per_group, groups=groups, maps=maps, declared=declared)


def too_large(plan: AnswerPlan, max_answer_mb: float) -> str | None:
    """The refusal's reason when the plan exceeds the limit, else None. Names the limit
    and the plan's shape; the subject count behind an undeclared group field is left out."""
    if plan.bytes <= max_answer_mb * MB:
        return None
    shape = (f"{plan.groups} groups × {plan.maps} map(s): {plan.bytes / MB:,.0f} MiB as dense "
             "float64 grids" if plan.declared else
             f"{plan.maps} map(s) grouped by a field without declared levels, which counts "
             "as one group per subject")
    return (f"the query's planned answer ({shape}) exceeds this site's [storage] "
            f"max_answer_mb = {max_answer_mb:g}; group by fewer or declared fields, ask "
            "for fewer maps per query, or ask the site's admin to raise the limit")


def refuse_too_large(spec: QuerySpec, catalog: CatalogView, max_answer_mb: float | None) -> None:
    """Raise AnswerTooLarge when `spec`'s plan exceeds the limit (None: no limit). Checked
    before the budget and before compute; it uses the spec and declarations only."""
    if max_answer_mb is not None and (why := too_large(answer_plan(spec, catalog),
                                                        max_answer_mb)) is not None:
        raise AnswerTooLarge(why)
