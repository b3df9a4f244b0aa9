"""Cohort sketches (records.cohort_sketch): the bounds the overlap guard's pruning relies on."""

from __future__ import annotations

import numpy as np
from hypothesis import given
from hypothesis import strategies as st

from stimnetd.store.records import cohort_sketch, sketch_distances


@given(a=st.sets(st.text(max_size=6) | st.from_regex(r"[0-9a-f]{32}", fullmatch=True),
                 max_size=40),
       b=st.sets(st.text(max_size=6) | st.from_regex(r"[0-9a-f]{32}", fullmatch=True),
                 max_size=40))
def test_sketch_distance_never_exceeds_the_set_difference(a: set[str], b: set[str]) -> None:
    """The guard's prefilter skips a cohort only when its sketch is more than k_min - 1
    away, which is safe because the distance is a lower bound on |A xor B| for any members."""
    (d,) = sketch_distances(cohort_sketch(a), [cohort_sketch(b)])
    # Never above the set difference (safe to skip on), never below the size difference
    # (the sketch counts every member: it is no weaker than the size window).
    assert abs(len(a) - len(b)) <= d <= len(a ^ b)


@given(st.sets(st.text(max_size=3) | st.from_regex(r"[0-9a-f]{2,32}", fullmatch=True),
               max_size=30))
def test_a_member_lands_in_the_same_bucket_whatever_set_it_is_in(cohort: set[str]) -> None:
    """The sketch of a set is the sum of its members' own sketches (so sketches of disjoint
    cells add up to their union's, which the union guard relies on), whichever way the
    set's members were decoded (all hex at once, or one by one)."""
    one_by_one = sum(np.frombuffer(cohort_sketch([m]), dtype="<u4").astype(np.int64)
                     for m in cohort)
    assert np.array_equal(np.frombuffer(cohort_sketch(cohort), dtype="<u4"),
                          one_by_one if cohort else np.zeros(256))
