"""k_min suppression: nothing computed from fewer than k_min subjects leaves the site."""

from __future__ import annotations

import re

import numpy as np
import pandas as pd
import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from stimnet import codec
from stimnet.query.sql import parse_sql
from stimnetd.privacy.suppress import (
    Decision,
    cells_reason,
    result_suppressed,
    suppress_small_cells,
    unlisted_reason,
    whole_reason,
)
from stimnetd.query import partial_docs
from stimnetd.query.aggregate import UNLISTED, Partial
from stimnetd.query.engine import compute
from tests.unit.fakes import FakeCatalog, categorical, numeric

K = 5
GROUP = (("target", "STN"),)


def moments(n: int) -> Partial:
    return Partial(
        "avg(updrs_change)", "moments", GROUP, n,
        {"n": np.array([float(n)]), "s1": np.array([31.0 * n]), "s2": np.array([977.0 * n])},
        {"field": "updrs_change"},
    )


def histogram(counts: list[float]) -> Partial:
    c = np.array(counts, dtype=np.float64)
    return Partial("hist(age)", "histogram", GROUP, int(c.sum()), {"counts": c},
                   {"edges": list(range(len(counts) - 1))})


def numbers_in(text: str | None) -> list[str]:
    assert text is not None
    return re.findall(r"\d+", text)


def test_small_cohort_is_withheld_entirely() -> None:
    """A partial over fewer than k_min subjects releases only zeros, n = 0 and a full mask."""
    (out,), (decision,) = suppress_small_cells([moments(3)], K)
    assert out.n == 0
    assert all(not a.any() for a in out.stats.values())
    assert out.cell_mask is not None and out.cell_mask.shape == (1,) and out.cell_mask.all()
    assert decision == Decision("avg(updrs_change)", GROUP, "suppressed", whole_reason(K))


def test_whole_suppression_reason_names_only_the_threshold() -> None:
    """The reason for a withheld cohort states k_min and never the cohort's size."""
    (out,), _ = suppress_small_cells([moments(3)], K)
    assert out.suppressed_reason is not None and out.suppressed_reason.startswith("k_min")
    assert numbers_in(out.suppressed_reason) == [str(K)]


def test_cohort_of_exactly_k_min_is_released_unchanged() -> None:
    """A partial with n == k_min is released as it is, with a "released" decision."""
    p = moments(K)
    (out,), (decision,) = suppress_small_cells([p], K)
    assert out is p
    assert decision.action == "released" and decision.reason is None


def test_crossprod_with_small_cohort_is_withheld() -> None:
    """A cross-product matrix over fewer than k_min subjects is zeroed as a whole."""
    m = np.arange(9, dtype=np.float64).reshape(3, 3)
    p = Partial("corr(a,b)", "crossprod", (), 4, {"m": m}, {"fields": ["a", "b"]})
    (out,), (decision,) = suppress_small_cells([p], K)
    assert not out.stats["m"].any() and out.n == 0
    assert decision.action == "suppressed"


def test_small_histogram_bins_are_withheld() -> None:
    """Bins under k_min are zeroed and masked; bins at or above k_min are released exactly."""
    (out,), (decision,) = suppress_small_cells([histogram([6, 0, 9, 7, 8])], K)
    np.testing.assert_array_equal(out.stats["counts"], [6, 0, 9, 7, 8])
    np.testing.assert_array_equal(out.cell_mask, [False, True, False, False, False])
    assert out.n == 30
    assert decision.action == "partially_suppressed" and decision.reason == cells_reason(K)


def test_empty_cells_are_masked_like_small_ones() -> None:
    """An empty bin is masked, so the mask cannot tell "nobody" apart from "a few"."""
    (empty,), _ = suppress_small_cells([histogram([6, 0, 9])], K)
    (few,), _ = suppress_small_cells([histogram([6, 3, 9, 6])], K)
    assert empty.cell_mask is not None and few.cell_mask is not None
    assert empty.cell_mask[1] and few.cell_mask[1]
    assert empty.stats["counts"][1] == few.stats["counts"][1] == 0


def test_single_small_bin_gets_a_complementary_bin_withheld() -> None:
    """A lone small bin is not recoverable as n minus the visible bins: the smallest other
    non-empty bin is withheld with it."""
    (out,), _ = suppress_small_cells([histogram([20, 2, 9, 30])], K)
    np.testing.assert_array_equal(out.cell_mask, [False, True, True, False])
    np.testing.assert_array_equal(out.stats["counts"], [20, 0, 0, 30])


def test_contingency_row_with_one_small_cell_gets_a_complement_in_that_row() -> None:
    """A small contingency cell is hidden together with another cell of its row and column,
    so neither margin gives it away."""
    counts = np.array([[20.0, 3.0, 30.0], [40.0, 50.0, 60.0]])
    p = Partial("ct(a,b)", "contingency", (), int(counts.sum()), {"counts": counts},
                {"fields": ["a", "b"], "levels": [["x", "y"], ["p", "q", "r"]]})
    (out,), _ = suppress_small_cells([p], K)
    mask = out.cell_mask
    assert mask is not None
    for rows, cols in [(slice(None), slice(None)), *[(i, slice(None)) for i in range(2)],
                       *[(slice(None), j) for j in range(3)]]:
        hidden = counts[rows, cols][mask[rows, cols]].sum()
        assert hidden == 0 or hidden >= K
    assert mask[0, 1] and not out.stats["counts"][mask].any()


def voxel_map(count: np.ndarray, weight_sum: np.ndarray) -> Partial:
    return Partial("mean_map(vta,updrs_change)", "voxel_map", (), 40,
                   {"count": count, "sum": weight_sum},
                   {"column": "vta", "weight": "updrs_change", "shape": count.shape})


def test_small_voxels_are_zeroed_in_count_and_sum() -> None:
    """A voxel touched by fewer than k_min subjects is zeroed in both its count and its sum."""
    count = np.array([[12.0, 2.0], [0.0, 7.0]])
    weight_sum = np.array([[120.0, 33.0], [0.0, 70.0]])
    (out,), (decision,) = suppress_small_cells([voxel_map(count, weight_sum)], K)
    np.testing.assert_array_equal(out.cell_mask, [[False, True], [True, False]])
    np.testing.assert_array_equal(out.stats["count"], [[12.0, 0.0], [0.0, 7.0]])
    np.testing.assert_array_equal(out.stats["sum"], [[120.0, 0.0], [0.0, 70.0]])
    assert out.n == 40 and decision.action == "partially_suppressed"


def test_voxel_map_with_every_voxel_small_is_withheld_entirely() -> None:
    """A voxel map whose voxels all have fewer than k_min subjects releases nothing, not
    even n."""
    count = np.array([[1.0, 2.0], [0.0, 4.0]])
    (out,), (decision,) = suppress_small_cells([voxel_map(count, count * 10)], K)
    assert out.n == 0 and not out.stats["count"].any() and not out.stats["sum"].any()
    assert decision.action == "suppressed" and decision.reason == cells_reason(K)


def test_small_rois_are_zeroed_in_every_roi_statistic() -> None:
    """An ROI touched by fewer than k_min subjects is zeroed in n, s1 and s2."""
    p = Partial("roi_overlap(vta)", "roi_overlap", (), 30,
                {"n": np.array([25.0, 3.0]), "s1": np.array([900.0, 41.0]),
                 "s2": np.array([40000.0, 700.0])},
                {"column": "vta", "rois": ["STN_motor", "STN_assoc"]})
    (out,), _ = suppress_small_cells([p], K)
    np.testing.assert_array_equal(out.cell_mask, [False, True])
    for name, kept in [("n", 25.0), ("s1", 900.0), ("s2", 40000.0)]:
        np.testing.assert_array_equal(out.stats[name], [kept, 0.0])


def test_cells_reason_names_only_the_threshold() -> None:
    """The reason for withheld cells states k_min and none of the withheld counts."""
    (out,), _ = suppress_small_cells([histogram([20, 2, 9, 30])], K)
    assert numbers_in(out.suppressed_reason) == [str(K)]


def test_inputs_are_not_modified() -> None:
    """Suppression returns new partials and leaves the engine's arrays intact."""
    p = histogram([20, 2, 9, 30])
    suppress_small_cells([p], K)
    np.testing.assert_array_equal(p.stats["counts"], [20, 2, 9, 30])
    assert p.cell_mask is None


def test_cells_already_masked_by_the_engine_stay_masked() -> None:
    """A cell the engine withheld is not unmasked because its count is large."""
    p = histogram([20, 9, 30])
    p = Partial(p.name, p.kind, p.group, p.n, p.stats, p.meta,
                cell_mask=np.array([False, False, True]))
    (out,), _ = suppress_small_cells([p], K)
    assert out.cell_mask is not None and out.cell_mask[2] and out.stats["counts"][2] == 0


def test_array_not_shaped_like_the_cells_is_refused() -> None:
    """A per-cell kind carrying an array of another shape raises instead of releasing it."""
    p = Partial("hist(age)", "histogram", (), 30,
                {"counts": np.array([20.0, 2.0, 8.0]), "extra": np.array([1.0])})
    with pytest.raises(ValueError, match="extra"):
        suppress_small_cells([p], K)


def test_result_is_suppressed_only_when_every_partial_is() -> None:
    """A result counts as suppressed when all its partials were withheld, and not otherwise."""
    _, all_small = suppress_small_cells([moments(2), moments(4)], K)
    _, mixed = suppress_small_cells([moments(2), moments(40)], K)
    assert result_suppressed(all_small)
    assert not result_suppressed(mixed)
    assert not result_suppressed([])


@given(
    counts=arrays(np.int64, st.integers(1, 12), elements=st.integers(0, 40)),
    k_min=st.integers(1, 10),
)
def test_no_released_histogram_bin_or_hidden_total_is_below_k_min(
    counts: np.ndarray, k_min: int
) -> None:
    """For any histogram, every released bin has at least k_min subjects and the withheld
    bins together hold none or at least k_min (unless the whole partial is withheld)."""
    p = histogram(counts.astype(np.float64).tolist())
    (out,), _ = suppress_small_cells([p], k_min)
    released = out.stats["counts"]
    mask = out.cell_mask if out.cell_mask is not None else np.zeros(counts.shape, dtype=bool)
    assert np.all(released[~mask] >= k_min)
    assert not released[mask].any()
    if out.n:
        hidden = counts[mask].sum()
        assert hidden == 0 or hidden >= k_min


# -- labels that are data: categorical fields without declared levels --------------------

FIELDS = {"name": categorical("name"), "target": categorical("target", ("STN", "GPi")),
          "side": categorical("side"), "x": numeric("x", 0, 100)}
SQL_GROUPED = "SELECT name, count(*), avg(x) FROM t GROUP BY name"


def grouped_release(sql: str, frame: pd.DataFrame, k_min: int = K
                    ) -> tuple[list[Partial], list[Decision], bytes]:
    """Compute, suppress with the catalog's fields, and encode as a site would release."""
    partials = compute(parse_sql(sql), FakeCatalog(frame, FIELDS)).partials
    out, decisions = suppress_small_cells(partials, k_min, FIELDS)
    docs, arrays = partial_docs.partials_to_doc(out)
    return out, decisions, codec.pack({"partials": docs}, arrays)


def test_small_group_with_an_undeclared_label_leaves_with_nothing_not_even_its_label() -> None:
    """A group keyed by a value of a field that declares no levels, under k_min in every
    output, is left out entirely: its label is a data value. Bigger groups stay and every
    output over that field says groups may be unlisted; audit decisions still record it."""
    frame = pd.DataFrame({"name": ["Smith, J."] * 2 + ["common"] * 7,
                          "x": [10.0, 20.0] + [50.0] * 7})
    out, decisions, blob = grouped_release(SQL_GROUPED, frame)
    assert b"Smith" not in blob
    assert {p.group for p in out} == {(("name", "common"),)}
    assert all(UNLISTED in p.meta for p in out)
    left_out = [d for d in decisions if d.group == (("name", "Smith, J."),)]
    assert len(left_out) == 2 and {d.action for d in left_out} == {"suppressed"}
    assert all(d.reason == unlisted_reason(K) for d in left_out)


def test_a_group_stays_listed_when_any_of_its_outputs_reaches_k_min() -> None:
    """One output over k_min subjects shows the label belongs to at least k_min of them, so
    the group's other (withheld) outputs keep it; declared levels stay listed however small."""
    frame = pd.DataFrame({"name": ["common"] * 6, "target": ["STN"] * 6,
                          "x": [1.0, 2.0, np.nan, np.nan, np.nan, np.nan]})
    out, _, _ = grouped_release(SQL_GROUPED, frame)
    by_name = {p.name: p for p in out}
    assert by_name["count(*)"].n == 6 and by_name["avg(x)"].n == 0  # withheld, still keyed
    small = pd.DataFrame({"target": ["GPi"] * 2 + ["STN"] * 8, "x": [1.0] * 10})
    out, _, _ = grouped_release("SELECT target, count(*) FROM t GROUP BY target", small)
    assert {p.group for p in out} == {(("target", "GPi"),), (("target", "STN"),)}
    assert all(UNLISTED not in p.meta for p in out)


def test_contingency_drops_small_undeclared_levels_after_complementary_suppression() -> None:
    """A contingency level of an undeclared field with fewer than k_min subjects is left out
    with its row; the cells hidden in what remains plus the rows left out still add up to
    0 or at least k_min, so the table total does not give the left-out count away."""
    frame = pd.DataFrame({"side": ["left"] * 20 + ["right"] * 12 + ["Smith, J."] * 2,
                          "target": ["STN"] * 10 + ["GPi"] * 10 + ["STN"] * 6 + ["GPi"] * 6
                          + ["STN", "GPi"]})
    (p,), (decision,), blob = grouped_release("SELECT contingency(side, target) FROM t", frame)
    assert b"Smith" not in blob
    assert p.meta["levels"][0] == ["left", "right"] and p.stats["counts"].shape == (2, 2)
    mask = p.cell_mask if p.cell_mask is not None else np.zeros((2, 2), dtype=bool)
    hidden = p.n - p.stats["counts"][~mask].sum()
    assert hidden == 0 or hidden >= K
    assert decision.action == "partially_suppressed" and UNLISTED in p.meta


@given(sizes=st.lists(st.integers(1, 12), min_size=1, max_size=6), k_min=st.integers(1, 8))
def test_no_released_label_of_an_undeclared_field_has_fewer_than_k_min_subjects(
    sizes: list[int], k_min: int
) -> None:
    """For any group sizes, the labels that leave the site (group keys and contingency
    levels) are exactly those held by at least k_min subjects."""
    labels = [f"v{i}" for i in range(len(sizes))]
    frame = pd.DataFrame({"side": np.repeat(labels, sizes), "x": 1.0,
                          "target": ["STN", "GPi"] * (sum(sizes) // 2) + ["STN"] * (sum(sizes) % 2)})
    big = {lb for lb, n in zip(labels, sizes, strict=True) if n >= k_min}
    out, _, _ = grouped_release("SELECT side, count(*) FROM t GROUP BY side", frame, k_min)
    assert {dict(p.group)["side"] for p in out} == big
    (table,), _, _ = grouped_release("SELECT contingency(side, target) FROM t", frame, k_min)
    assert set(table.meta["levels"][0]) == big
