"""The overlap guard: cohorts that differ by fewer than k_min subjects are refused."""

from __future__ import annotations

import re

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from stimnetd.privacy.overlap import (
    FINGERPRINT_HEX_CHARS,
    check_overlap,
    check_union_overlap,
    cohort_fingerprint,
)
from stimnetd.privacy.policy import PrivacyRefusal
from stimnetd.store.unions import MAX_ENUMERATED_ATOMS, UnionSizes, near_families, unions

K = 5
BASE = frozenset(f"sub-{i:03d}" for i in range(40))
SECRET = b"site-secret-0123456789abcdef"


def minus(n: int) -> frozenset[str]:
    return frozenset(sorted(BASE)[n:])


def plus(n: int) -> frozenset[str]:
    return BASE | {f"new-{i}" for i in range(n)}


def test_identical_cohort_is_allowed() -> None:
    """Re-asking the exact same cohort is allowed: it can only repeat the same answer."""
    check_overlap(BASE, [BASE], K)


@pytest.mark.parametrize("cohort", [minus(1), minus(K - 1), plus(1), plus(K - 1)],
                         ids=["minus1", "minus4", "plus1", "plus4"])
def test_cohort_differing_by_fewer_than_k_min_is_refused(cohort: frozenset[str]) -> None:
    """A cohort that adds or drops 1..k_min-1 subjects from an earlier one is refused."""
    with pytest.raises(PrivacyRefusal, match="fewer than 5 subjects") as e:
        check_overlap(cohort, [BASE], K)
    assert e.value.policy == "overlap"


def test_swapping_subjects_counts_both_directions() -> None:
    """Swapping two subjects for two others is a difference of four, and is refused."""
    swapped = minus(2) | {"new-a", "new-b"}
    with pytest.raises(PrivacyRefusal):
        check_overlap(swapped, [BASE], K)


@pytest.mark.parametrize("cohort", [minus(K), plus(K), minus(30)], ids=["minus5", "plus5", "far"])
def test_cohort_differing_by_k_min_or_more_is_allowed(cohort: frozenset[str]) -> None:
    """A cohort at least k_min subjects away from every earlier cohort is allowed."""
    check_overlap(cohort, [BASE], K)


def test_any_close_earlier_cohort_refuses() -> None:
    """One close earlier cohort among several far ones is enough to refuse."""
    with pytest.raises(PrivacyRefusal):
        check_overlap(minus(2), [minus(30), plus(20), BASE], K)


def test_refusal_message_does_not_say_how_many_subjects_differ() -> None:
    """The refusal names k_min and never the size of the difference."""
    with pytest.raises(PrivacyRefusal) as e:
        check_overlap(minus(3), [BASE], K)
    assert set(re.findall(r"\d+", str(e.value))) == {str(K)}


def test_no_history_is_allowed() -> None:
    """A researcher's first cohort on a catalog is never refused."""
    check_overlap(BASE, [], K)


@given(
    a=st.frozensets(st.integers(0, 30).map(str), max_size=20),
    b=st.frozensets(st.integers(0, 30).map(str), max_size=20),
    k_min=st.integers(1, 10),
)
def test_refused_exactly_when_difference_is_between_one_and_k_min_minus_one(
    a: frozenset[str], b: frozenset[str], k_min: int
) -> None:
    """For any two cohorts the guard refuses iff their symmetric difference has 1..k_min-1
    subjects."""
    try:
        check_overlap(a, [b], k_min)
        refused = False
    except PrivacyRefusal:
        refused = True
    assert refused == (1 <= len(a ^ b) <= k_min - 1)


def test_fingerprints_carry_no_raw_id() -> None:
    """Fingerprints are fixed-length hex strings that contain none of the subject ids."""
    fps = cohort_fingerprint(BASE, SECRET)
    assert len(fps) == len(BASE)
    assert [f for f in fps if not re.fullmatch(f"[0-9a-f]{{{FINGERPRINT_HEX_CHARS}}}", f)] == []
    assert [(i, f) for f in fps for i in BASE if i in f] == []


def test_fingerprints_are_stable_per_site_and_differ_across_sites() -> None:
    """The same ids fingerprint identically under one secret and differently under another."""
    assert cohort_fingerprint(BASE, SECRET) == cohort_fingerprint(sorted(BASE), SECRET)
    assert cohort_fingerprint(BASE, SECRET) & cohort_fingerprint(
        BASE, b"another-site-secret-0123456789") == frozenset()


def test_guard_works_on_fingerprints() -> None:
    """Checking fingerprinted cohorts refuses exactly what checking raw ids would."""
    with pytest.raises(PrivacyRefusal):
        check_overlap(cohort_fingerprint(minus(1), SECRET), [cohort_fingerprint(BASE, SECRET)], K)
    check_overlap(cohort_fingerprint(minus(K), SECRET), [cohort_fingerprint(BASE, SECRET)], K)


def test_short_secret_is_rejected() -> None:
    """A secret shorter than 16 bytes is rejected, since it would let ids be brute-forced."""
    with pytest.raises(ValueError, match="16 bytes"):
        cohort_fingerprint(BASE, b"short")


def test_non_string_ids_are_rejected() -> None:
    """Subject ids must be strings, so 1 and "1" cannot silently count as two subjects."""
    with pytest.raises(TypeError, match="str"):
        cohort_fingerprint([1, 2], SECRET)  # type: ignore[list-item]


# --- unions of a grouped query's cells (check_union_overlap) -----------------------------

def _brute_force_refuses(new: list[frozenset[str]], earlier: list[list[frozenset[str]]],
                         k: int) -> bool:
    def all_unions(cells: list[frozenset[str]]) -> list[frozenset[str]]:
        return [frozenset().union(*(c for i, c in enumerate(cells) if mask >> i & 1))
                for mask in range(1, 1 << len(cells))]
    return any(1 <= len(u ^ v) <= k - 1
               for fam in earlier for u in all_unions(new) for v in all_unions(fam))


@st.composite
def _partition(draw: st.DrawFn, universe: int = 30) -> list[frozenset[str]]:
    """Up to 4 disjoint non-empty cells drawn from a small universe of subjects."""
    labels = draw(st.lists(st.integers(-1, 3), min_size=universe, max_size=universe))
    cells = [frozenset(f"s{i}" for i, lab in enumerate(labels) if lab == c) for c in range(4)]
    return [c for c in cells if c] or [frozenset({"s0"})]


@given(new=_partition(), earlier=st.lists(_partition(), max_size=3), k=st.integers(2, 8))
def test_union_guard_refuses_exactly_when_some_pair_of_unions_is_close(
        new: list[frozenset[str]], earlier: list[list[frozenset[str]]], k: int) -> None:
    """Against enumerating every pair of unions with sets: refused iff some union of the
    new cells and some union of one earlier query's cells differ by 1..k-1 subjects."""
    try:
        check_union_overlap(new, earlier, k)
        refused = False
    except PrivacyRefusal as exc:
        refused = True
        assert exc.policy == "overlap" and str(k) in str(exc)
    assert refused == _brute_force_refuses(new, earlier, k)


@given(new=_partition(), olds=st.lists(_partition(), min_size=1, max_size=4),
       window=st.integers(1, 7))
def test_union_pruning_never_rules_out_a_close_pair(
        new: list[frozenset[str]], olds: list[list[frozenset[str]]], window: int) -> None:
    """Sizes and sketches only rule out an earlier query's cells when no union of them is
    within the window of a union of the new ones (so the guard never misses one by not
    loading it) — for each of several earlier queries judged together."""
    from stimnetd.store.records import cohort_sketch

    def sketch(cells: list[frozenset[str]]) -> np.ndarray:
        return np.stack([np.frombuffer(cohort_sketch(c), dtype="<u4") for c in cells])

    judged = near_families(UnionSizes([len(c) for c in new], sketch(new)),
                           [([len(c) for c in old], sketch(old)) for old in olds], window)
    for old, near in zip(olds, judged, strict=True):
        if _brute_force_refuses(new, [old], window + 1):
            assert near is True
            assert UnionSizes([len(c) for c in new]).near(UnionSizes([len(c) for c in old]),
                                                         window) is True


def test_union_of_some_cells_near_an_earlier_cohort_is_refused() -> None:
    """The differencing attack the pairwise guard missed: an earlier cohort STN ∪ GPi plus
    one subject, then a query grouped into STN, GPi and VIM (each cell, and all three
    together, far from it; STN and GPi together one subject away)."""
    stn, gpi, vim = (frozenset(f"{t}-{i}" for i in range(10)) for t in ("stn", "gpi", "vim"))
    earlier = stn | gpi | {"patient-x"}
    for cohort in (stn, gpi, vim, stn | gpi | vim):
        check_overlap(cohort, [earlier], K)  # what the pairwise guard checks: all pass
    with pytest.raises(PrivacyRefusal, match="union of this query's groups"):
        check_union_overlap([stn, gpi, vim], [[earlier]], K)
    # The same three cells against themselves (a repeated query) are fine, and so is a
    # different grouping far from every union.
    check_union_overlap([stn, gpi, vim], [[stn, gpi, vim]], K)
    check_union_overlap([stn, gpi | vim], [[stn, gpi, vim]], K)


def test_many_cells_fall_back_to_each_cell_and_all_of_them() -> None:
    """Beyond MAX_ENUMERATED_ATOMS cells per query the unions compared are each cell alone
    and all together (what the pairwise guard checks), so the work stays bounded."""
    assert unions(3).shape == (7, 3)
    many = unions(MAX_ENUMERATED_ATOMS + 1)
    assert many.shape == (MAX_ENUMERATED_ATOMS + 2, MAX_ENUMERATED_ATOMS + 1)
    assert set(many.sum(axis=1).tolist()) == {1, MAX_ENUMERATED_ATOMS + 1}
