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

import itertools
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
    atoms = atoms_of(cohorts)
    return None if atoms is None else isolates_atoms(*atoms)


# Refining the partition class by class keeps to C set operations on the fingerprints'
# cached hashes, fastest while classes are few (nested or banded cohorts: a class per
# band); past this many the classes are small and a packed-bit sort is cheaper.
REFINE_MAX_CLASSES = 4096


def atoms_of(cohorts: Sequence[frozenset[str]]) -> tuple[np.ndarray, np.ndarray] | None:
    """(k cohorts × m atoms 0/1, subjects per atom), None if no cohort has a member.

    Never a Python loop per member: at a million subjects per cohort, a release with ten
    earlier cohorts took seconds inside its transaction that way."""
    if not any(cohorts):
        return None
    classes = _refined(cohorts)
    if classes is None:
        return _packed_atoms(cohorts)
    k, width = len(cohorts), (len(cohorts) + 7) // 8
    raw = b"".join(sig.to_bytes(width, "little") for _, sig in classes)
    bits = np.unpackbits(np.frombuffer(raw, dtype=np.uint8).reshape(len(classes), width),
                         axis=1, bitorder="little")[:, :k]
    # In the packed path's order (lexicographic over cohorts 0..k-1; lexsort's last key
    # is its first), so which earlier jobs a refusal names does not depend on the path.
    order = np.lexsort(bits.T[::-1])
    return bits[order].T.astype(np.int64), np.array([len(classes[j][0]) for j in order])


def _refined(cohorts: Sequence[frozenset[str]]) -> list[tuple[frozenset[str], int]] | None:
    """The classes of members in exactly the same cohorts, each with its bit signature."""
    classes: list[tuple[frozenset[str], int]] = [(frozenset().union(*cohorts), 0)]
    for r, c in enumerate(cohorts):
        split: list[tuple[frozenset[str], int]] = []
        for members, sig in classes:
            inside = members & c if len(members) <= len(c) else c & members
            if not inside:
                split.append((members, sig))
                continue
            split.append((inside, sig | (1 << r)))
            if len(inside) < len(members):
                split.append((members - inside, sig))
        if len(split) > REFINE_MAX_CLASSES:
            return None
        classes = split
    return classes


def _packed_atoms(cohorts: Sequence[frozenset[str]]) -> tuple[np.ndarray, np.ndarray]:
    """The same by a hash factorisation of the members, one bit per cohort per member,
    and a sort of the packed bit rows."""
    import pandas as pd

    lengths = np.fromiter((len(c) for c in cohorts), dtype=np.int64, count=len(cohorts))
    flat = np.fromiter(itertools.chain.from_iterable(cohorts), dtype=object,
                       count=int(lengths.sum()))
    codes, uniques = pd.factorize(flat, use_na_sentinel=False)
    del flat
    k, width = len(cohorts), (len(cohorts) + 7) // 8
    rows = np.repeat(np.arange(k), lengths)
    bits = np.zeros((len(uniques), width), dtype=np.uint8)
    np.bitwise_or.at(bits, (codes, rows >> 3), (128 >> (rows & 7)).astype(np.uint8))
    del codes, rows
    keys = np.ascontiguousarray(bits).view(np.dtype((np.void, width))).ravel()
    _, first, sizes = np.unique(keys, return_index=True, return_counts=True)
    return np.unpackbits(bits[first], axis=1)[:, :k].T.astype(np.int64), sizes


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
