"""Exact auditing's span rule (privacy/span.py), against a brute-force rational check."""

from __future__ import annotations

import random
from fractions import Fraction

import pytest

from stimnetd.privacy.span import isolates


def rational_isolates(cohorts: list[frozenset[str]]) -> bool:
    """Whether some unit vector is in the rational row space: by Fraction rank, exactly."""
    members = sorted(frozenset().union(*cohorts))
    a = [[Fraction(int(m in c)) for m in members] for c in cohorts]
    rank = _rank(a)
    return any(_rank([*a, [Fraction(int(j == i)) for j in range(len(members))]]) == rank
               for i in range(len(members)))


def _rank(rows: list[list[Fraction]]) -> int:
    m = [r[:] for r in rows]
    rank, cols = 0, len(m[0]) if m else 0
    for c in range(cols):
        piv = next((r for r in range(rank, len(m)) if m[r][c] != 0), None)
        if piv is None:
            continue
        m[rank], m[piv] = m[piv], m[rank]
        for r in range(len(m)):
            if r != rank and m[r][c] != 0:
                f = m[r][c] / m[rank][c]
                m[r] = [x - f * y for x, y in zip(m[r], m[rank], strict=True)]
        rank += 1
    return rank


def s(*xs: int) -> frozenset[str]:
    return frozenset(f"s{x}" for x in xs)


def test_a_difference_of_one_subject_isolates_and_names_both_cohorts() -> None:
    hit = isolates([s(1, 2, 3, 4, 5, 6), s(1, 2, 3, 4, 5)])
    assert hit is not None and hit.cohorts == (0, 1)


def test_three_queries_each_far_apart_isolate() -> None:
    everyone = s(*range(30))
    assert isolates([everyone, s(*range(15))]) is None
    hit = isolates([everyone, s(*range(15)), s(*range(16, 30))])
    assert hit is not None and hit.cohorts == (0, 1, 2)


def test_a_difference_of_two_does_not_isolate() -> None:
    assert isolates([s(*range(10)), s(*range(2, 10))]) is None


def test_bins_of_one_histogram_with_shifted_edges_isolate() -> None:
    # Two partitions of the same cohort whose edges differ by one subject.
    a = [s(*range(0, 10)), s(*range(10, 20))]
    b = [s(*range(0, 11)), s(*range(11, 20))]
    assert isolates(a + b) is not None


def test_agrees_with_rational_rank_on_random_families() -> None:
    rng = random.Random(7)
    for _ in range(150):
        n, k = rng.randint(3, 9), rng.randint(1, 6)
        cohorts = [frozenset(f"s{i}" for i in range(n) if rng.random() < 0.55) for _ in range(k)]
        cohorts = [c for c in cohorts if c] or [s(0, 1)]
        assert (isolates(cohorts) is not None) == rational_isolates(cohorts), cohorts


def test_more_than_six_groups_are_exact() -> None:
    # 12 disjoint groups released, then everyone but one subject: isolated at any count.
    groups = [s(*range(5 * g, 5 * g + 5)) for g in range(12)]
    assert isolates(groups) is None
    assert isolates([*groups, s(*range(1, 60))]) is not None


@pytest.mark.parametrize("max_classes", [4096, 2])
def test_atoms_are_the_classes_of_subjects_in_exactly_the_same_cohorts(
        monkeypatch: pytest.MonkeyPatch, max_classes: int) -> None:
    """atoms_of against a per-subject signature, with up to 20 cohorts (bits over several
    bytes) and empty cohorts; by refinement, and (a cap of 2 classes) by packed bits."""
    from collections import Counter

    import numpy as np

    from stimnetd.privacy import span
    from stimnetd.privacy.span import atoms_of

    monkeypatch.setattr(span, "REFINE_MAX_CLASSES", max_classes)
    rng = random.Random(11)
    for _ in range(100):
        n, k = rng.randint(1, 40), rng.randint(1, 20)
        cohorts = [frozenset(f"s{i}" for i in range(n) if rng.random() < 0.4) for _ in range(k)]
        got = atoms_of(cohorts)
        members = frozenset().union(*cohorts)
        if not members:
            assert got is None
            continue
        assert got is not None
        atoms, sizes = got
        want = Counter(tuple(int(m in c) for c in cohorts) for m in members)
        assert atoms.shape == (k, len(want)) and int(sizes.sum()) == len(members)
        assert Counter({tuple(int(x) for x in atoms[:, j]): int(sizes[j])
                        for j in range(atoms.shape[1])}) == want
        assert np.isin(atoms, (0, 1)).all()


def test_both_paths_give_the_atoms_in_one_order(monkeypatch: pytest.MonkeyPatch) -> None:
    """Which earlier jobs a refusal names follows the atoms' order: the same either way."""
    import numpy as np

    from stimnetd.privacy import span

    rng = random.Random(5)
    for _ in range(50):
        cohorts = [frozenset(f"s{i}" for i in range(30) if rng.random() < 0.5)
                   for _ in range(rng.randint(1, 12))]
        if not any(cohorts):
            continue
        refined = span.atoms_of(cohorts)
        monkeypatch.setattr(span, "REFINE_MAX_CLASSES", 0)
        packed = span.atoms_of(cohorts)
        monkeypatch.undo()
        assert refined is not None and packed is not None
        assert np.array_equal(refined[0], packed[0]) and np.array_equal(refined[1], packed[1])
