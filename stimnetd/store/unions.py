"""Unions of one query's disjoint released cells: which are compared, and bounds on how
far apart those of two queries are.

Shared by the overlap guard (privacy/overlap.check_union_overlap compares exactly the
unions `unions` lists) and the store's cohort history (store/cohorts.py must load every
earlier query some union of whose cells could be near, under the same enumeration). It
lives with the store because the store may not import the privacy layer.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import numpy as np

# Unions of up to 2^6 - 1 cell subsets per side: 63 x 63 pairs per earlier query. Pairs
# grow as 4^cells, and the store compares them against every earlier query of a long
# history (bench/store.py).
MAX_ENUMERATED_ATOMS = 6


@functools.lru_cache(maxsize=64)
def unions(n_atoms: int) -> np.ndarray:
    """Which unions of a query's `n_atoms` disjoint released cells are compared, as 0/1
    rows (one column per cell): every non-empty union up to MAX_ENUMERATED_ATOMS cells;
    beyond that each cell alone and all of them (the pairwise guard's cohorts). Cached:
    read-only."""
    if n_atoms <= MAX_ENUMERATED_ATOMS:
        rows = np.arange(1, 1 << n_atoms)
        picks = ((rows[:, None] >> np.arange(n_atoms)) & 1).astype(np.int64)
    else:
        picks = np.vstack([np.eye(n_atoms, dtype=np.int64), np.ones((1, n_atoms), np.int64)])
    picks.setflags(write=False)
    return picks


class UnionSizes:
    """The unions of one query's cells — their sizes and, if given, bucket sketches (one
    row per cell; a union's sketch is the sum of its disjoint cells', and the L1 distance
    of two sketches is at most the sets' difference) — to compare with many earlier
    queries' (`near`, `near_families`)."""

    def __init__(self, sizes: Sequence[int], sketches: np.ndarray | None = None) -> None:
        picks = unions(len(sizes))
        self.sizes = picks @ np.asarray(sizes, np.int64)
        self.sketches = None if sketches is None else picks @ sketches.astype(np.int64)

    def near(self, other: UnionSizes, window: int) -> bool:
        """Whether some union of these cells and some union of `other`'s are within
        `window` of each other in size (a set difference is at least the size difference).
        False: no need to look further."""
        return bool((np.abs(self.sizes[:, None] - other.sizes[None, :]) <= window).any())


def near_families(mine: UnionSizes, families: Sequence[tuple[Sequence[int], np.ndarray]],
                  window: int) -> list[bool]:
    """For each earlier query's cells (their sizes, one sketch row per cell): whether some
    union of them and some union of `mine` (given with sketches) could be within `window`
    subjects of each other, by sizes and then sketches. False: the earlier query's members
    need not be loaded. Vectorised over queries with as many cells (a long history is
    hundreds of them); sketches are first compared folded to 16 buckets (summing buckets
    only lowers the L1 distance, so it is a bound too), then in full for the pairs of
    unions the folded ones leave."""
    if mine.sketches is None:
        raise ValueError("near_families compares sketches: give this query's")
    out = [False] * len(families)
    by_cells: dict[int, list[int]] = {}
    for index, (sizes, _) in enumerate(families):
        by_cells.setdefault(len(sizes), []).append(index)
    folded = _fold(mine.sketches)
    for cells, members in by_cells.items():
        picks = unions(cells)
        # Families per chunk: the size comparison holds (my unions x F x their unions)
        # integers at a time, about a million (8 MB) at most.
        step = max(1, (1 << 20) // (mine.sizes.size * picks.shape[0]))
        for lo in range(0, len(members), step):
            part = members[lo:lo + step]
            sizes = np.array([families[k][0] for k in part], np.int64) @ picks.T  # (F, U)
            cell_sketches = np.stack([families[k][1] for k in part]).astype(np.int64)
            coarse = np.einsum("ur,frb->fub", picks, _fold(cell_sketches))  # (F, U, 16)
            i, f, j = np.nonzero(np.abs(mine.sizes[:, None, None] - sizes[None]) <= window)
            keep = np.abs(folded[i] - coarse[f, j]).sum(axis=1) <= window
            i, f, j = i[keep], f[keep], j[keep]
            for c in range(0, i.size, 1024):
                sl = slice(c, c + 1024)
                fine = np.einsum("pr,prb->pb", picks[j[sl]], cell_sketches[f[sl]])
                d = np.abs(mine.sketches[i[sl]] - fine).sum(axis=1)
                for hit in np.unique(f[sl][d <= window]).tolist():
                    out[part[hit]] = True
    return out


def _fold(sketches: np.ndarray, to: int = 16) -> np.ndarray:
    return sketches.reshape(*sketches.shape[:-1], to, -1).sum(axis=-1)
