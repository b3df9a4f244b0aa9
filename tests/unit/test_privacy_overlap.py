"""The overlap guard: cohorts that differ by fewer than k_min subjects are refused."""

from __future__ import annotations

import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

from stimnetd.privacy.overlap import FINGERPRINT_HEX_CHARS, check_overlap, cohort_fingerprint
from stimnetd.privacy.policy import PrivacyRefusal

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
    close = 1 <= len(a ^ b) <= k_min - 1
    try:
        check_overlap(a, [b], k_min)
    except PrivacyRefusal:
        assert close
    else:
        assert not close


def test_fingerprints_carry_no_raw_id() -> None:
    """Fingerprints are fixed-length hex strings that contain none of the subject ids."""
    fps = cohort_fingerprint(BASE, SECRET)
    assert len(fps) == len(BASE)
    assert all(re.fullmatch(f"[0-9a-f]{{{FINGERPRINT_HEX_CHARS}}}", f) for f in fps)
    assert not any(i in f for f in fps for i in BASE)


def test_fingerprints_are_stable_per_site_and_differ_across_sites() -> None:
    """The same ids fingerprint identically under one secret and differently under another."""
    assert cohort_fingerprint(BASE, SECRET) == cohort_fingerprint(sorted(BASE), SECRET)
    assert cohort_fingerprint(BASE, SECRET).isdisjoint(
        cohort_fingerprint(BASE, b"another-site-secret-0123456789")
    )


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
