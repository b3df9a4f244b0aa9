"""Entry-node combination of sites' partials: an element-wise sum, so it is exact.

The pooled partial over all sites' rows equals the sum of the sites' partials (up to
float summation order), because every stats array is additive. This module only checks
that the sites' arrays describe the same grid before adding them.
"""

from __future__ import annotations

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


def combine(per_site: list[list[Partial]], sites: list[str] | None = None) -> list[Partial]:
    """Sum each output's partials over sites, keyed by (name, group), in first-seen order.
    `sites` names them in refusals (which two disagree, and on what)."""
    names = sites if sites is not None else [f"site {i + 1}" for i in range(len(per_site))]
    by_key: dict[tuple[str, GroupKey], list[tuple[str, Partial]]] = {}
    for name, site in zip(names, per_site, strict=True):
        for p in site:
            by_key.setdefault(p.key, []).append((name, p))
    return [_sum([p for _, p in parts], [n for n, _ in parts]) for parts in by_key.values()]


def _sum(parts: list[Partial], names: list[str]) -> Partial:
    first = parts[0]
    label = f"{first.name!r} group {first.group}"
    for name, p in zip(names[1:], parts[1:], strict=True):
        if p.kind != first.kind:
            raise IncompatiblePartials(
                f"{label}: {names[0]} and {name} disagree on the kind ({first.kind} vs {p.kind})"
            )
        for k in GRID_KEYS.get(first.kind, ()):
            if _plain(p.meta.get(k)) != _plain(first.meta.get(k)):
                raise IncompatiblePartials(
                    f"{label}: {names[0]} and {name} disagree on {k} "
                    f"({first.meta.get(k)!r} vs {p.meta.get(k)!r})"
                )
    meta: dict[str, Any] = dict(first.meta)
    if "xform_code" in meta:
        codes = [p.meta.get("xform_code") for p in parts]
        for name, code in zip(names, codes, strict=True):
            if not isinstance(code, int) or isinstance(code, bool):
                raise IncompatiblePartials(f"{label}: {names[0]} and {name} disagree on "
                                           f"xform_code ({name} sent {code!r:.40})")
        if len(set(codes)) > 1:
            meta["xform_code"] = 0  # a pooled map is MNI only when every site's images are
    if first.kind == "contingency":
        parts, meta["levels"] = _align_levels(parts)
        first = parts[0]
    keys = set(first.stats)
    for name, p in zip(names[1:], parts[1:], strict=True):
        if set(p.stats) != keys or any(p.stats[k].shape != first.stats[k].shape for k in keys):
            raise IncompatiblePartials(f"{label}: {names[0]} and {name} sent stats of "
                                       "different shapes")
    stats = {k: np.sum([np.asarray(p.stats[k], np.float64) for p in parts], axis=0) for k in keys}
    meta["sites"] = len(parts)
    mask, everywhere, reason = _masks(parts)
    if everywhere is not None:
        meta["suppressed_everywhere"] = everywhere
    return Partial(
        name=first.name,
        kind=first.kind,
        group=first.group,
        n=sum(int(p.n) for p in parts),
        stats=stats,
        meta=meta,
        cell_mask=mask,
        suppressed_reason=reason,
    )


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
