"""Site-side compute on a fake catalog, the combiner's checks, and the finaliser's
behaviour on awkward (suppressed, noised, degenerate) inputs."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from stimnet.errors import DataContractViolation, IncompatiblePartials, QueryError
from stimnet.query.fields import FieldMeta
from stimnet.query.sql import parse_sql
from stimnetd.query.aggregate import Partial
from stimnetd.query.combine import combine
from stimnetd.query.engine import compute
from stimnetd.query.result import finalize, quantile_from_histogram
from tests.unit.fakes import FakeCatalog, categorical, image, numeric

SHAPE = (2, 2, 2)
IMAGES = {
    "a.nii": np.array([3.0, 0, 0, 0, 0, 0, 0, 0.2]).reshape(SHAPE),
    "b.nii": np.array([1.0, 1, 0, 0, 0, 0, 0, -1]).reshape(SHAPE),
}
ROIS = {"first": np.arange(8).reshape(SHAPE) < 2, "last": np.arange(8).reshape(SHAPE) == 7}
FIELDS = {
    "x": numeric("x", 0, 10),
    "y": numeric("y", -100, 100),
    "g": categorical("g"),
    "h": categorical("h", ("lo", "hi")),
    "img": image("img"),
}


def catalog(**cols) -> FakeCatalog:
    return FakeCatalog(pd.DataFrame(cols), FIELDS, images=IMAGES, rois=ROIS, shape=SHAPE)


def run(sql: str, cat: FakeCatalog) -> list[Partial]:
    return compute(parse_sql(sql), cat).partials


def only(sql: str, cat: FakeCatalog) -> Partial:
    (p,) = run(sql, cat)
    return p


def test_comparisons_with_null_are_false_even_under_not():
    """SQL three-valued logic: NOT (x > 5) keeps neither rows with x > 5 nor rows with null x."""
    cat = catalog(x=[1.0, 7.0, np.nan, 3.0])
    assert only("SELECT count(*) FROM t WHERE NOT x > 5", cat).n == 2
    assert only("SELECT count(*) FROM t WHERE x > 5 OR x IS NULL", cat).n == 2
    assert only("SELECT count(*) FROM t WHERE x NOT IN (1, 3)", cat).n == 1


def test_site_reports_cohort_ids_and_size():
    """compute() returns the filtered cohort's subject ids and size for the overlap guard."""
    cat = FakeCatalog(
        pd.DataFrame({"x": [1.0, 6.0, 8.0], "subject_id": ["p1", "p2", "p3"]}), FIELDS
    )
    sc = compute(parse_sql("SELECT count(*) FROM t WHERE x BETWEEN 5 AND 9"), cat)
    assert sc.cohort_ids == frozenset({"p2", "p3"})
    assert sc.n_cohort == 2


def test_moments_clamp_to_bounds_and_skip_nulls():
    """sum/mean stats use values clamped to the declared bounds, and n counts non-nulls."""
    p = only("SELECT avg(x) FROM t", catalog(x=[-5.0, 4.0, 50.0, np.nan]))
    assert p.kind == "moments"
    assert p.n == 3
    np.testing.assert_array_equal(p.stats["n"], [3])
    np.testing.assert_array_equal(p.stats["s1"], [0 + 4 + 10])
    np.testing.assert_array_equal(p.stats["s2"], [0 + 16 + 100])


def test_count_star_counts_rows_and_count_field_counts_non_nulls():
    """count(*) counts every cohort row; count(x) only rows where x is not null."""
    cat = catalog(x=[1.0, np.nan, 2.0])
    assert [p.n for p in run("SELECT count(*), count(x) FROM t", cat)] == [3, 2]


def test_histogram_layout_is_under_bins_over_with_closed_last_bin():
    """Histogram counts are [under, bins..., over]; the last edge belongs to the last bin."""
    p = only("SELECT histogram(y, 0, 1, 2) FROM t", catalog(y=[-1.0, 0.0, 1.0, 2.0, 2.5, np.nan]))
    np.testing.assert_array_equal(p.stats["counts"], [1, 1, 2, 1])
    assert p.meta["edges"] == [0.0, 1.0, 2.0]
    assert p.n == 5


def test_quantiles_partial_is_a_fine_histogram_over_bounds():
    """Quantiles ship a `bins`-long histogram of clamped values over the field's bounds."""
    p = compute(
        parse_sql("SELECT median(x) FROM t"), catalog(x=[0.0, 5.0, 10.0, 99.0]), quantile_bins=10
    ).partials[0]
    np.testing.assert_array_equal(p.stats["counts"], [1, 0, 0, 0, 0, 1, 0, 0, 0, 2])
    assert (p.meta["lo"], p.meta["hi"], p.meta["bins"], p.meta["probs"]) == (0.0, 10.0, 10, [0.5])


def test_regression_crossprod_puts_y_last_and_uses_complete_cases():
    """regress(y, x) ships Σ z zᵀ over z = [1, x, y] for rows where both are present."""
    p = only("SELECT regress(y, x) FROM t", catalog(x=[1.0, 2.0, np.nan], y=[3.0, np.nan, 5.0]))
    assert p.meta["fields"] == ["x", "y"]
    assert p.meta["purpose"] == "regression"
    np.testing.assert_array_equal(p.stats["m"], [[1, 1, 3], [1, 1, 3], [3, 3, 9]])
    assert p.n == 1


def test_contingency_uses_declared_levels_then_observed_extras():
    """Declared levels come first in declared order; undeclared observed values follow sorted."""
    p = only(
        "SELECT contingency(h, g) FROM t",
        catalog(h=["hi", "lo", "mid", None], g=["b", "a", "a", "a"]),
    )
    assert p.meta["levels"] == [["lo", "hi", "mid"], ["a", "b"]]
    np.testing.assert_array_equal(p.stats["counts"], [[1, 0], [0, 1], [1, 0]])
    assert p.n == 3


def test_group_keys_match_across_int_and_float_columns():
    """A code read as 1 at one site and 1.0 at another (column with a null) is one group."""
    ints = FakeCatalog(pd.DataFrame({"g": [1, 1, 2]}), FIELDS)
    floats = FakeCatalog(pd.DataFrame({"g": [1.0, np.nan, 2.0]}), FIELDS)
    spec = parse_sql("SELECT g, count(*) FROM t WHERE g IN (1, 2) GROUP BY g")
    keys = [[p.group for p in compute(spec, c).partials] for c in (ints, floats)]
    assert keys == [[(("g", "1"),), (("g", "2"),)]] * 2


def test_rows_with_null_group_value_belong_to_no_group():
    """GROUP BY leaves out rows whose group field is null rather than inventing a label."""
    ps = run("SELECT g, count(*) FROM t GROUP BY g", catalog(g=["a", None, "a", "b"]))
    assert [(p.group, p.n) for p in ps] == [((("g", "a"),), 2), ((("g", "b"),), 1)]


def test_grouping_by_two_fields_matches_a_row_by_row_count():
    """Two group fields, nulls in both, levels mixed in order: each group's rows are exactly
    the rows whose labels match (a reference count done row by row)."""
    rng = np.random.default_rng(7)
    g = rng.choice(np.array(["a", "b", "c", None], dtype=object), 300)
    h = rng.choice(np.array(["lo", "hi", None], dtype=object), 300)
    x = rng.uniform(0, 10, 300)
    ps = run("SELECT g, h, count(*), sum(x) FROM t GROUP BY g, h", catalog(g=g, h=h, x=x))
    expected = {}
    for gi, hi, xi in zip(g, h, x, strict=True):
        if gi is not None and hi is not None:
            n, total = expected.get((gi, hi), (0, 0.0))
            expected[(gi, hi)] = (n + 1, total + xi)
    counts = {(dict(p.group)["g"], dict(p.group)["h"]): p.n for p in ps if p.kind == "count"}
    sums = {(dict(p.group)["g"], dict(p.group)["h"]): float(p.stats["s1"][0])
            for p in ps if p.kind == "moments"}
    assert counts == {k: n for k, (n, _) in expected.items()}
    assert sums == pytest.approx({k: t for k, (_, t) in expected.items()})


def test_grouping_by_many_high_cardinality_fields_keeps_groups_apart():
    """Nine fields of 256 distinct values: a plain mixed-radix code (256^9) would wrap a
    64-bit integer, and rows 0 and 1 — equal except in the first field, whose weight would
    be 2^64 — would share a group. Every row is its own group."""
    first = [f"v{r}" for r in range(256)] + ["v0"]
    others = ["v1"] + [f"v{r}" for r in range(1, 256)] + ["v256"]
    cols = {"c0": first, **{f"c{i}": others for i in range(1, 9)}}
    fields = {name: categorical(name) for name in cols}
    cat = FakeCatalog(pd.DataFrame(cols), fields)
    names = ", ".join(cols)
    ps = compute(parse_sql(f"SELECT {names}, count(*) FROM t GROUP BY {names}"), cat).partials
    assert [p.n for p in ps] == [1] * 257


def test_grouping_by_declared_levels_emits_every_level():
    """Groups over declared levels all appear, empty ones included, so which partials a
    site returns does not reveal which levels its subjects have."""
    ps = run("SELECT h, count(*) FROM t GROUP BY h", catalog(h=["lo", "lo"]))
    assert [(p.group, p.n) for p in ps] == [((("h", "hi"),), 0), ((("h", "lo"),), 2)]


def test_ungrouped_query_on_empty_cohort_still_returns_one_partial_per_aggregate():
    """An empty cohort yields zero-count partials, so every site answers every output."""
    ps = run(
        "SELECT count(*), avg(x), regress(y, x) FROM t WHERE x > 100", catalog(x=[1.0], y=[2.0])
    )
    assert [(p.kind, p.n) for p in ps] == [("count", 0), ("moments", 0), ("crossprod", 0)]


def test_voxel_maps_binarize_and_drop_rows_with_null_weight():
    """Maps count subjects whose image is > 0 at a voxel; a null weight drops the row."""
    cat = catalog(img=["a.nii", "b.nii", None, "a.nii"], x=[2.0, 4.0, 1.0, np.nan])
    count_map, mean_map = run("SELECT count_map(img), mean_map(img, x) FROM t", cat)
    np.testing.assert_array_equal(count_map.stats["count"].ravel(), [3, 1, 0, 0, 0, 0, 0, 2])
    assert "sum" not in count_map.stats and count_map.n == 3
    np.testing.assert_array_equal(mean_map.stats["count"].ravel(), [2, 1, 0, 0, 0, 0, 0, 1])
    np.testing.assert_array_equal(mean_map.stats["sum"].ravel(), [6, 4, 0, 0, 0, 0, 0, 2])
    assert mean_map.n == 2
    assert mean_map.meta["shape"] == [2, 2, 2] and len(mean_map.meta["affine"]) == 4


def test_roi_overlap_counts_touching_subjects_and_overlap_moments():
    """Per ROI: subjects whose binarized image overlaps it, Σ overlap voxels, Σ overlap²."""
    p = only("SELECT roi_overlap(img) FROM t", catalog(img=["a.nii", "b.nii", None]))
    assert p.meta["rois"] == ["first", "last"]
    np.testing.assert_array_equal(p.stats["n"], [2, 1])
    np.testing.assert_array_equal(p.stats["s1"], [1 + 2, 1])
    np.testing.assert_array_equal(p.stats["s2"], [1 + 4, 1])
    assert p.n == 2


def test_image_off_the_catalog_grid_is_refused():
    """An image whose shape differs from the catalog grid raises instead of broadcasting."""
    cat = FakeCatalog(
        pd.DataFrame({"img": ["odd"]}), FIELDS, images={"odd": np.ones((3, 3, 3))}, shape=SHAPE
    )
    with pytest.raises(DataContractViolation, match="not on the catalog grid"):
        run("SELECT count_map(img) FROM t", cat)


def test_image_larger_than_declared_max_voxels_is_refused():
    """A subject covering more voxels than max_voxels breaks the DP sensitivity, so stop."""
    fields = {"img": FieldMeta("img", "t", "image", max_voxels=1)}
    cat = FakeCatalog(pd.DataFrame({"img": ["b.nii"]}), fields, images=IMAGES, shape=SHAPE)
    with pytest.raises(DataContractViolation, match=r"declared max_voxels \(1\)"):
        run("SELECT roi_overlap(img) FROM t", cat)


def test_compute_revalidates_the_spec_against_its_catalog():
    """A site refuses a spec naming a field it does not have, whatever the entry node did."""
    with pytest.raises(QueryError, match="unknown field 'bmi'"):
        run("SELECT avg(bmi) FROM t", catalog(x=[1.0]))


def _moments(n, s1, s2, **kw) -> Partial:
    stats = {"n": np.array([n], float), "s1": np.array([s1], float), "s2": np.array([s2], float)}
    return Partial("v", "moments", (), n, stats, {"field": "x"}, **kw)


def test_combine_sums_site_partials_elementwise():
    """Combined stats and n are the sums of the sites' and record how many sites answered."""
    (c,) = combine([[_moments(2, 3.0, 5.0)], [_moments(3, 1.0, 1.0)]])
    assert c.n == 5 and c.meta["sites"] == 2
    np.testing.assert_array_equal(c.stats["s1"], [4.0])


@pytest.mark.parametrize(
    ("sql", "other", "message"),
    [
        ("SELECT histogram(y, 0, 1) AS h FROM t", "SELECT histogram(y, 0, 2) AS h FROM t", "edges"),
        ("SELECT count(*) AS h FROM t", "SELECT avg(x) AS h FROM t", "kind"),
    ],
)
def test_combine_refuses_incompatible_partials(sql, other, message):
    """Sites whose partials mean different things (kind, edges) are not summed."""
    cat = catalog(x=[1.0], y=[0.5])
    with pytest.raises(IncompatiblePartials, match=message):
        combine([run(sql, cat), run(other, cat)])


def test_combine_refuses_different_voxel_grids():
    """Voxel maps on different grids cannot be summed voxel by voxel."""
    a = FakeCatalog(pd.DataFrame({"img": ["a"]}), FIELDS, images={"a": np.ones(SHAPE)}, shape=SHAPE)
    b = FakeCatalog(
        pd.DataFrame({"img": ["b"]}), FIELDS, images={"b": np.ones((2, 2, 3))}, shape=(2, 2, 3)
    )
    with pytest.raises(IncompatiblePartials, match="shape"):
        combine([run("SELECT count_map(img) FROM t", c) for c in (a, b)])


def test_combine_aligns_contingency_levels_by_name():
    """Sites observing different levels still sum cell by cell under the union of levels."""
    sql = "SELECT contingency(g, h) FROM t"
    (c,) = combine(
        [run(sql, catalog(g=["a"], h=["hi"])), run(sql, catalog(g=["b", "a"], h=["lo", "hi"]))]
    )
    assert c.meta["levels"] == [["a", "b"], ["lo", "hi"]]
    np.testing.assert_array_equal(c.stats["counts"], [[0, 2], [1, 0]])


def test_combine_keeps_partial_and_total_suppression_apart():
    """The combined mask is the OR of site masks; cells withheld at every site are marked too."""
    hist = lambda counts, mask: Partial(  # noqa: E731
        "h",
        "histogram",
        (),
        0,
        {"counts": np.array(counts, float)},
        {"edges": [0.0, 1.0]},
        cell_mask=np.array(mask),
        suppressed_reason="fewer than 5 subjects",
    )
    (c,) = combine([[hist([0, 9, 0], [True, False, True])], [hist([0, 0, 7], [True, True, False])]])
    np.testing.assert_array_equal(c.cell_mask, [True, True, True])
    np.testing.assert_array_equal(c.meta["suppressed_everywhere"], [True, False, False])
    assert c.suppressed_reason == "fewer than 5 subjects"


def test_finalize_reports_cells_withheld_everywhere_as_none_with_reason():
    """A scalar withheld at every site shows None, and the reason is listed."""
    spec = parse_sql("SELECT var(x) AS v FROM t")
    withheld = _moments(0, 0.0, 0.0, cell_mask=np.array([True]), suppressed_reason="k_min")
    res = finalize(spec, combine([[withheld], [withheld]]))
    assert res.rows == [[None]]
    assert res.suppressed == [{"name": "v", "group": {}, "reason": "k_min", "scope": "all"}]


def test_finalize_notes_partially_suppressed_outputs():
    """A value computed from only some sites' releases carries a note saying so."""
    spec = parse_sql("SELECT avg(x) AS v FROM t")
    withheld = _moments(0, 0.0, 0.0, cell_mask=np.array([True]), suppressed_reason="k_min")
    res = finalize(spec, combine([[withheld], [_moments(2, 4.0, 10.0)]]))
    assert res.rows == [[2.0]]
    assert res.suppressed[0]["scope"] == "partial"
    assert res.notes == ["v: some sites withheld cells; values use the sites that released them"]


def test_finalize_survives_noised_moments():
    """A negative variance from noise becomes 0 with a note; n ≤ 1 gives None with a note."""
    spec = parse_sql("SELECT var(x) AS v FROM t")
    assert finalize(spec, [_moments(3, 3.0, 2.0)]).rows == [[0.0]]
    res = finalize(spec, [_moments(1, 3.0, 9.0)])
    assert res.rows == [[None]]
    assert res.notes == ["v: variance needs at least two values"]


def test_finalize_flags_singular_regression():
    """Collinear predictors give no coefficients and a note instead of an exception."""
    spec = parse_sql("SELECT regress(y, x, w) AS fit FROM t")
    z = np.column_stack([np.ones(4), [1.0, 2, 3, 4], [2.0, 4, 6, 8], [1.0, 0, 1, 5]])
    p = Partial("fit", "crossprod", (), 4, {"m": z.T @ z}, {"fields": ["x", "w", "y"]})
    res = finalize(spec, [p])
    assert res.regressions[0]["coefficients"] is None
    assert res.notes == ["fit: XᵀX is singular (collinear predictors, a constant predictor, or too "
                         "few complete cases); coefficients not identifiable"]


def test_quantile_estimate_tolerates_negative_noised_counts():
    """Negative (noised) bin counts are treated as empty rather than breaking the estimate."""
    counts = np.array([-2.0, 3.0, 0.0, 1.0])
    # clipped to [0, 3, 0, 1]: the two middle order statistics both lie in [1, 2)
    assert 1.0 <= quantile_from_histogram(counts, 0.0, 4.0, 0.5) < 2.0
    assert quantile_from_histogram(np.array([-1.0, 0.5]), 0.0, 1.0, 0.5) is None


def test_mean_map_is_nan_where_no_subject_covers_the_voxel():
    """Weighted mean maps divide sum by count and are NaN (not a warning) where count is 0."""
    spec = parse_sql("SELECT mean_map(img, x) AS m FROM t")
    cat = catalog(img=["a.nii", "b.nii"], x=[2.0, 4.0])
    res = finalize(spec, combine([compute(spec, cat).partials]))
    mean = res.arrays[res.maps[0]["mean_key"]].ravel()
    np.testing.assert_array_equal(mean[[0, 1, 7]], [3.0, 4.0, 2.0])
    assert np.isnan(mean[2:7]).tolist() == [True] * 5


def test_result_to_dict_is_json_safe_and_excludes_arrays():
    """to_dict() is plain JSON (NaN → null) and leaves voxel arrays to `arrays`."""
    spec = parse_sql("SELECT g, count(*), avg(x), mean_map(img, x) AS m FROM t GROUP BY g")
    cat = catalog(g=["a", "a"], x=[1.0, np.nan], img=["a.nii", "b.nii"])
    res = finalize(spec, combine([compute(spec, cat).partials]))
    d = json.loads(json.dumps(res.to_dict(), allow_nan=False))
    assert d["rows"] == [["a", 2, 1.0]]
    assert "arrays" not in d and d["maps"][0]["mean_key"] in res.arrays


def test_finalize_shows_cells_withheld_everywhere_as_none():
    """Histogram bins withheld at every site read None; bins released somewhere keep counts."""
    spec = parse_sql("SELECT histogram(y, 0, 1) AS h FROM t")
    hist = lambda counts, mask: Partial(  # noqa: E731
        "h",
        "histogram",
        (),
        9,
        {"counts": np.array(counts, float)},
        {"edges": [0.0, 1.0]},
        cell_mask=np.array(mask),
        suppressed_reason="k_min",
    )
    res = finalize(
        spec,
        combine([[hist([0, 9, 0], [True, False, True])], [hist([0, 0, 7], [True, True, False])]]),
    )
    (h,) = res.histograms
    assert (h["under"], h["counts"], h["over"]) == (None, [9], 7)
    assert res.suppressed[0]["scope"] == "partial"


def test_unweighted_mean_map_is_the_covered_fraction_of_the_cohort():
    """mean_map(img) without a weight gives, per voxel, the share of subjects covering it."""
    spec = parse_sql("SELECT mean_map(img) AS m FROM t")
    cat = catalog(img=["a.nii", "b.nii", None, "a.nii"])
    res = finalize(spec, combine([compute(spec, cat).partials]))
    mean = res.arrays[res.maps[0]["mean_key"]].ravel()
    np.testing.assert_allclose(mean[[0, 1, 2, 7]], [1.0, 1 / 3, 0.0, 2 / 3])


def test_result_rows_follow_group_by_order():
    """Rows sort by the group values in GROUP BY order, not by field name."""
    spec = parse_sql("SELECT h, g, count(*) FROM t GROUP BY h, g")
    cat = catalog(h=["lo", "hi"], g=["a", "b"])
    res = finalize(spec, combine([compute(spec, cat).partials]))
    assert [r[:2] for r in res.rows] == [["hi", "b"], ["lo", "a"]]
