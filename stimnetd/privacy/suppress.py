"""k_min suppression: nothing computed from fewer than k_min subjects leaves the site.

Rules, applied to each `Partial` on its *true* counts (before any noise):

* A partial whose cohort `n` is below k_min is withheld entirely: every stats array is
  zeroed, `cell_mask` is all True, and its reported `n` becomes 0. Kinds without per-cell
  counts (count, moments, quantiles, crossprod) are only ever withheld this way.
* For kinds with per-cell counts (see `CELL_COUNTS`: histogram bins, contingency cells,
  voxels, ROIs) every cell whose count is below k_min is withheld: zeroed in *every* stats
  array at that cell (a voxel's sum would otherwise still reveal who is there) and marked
  in `cell_mask`. A voxel test's partial (voxel_stats) also carries cohort totals, from
  which a voxel's not-covering side follows by subtraction, so a voxel is withheld unless
  both sides, covering and not covering, hold at least k_min subjects (at k_min = 1, when
  no count can be in 1..k_min-1, an empty side is not masked); the totals themselves are
  released with the partial (its n is the cohort's). A continuous image's corr_map and
  mean_map send no per-voxel sum of w, and their not-covering subjects have x = 0 there,
  so k_min holds on the covering side only (`aggregate.TWO_SIDED`).

Empty cells (count 0) are withheld too. They carry no subject's value, but releasing them
as an unmasked 0 while masking 1..k_min-1 would make the mask itself a presence
indicator: a masked voxel would say "somebody's stimulation volume reaches here", and the
masked region of a voxel map would trace a single outlying patient's volume. Masking every
cell below k_min reveals only "fewer than k_min", which is what DESIGN.md promises.

Complementary suppression: a hidden histogram bin can be recovered as the cohort total
minus the visible bins (the total is public through `n` or a count(*) in the same query).
So when the withheld cells of a histogram, or of a contingency table's whole, row or
column, add up to 1..k_min-1, further (smallest non-empty) cells are withheld until the
hidden total is 0 or at least k_min. Voxel maps and ROI statistics have no such additive
identity with `n` (one subject touches many voxels or several ROIs, or none), so they get
none; combinations across different queries are the overlap guard's business.

Labels are data too. A group key or contingency level that is a declared level of its
field is public metadata, but a categorical field that declares no levels is labelled by
its values: releasing even a withheld group keyed "Smith, J." would say that such a subject
is here. So when `fields` are given, a group keyed by an undeclared field whose every output
was computed from fewer than k_min subjects is left out of the release (labels and all),
and so is a contingency row or column of an undeclared field with fewer than k_min
subjects. Every output grouped by (or tabulated over) such a field says so in its meta
(`UNLISTED`), whether or not anything was left out, so the note reveals nothing.

The mask choice is deterministic and made on true counts, so it sits outside any
differential-privacy guarantee: noise protects the released values, not which cells are
released. That is the usual property of threshold suppression and is accepted by design.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Literal

import numpy as np

from stimnet.query.fields import FieldMeta
from stimnetd.query.aggregate import CELL_COUNTS, TOTALS, UNLISTED, GroupKey, Partial, two_sided

Action = Literal["released", "suppressed", "partially_suppressed"]


@dataclass(frozen=True)
class Decision:
    """What the privacy layer did with one output in one group, for the audit log.

    `reason` names the rule and threshold only; `epsilon` is what DP spent on this output
    (None when no noise was added). The caller fills it in after `add_noise`.
    """

    output: str
    group: GroupKey
    action: Action
    reason: str | None = None
    epsilon: float | None = None


def whole_reason(k_min: int) -> str:
    return f"k_min: cohort of fewer than {k_min} subjects"


def cells_reason(k_min: int) -> str:
    return f"k_min: cells with fewer than {k_min} subjects withheld"


def suppress_small_cells(
    partials: list[Partial], k_min: int, fields: Mapping[str, FieldMeta] | None = None
) -> tuple[list[Partial], list[Decision]]:
    """Withhold every partial, cell and voxel computed from fewer than `k_min` subjects.

    With the catalog's `fields`, labels that are data (see the module doc) are withheld
    too. Returns new partials (inputs are not modified; a partial left out entirely is
    not among them) and one `Decision` per input partial.
    """
    if k_min < 1:
        raise ValueError(f"k_min must be at least 1, got {k_min}")
    unlisted = _unlisted_fields(fields)
    released: list[Partial] = []
    decisions: list[Decision] = []
    dropped = _unlisted_small_groups(partials, unlisted, k_min)
    for p in partials:
        if p.group in dropped:
            decisions.append(Decision(p.name, p.group, "suppressed", unlisted_reason(k_min)))
            continue
        if p.n < k_min:
            out = _withhold_all(p, whole_reason(k_min))
        elif CELL_COUNTS[p.kind] is None:
            out = p
        else:
            mask = _cell_mask(p, k_min)
            if mask.all():
                out = _withhold_all(p, cells_reason(k_min))
            elif mask.any():
                out = _withhold_cells(p, mask, cells_reason(k_min))
            else:
                out = p
        action, reason = _action(out), out.suppressed_reason
        if unlisted:
            out, left_out = _unlisted_levels(out, p, unlisted, k_min)
            if left_out and action == "released":
                action, reason = "partially_suppressed", unlisted_reason(k_min)
        released.append(out)
        decisions.append(Decision(p.name, p.group, action, reason))
    return released, decisions


def unlisted_reason(k_min: int) -> str:
    return (f"k_min: a group of fewer than {k_min} subjects whose label is not a declared "
            "level, left out with its label")


def unlisted_note(fields: list[str]) -> str:
    names = ", ".join(repr(f) for f in fields)
    return (f"groups and levels of {names} (no declared levels) with fewer than k_min "
            "subjects at a site are not listed, labels included; values cover the rest")


def _unlisted_fields(fields: Mapping[str, FieldMeta] | None) -> frozenset[str]:
    if fields is None:
        return frozenset()
    return frozenset(n for n, f in fields.items() if f.type == "categorical" and not f.levels)


def _unlisted_small_groups(partials: list[Partial], unlisted: frozenset[str],
                           k_min: int) -> set[GroupKey]:
    """Groups keyed by an undeclared field in which no output reaches k_min subjects.

    Decided on true counts over the whole group: one output with k_min subjects shows the
    label belongs to at least k_min subjects, so the group's other outputs keep it.
    """
    if not unlisted:
        return set()
    largest: dict[GroupKey, int] = {}
    for p in partials:
        if any(f in unlisted for f, _ in p.group):
            largest[p.group] = max(largest.get(p.group, 0), int(p.n))
    return {g for g, n in largest.items() if n < k_min}


def _unlisted_levels(p: Partial, true: Partial, unlisted: frozenset[str],
                     k_min: int) -> tuple[Partial, bool]:
    """Mark an output over an undeclared field, and drop a contingency's small levels of it.

    `p` is already suppressed; `true` is it before. A level of fewer than k_min subjects
    has every cell withheld, and complementary suppression has run with those cells
    counted as hidden, so leaving the row out reveals nothing the mask did not.
    """
    tabulated = [f for f in p.meta.get("fields", ()) if p.kind == "contingency" and f in unlisted]
    grouped = [f for f, _ in p.group if f in unlisted]
    if not tabulated and not grouped:
        return p, False
    meta = {**p.meta, UNLISTED: unlisted_note(sorted({*grouped, *tabulated}))}
    stats = dict(p.stats)
    mask = p.cell_mask
    left_out = False
    if tabulated:
        counts = np.asarray(true.stats["counts"], dtype=np.float64)
        levels = [list(lv) for lv in p.meta["levels"]]
        keep = []
        for axis, name in enumerate(p.meta["fields"]):
            totals = counts.sum(axis=1 - axis)
            keep.append(np.ones(len(levels[axis]), dtype=bool) if name not in unlisted
                        else totals >= k_min)
        levels = [[lv for lv, k in zip(lvs, kp, strict=True) if k]
                  for lvs, kp in zip(levels, keep, strict=True)]
        cells = np.ix_(keep[0], keep[1])
        stats = {k: np.asarray(a)[cells] for k, a in p.stats.items()}
        mask = None if p.cell_mask is None else np.asarray(p.cell_mask, dtype=bool)[cells]
        meta["levels"] = levels
        left_out = not all(kp.all() for kp in keep)
    return dataclasses.replace(p, stats=stats, meta=meta, cell_mask=mask), left_out


def result_suppressed(decisions: Iterable[Decision]) -> bool:
    """True when nothing at all was released: the caller reports a "suppressed" outcome."""
    actions = [d.action for d in decisions]
    return bool(actions) and all(a == "suppressed" for a in actions)


def is_withheld(p: Partial) -> bool:
    """True for a partial that carries nothing (every cell withheld)."""
    return p.cell_mask is not None and bool(np.all(p.cell_mask))


def _action(p: Partial) -> Action:
    if p.cell_mask is None or not p.cell_mask.any():
        return "released"
    return "suppressed" if is_withheld(p) else "partially_suppressed"


def _withhold_all(p: Partial, reason: str) -> Partial:
    shape = p.cell_counts().shape
    return dataclasses.replace(
        p,
        n=0,
        stats={name: np.zeros_like(np.asarray(a, dtype=np.float64)) for name, a in p.stats.items()},
        cell_mask=np.ones(shape, dtype=bool),
        suppressed_reason=reason,
    )


def _withhold_cells(p: Partial, mask: np.ndarray, reason: str) -> Partial:
    stats = {}
    for name, a in p.stats.items():
        a = np.array(a, dtype=np.float64)
        if name in TOTALS.get(p.kind, ()):
            stats[name] = a  # over the whole cohort, which passed k_min (p.n)
            continue
        if a.shape != mask.shape:
            # An array that is not per-cell could still carry the withheld subjects;
            # refusing to guess is safer than releasing it.
            raise ValueError(
                f"{p.name}: stats[{name!r}] has shape {a.shape}, expected the cell shape "
                f"{mask.shape} of a {p.kind} partial"
            )
        a[mask] = 0.0
        stats[name] = a
    return dataclasses.replace(p, stats=stats, cell_mask=mask, suppressed_reason=reason)


def _cell_mask(p: Partial, k_min: int) -> np.ndarray:
    counts = p.cell_counts()
    mask = counts < k_min
    if p.cell_mask is not None:
        # Cells the engine already withheld stay withheld.
        mask |= np.asarray(p.cell_mask, dtype=bool)
    if p.kind == "voxel_stats":
        if two_sided(p):
            # The cohort totals are released, so a voxel's not-covering side (total minus
            # covering) is a release too: it must hold k_min subjects as well.
            mask |= (p.n - counts) < k_min
        if k_min == 1:
            # No count is in 1..k_min-1, so the mask of empty sides could not stand for
            # "a few subjects here"; an empty side's sums are 0 and the other side's are
            # the released totals. Unmasked, the pooled test is the pooled data's.
            mask = np.zeros(counts.shape, bool) if p.cell_mask is None \
                else np.asarray(p.cell_mask, dtype=bool).copy()
    if p.kind == "histogram":
        _complement(counts, mask, [(slice(None),)], k_min)
    elif p.kind == "contingency":
        rows = [(i, slice(None)) for i in range(counts.shape[0])]
        cols = [(slice(None), j) for j in range(counts.shape[1])]
        _complement(counts, mask, [(slice(None), slice(None)), *rows, *cols], k_min)
    return mask


def _complement(
    counts: np.ndarray, mask: np.ndarray, lines: list[tuple[int | slice, ...]], k_min: int
) -> None:
    """Grow `mask` in place until no line's withheld cells add up to 1..k_min-1.

    Each line is a set of cells whose total may be public (the table, a row, a column).
    Masking only grows, so this terminates after at most one pass per cell.
    """
    changed = True
    while changed:
        changed = False
        for line in lines:
            c, m = counts[line], mask[line]
            hidden = c[m].sum()
            if not 0 < hidden < k_min:
                continue
            candidates = np.flatnonzero(~m & (c > 0))
            if candidates.size == 0:
                # The line's whole total is below k_min, so any margin that would expose it
                # is itself withheld wherever it is released.
                continue
            pick = candidates[np.argmin(c.ravel()[candidates])]
            idx = np.unravel_index(pick, c.shape)
            # `mask[line]` is a view for basic slices, so writing through it updates mask.
            m[idx] = True
            changed = True
