"""Entry-node combination of sites' partials: an element-wise sum, so it is exact.

The pooled partial over all sites' rows equals the sum of the sites' partials (up to
float summation order), because every stats array is additive. This module only checks
that the sites' arrays describe the same grid before adding them.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

from stimnet.errors import IncompatiblePartials
from stimnetd.query.aggregate import GroupKey, Partial

# The meta keys that define what each stats cell means; sites must agree on them. Other
# meta (e.g. what the privacy layer records about noise) is carried from the first site.
GRID_KEYS: dict[str, tuple[str, ...]] = {
    "count": ("field",),
    "moments": ("field",),
    "histogram": ("edges",),
    "quantiles": ("lo", "hi", "bins"),
    "crossprod": ("fields", "purpose"),
    "contingency": ("fields",),  # levels are aligned by name, see _align_levels
    "voxel_map": ("column", "weight", "shape", "affine"),
    "voxel_stats": ("func", "column", "weight", "condition", "shape", "affine"),
    "roi_overlap": ("column", "rois", "voxel_volume_mm3"),
}


# Sites a voxel test's "released_by" bit pattern can name (float64 holds 2^53 exactly).
MAX_PATTERN_SITES = 52


def combine(per_site: Iterable[Iterable[Partial]], sites: Sequence[str] | None = None
            ) -> list[Partial]:
    """Sum each output's partials over sites, keyed by (name, group), in first-seen order.
    `sites` names them in refusals (which two disagree, and on what).

    Folded one partial at a time: `per_site` may decode each partial just before it is
    added (jobs/answer.py, SiteOutcome.one_by_one), so only the running sums and one
    partial's arrays are held at once, not every site's maps together.
    """
    running: dict[tuple[str, GroupKey], _Running] = {}
    # No enumerate(): it keeps its last (index, item) tuple for reuse, which would hold the
    # previous site's arrays while the next one is decoded.
    i = 0
    for site in per_site:
        _fold(running, sites[i] if sites is not None else f"site {i + 1}", site)
        del site  # before the next site is decoded
        i += 1
    return [r.result() for r in running.values()]


def _fold(running: dict[tuple[str, GroupKey], _Running], name: str,
          site: Iterable[Partial]) -> None:
    for p in site:
        if (r := running.get(p.key)) is None:
            running[p.key] = _Running(name, p)
        else:
            r.add(name, p)
        del p  # before the next partial is decoded


class _Running:
    """One output's sum so far: the first site's partial sets what the others must match."""

    def __init__(self, name: str, first: Partial) -> None:
        # Its arrays are not kept: they are copied into the running sums (a site's maps are
        # freed as soon as they are added).
        self.first, self.first_name = dataclasses.replace(first, stats={}, cell_mask=None), name
        self.label = f"{first.name!r} group {first.group}"
        self.codes: list[tuple[str, Any]] = [(name, first.meta.get("xform_code"))]
        self.sites, self.n = 1, int(first.n)
        # Contingency tables are aligned by level name over every site at the end; they
        # are small, so their partials are kept.
        self.tables: list[tuple[str, Partial]] | None = \
            [(name, first)] if first.kind == "contingency" else None
        self.stats = {k: np.array(v, np.float64) for k, v in first.stats.items()}
        self.any_mask: np.ndarray | None = None   # OR of the cell masks seen
        self.all_mask: np.ndarray | None = None   # AND of them
        self.unmasked = False                     # a site withheld nothing
        self.reasons: set[str] = set()
        # Voxel tests: which sites released each voxel (bit i: the i-th site), and each
        # site's cohort totals. The entry tests a voxel over the subjects of the sites that
        # released it (query/voxeltests.py): a site that withheld it left its covering
        # subjects out of the sums but not out of its totals.
        self.released_by: np.ndarray | None = None
        self.site_totals: list[list[float]] = []
        self._mask(first)
        self._released(first)

    def add(self, name: str, p: Partial) -> None:
        first = self.first
        if p.kind != first.kind:
            raise IncompatiblePartials(f"{self.label}: {self.first_name} and {name} disagree "
                                       f"on the kind ({first.kind} vs {p.kind})")
        for k in GRID_KEYS.get(first.kind, ()):
            if _plain(p.meta.get(k)) != _plain(first.meta.get(k)):
                raise IncompatiblePartials(
                    f"{self.label}: {self.first_name} and {name} disagree on {k} "
                    f"({first.meta.get(k)!r} vs {p.meta.get(k)!r})")
        self.codes.append((name, p.meta.get("xform_code")))
        self.sites += 1
        self.n += int(p.n)
        if self.tables is not None:
            self.tables.append((name, p))
            return
        if set(p.stats) != set(self.stats) or any(
                np.shape(p.stats[k]) != self.stats[k].shape for k in self.stats):
            raise IncompatiblePartials(f"{self.label}: {self.first_name} and {name} sent "
                                       "stats of different shapes")
        for k, total in self.stats.items():
            total += np.asarray(p.stats[k], np.float64)
        self._mask(p)
        self._released(p)

    def _released(self, p: Partial) -> None:
        if p.kind != "voxel_stats":
            return
        index = len(self.site_totals)
        if index >= MAX_PATTERN_SITES:
            raise IncompatiblePartials(f"{self.label}: a voxel test over more than "
                                       f"{MAX_PATTERN_SITES} sites is not supported")
        shape = np.shape(p.stats["count"])
        withheld = np.full(shape, p.suppressed_reason is not None) if p.cell_mask is None \
            else np.asarray(p.cell_mask, dtype=bool).reshape(shape)
        bit = np.where(withheld, 0.0, float(2**index))
        self.released_by = bit if self.released_by is None else self.released_by + bit
        self.site_totals.append([float(p.stats[k][0])
                                 for k in ("total_n", "total_sum", "total_sum2")])

    def _mask(self, p: Partial) -> None:
        """A partial with a reason but no mask was withheld whole by its site."""
        if p.cell_mask is None and p.suppressed_reason is None:
            self.unmasked = True
            return
        shape = p.cell_counts().shape
        mask = np.asarray(p.cell_mask, dtype=bool).reshape(shape) if p.cell_mask is not None \
            else np.full(shape, p.suppressed_reason is not None)
        self.any_mask = mask.copy() if self.any_mask is None else self.any_mask | mask
        self.all_mask = mask.copy() if self.all_mask is None else self.all_mask & mask
        if p.suppressed_reason:
            self.reasons.add(p.suppressed_reason)

    def result(self) -> Partial:
        meta: dict[str, Any] = dict(self.first.meta)
        if "xform_code" in meta:
            for name, code in self.codes:
                if not isinstance(code, int) or isinstance(code, bool):
                    raise IncompatiblePartials(f"{self.label}: {self.first_name} and {name} "
                                               f"disagree on xform_code ({name} sent {code!r:.40})")
            if len({code for _, code in self.codes}) > 1:
                meta["xform_code"] = 0  # a pooled map is MNI only when every site's images are
        meta["sites"] = self.sites
        if self.tables is not None:
            return self._tables(meta)
        mask, everywhere, reason = self.any_mask, self.all_mask, "; ".join(sorted(self.reasons))
        if everywhere is not None and self.unmasked:
            everywhere = np.zeros_like(everywhere)
        if everywhere is not None:
            meta["suppressed_everywhere"] = everywhere
        stats = self.stats
        if self.released_by is not None:
            stats = {**stats, "released_by": self.released_by}
            meta["site_totals"] = self.site_totals
        return Partial(name=self.first.name, kind=self.first.kind, group=self.first.group,
                       n=self.n, stats=stats, meta=meta, cell_mask=mask,
                       suppressed_reason=reason or None)

    def _tables(self, meta: dict[str, Any]) -> Partial:
        assert self.tables is not None
        names = [n for n, _ in self.tables]
        parts, meta["levels"] = _align_levels([p for _, p in self.tables])
        first = parts[0]
        for name, p in zip(names[1:], parts[1:], strict=True):
            if set(p.stats) != set(first.stats) or any(
                    p.stats[k].shape != first.stats[k].shape for k in first.stats):
                raise IncompatiblePartials(f"{self.label}: {names[0]} and {name} sent stats "
                                           "of different shapes")
        stats = {k: np.sum([np.asarray(p.stats[k], np.float64) for p in parts], axis=0)
                 for k in first.stats}
        mask, everywhere, reason = _masks(parts)
        if everywhere is not None:
            meta["suppressed_everywhere"] = everywhere
        return Partial(name=first.name, kind=first.kind, group=first.group, n=self.n,
                       stats=stats, meta=meta, cell_mask=mask, suppressed_reason=reason)


def _masks(parts: list[Partial]) -> tuple[np.ndarray | None, np.ndarray | None, str | None]:
    """OR of the sites' cell masks (the combined cell is partial), AND (it is empty).

    A partial with a reason but no mask was withheld whole by its site.
    """
    if all(p.cell_mask is None and p.suppressed_reason is None for p in parts):
        return None, None, None
    masks = []
    for p in parts:
        shape = p.cell_counts().shape
        if p.cell_mask is not None:
            masks.append(np.asarray(p.cell_mask, dtype=bool).reshape(shape))
        else:
            masks.append(np.full(shape, p.suppressed_reason is not None))
    reasons = sorted({p.suppressed_reason for p in parts if p.suppressed_reason})
    return (
        np.logical_or.reduce(masks),
        np.logical_and.reduce(masks),
        "; ".join(reasons) or None,
    )


def _align_levels(parts: list[Partial]) -> tuple[list[Partial], list[list[str]]]:
    """Re-index each site's contingency table onto the union of the sites' levels.

    Sites list only the levels they declare or observe, so the same cell can sit at a
    different index at each site; matching by level name keeps the sum exact.
    """
    union: list[list[str]] = [[], []]
    for p in parts:
        for axis in (0, 1):
            union[axis] += [lv for lv in p.meta["levels"][axis] if lv not in union[axis]]
    if all(_plain(p.meta["levels"]) == union for p in parts):
        return parts, union
    aligned = []
    for p in parts:
        rows = [union[0].index(lv) for lv in p.meta["levels"][0]]
        cols = [union[1].index(lv) for lv in p.meta["levels"][1]]
        counts = np.zeros((len(union[0]), len(union[1])))
        counts[np.ix_(rows, cols)] = p.stats["counts"]
        mask = None
        if p.cell_mask is not None:
            mask = np.zeros(counts.shape, dtype=bool)
            mask[np.ix_(rows, cols)] = p.cell_mask
        aligned.append(
            Partial(
                p.name,
                p.kind,
                p.group,
                p.n,
                {**p.stats, "counts": counts},
                {**p.meta, "levels": union},
                mask,
                p.suppressed_reason,
            )
        )
    return aligned, union


def _plain(v: Any) -> Any:
    """Tuples, lists and arrays as nested lists, so metadata that crossed the wire as a
    different sequence type still compares equal."""
    if isinstance(v, np.ndarray):
        return v.tolist()
    if isinstance(v, list | tuple):
        return [_plain(x) for x in v]
    return v
