"""Exact auditing of linear statistics: may these cohorts be released together?

A count, a sum, a cross-product entry, a histogram bin, a voxel or an ROI sum is a linear
statistic: Σ over a cohort C of one per-subject quantity q_s (1 for a count, x_s for a sum
of x, x_s·y_s for a cross-product, a subject's image at a voxel...). The researcher who has
the values over cohorts C_1..C_k of the same quantity knows Σ_s c_s q_s for every vector c
in the span of their indicator vectors. One subject's q_s is derivable exactly when a unit
vector e_s is in that span; the rule refuses a release that would put one there, however
many releases it takes (A − B − C) and with the bins of one query counted.

Computed exactly, over GF(p) with p = 2^31 − 1 (products of two residues fit in int64),
never with floating-point rank. Over GF(p) the rank can only be lower than over the
rationals on a 0/1 matrix when p divides a minor, which for the matrices here (entries 0/1,
a few hundred rows) needs a minor of at least 2^31: any e_s in the rational span is in the
GF(p) span, so the rule never misses one; a spurious refusal would need such a minor too.

Subjects that are in exactly the same cohorts are interchangeable: every vector in the span
has the same coefficient at each of them, so none of them is isolated. The matrix is over
those classes ("atoms"), of which there are at most min(n, 2^k), and an atom can only be
isolated if it holds one subject.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

P = 2_147_483_647


@dataclass(frozen=True)
class Isolated:
    """A subject made derivable: the indices (into the cohorts given) whose combination
    isolates it. Never which subject: the refusal must not say."""

    cohorts: tuple[int, ...]


def isolates(cohorts: Sequence[frozenset[str]]) -> Isolated | None:
    """Whether some single subject's value is a linear combination of the cohorts' sums."""
    if not cohorts:
        return None
    members = sorted(frozenset().union(*cohorts))
    if not members:
        return None
    index = {m: i for i, m in enumerate(members)}
    a = np.zeros((len(cohorts), len(members)), dtype=bool)
    for r, c in enumerate(cohorts):
        a[r, [index[m] for m in c]] = True
    atoms, sizes = np.unique(a.T, axis=0, return_counts=True)
    return isolates_atoms(atoms.T.astype(np.int64), sizes)


def isolates_atoms(a: np.ndarray, sizes: np.ndarray) -> Isolated | None:
    """`a`: k cohorts × m atoms (0/1), `sizes`: subjects per atom."""
    k, m = a.shape
    mat = np.concatenate([a % P, np.eye(k, dtype=np.int64)], axis=1)
    r = 0
    for c in range(m):
        if r == k:
            break
        nz = np.flatnonzero(mat[r:, c])
        if nz.size == 0:
            continue
        piv = r + int(nz[0])
        if piv != r:
            mat[[r, piv]] = mat[[piv, r]]
        inv = pow(int(mat[r, c]), P - 2, P)
        mat[r] = (mat[r] * inv) % P
        others = np.flatnonzero(mat[:, c])
        others = others[others != r]
        if others.size:
            mat[others] = (mat[others] - mat[others, c][:, None] * mat[r][None, :]) % P
        r += 1
    left = mat[:r, :m]
    for row in range(r):
        nz = np.flatnonzero(left[row])
        if nz.size == 1 and sizes[nz[0]] == 1:
            return Isolated(tuple(np.flatnonzero(mat[row, m:]).tolist()))
    return None
