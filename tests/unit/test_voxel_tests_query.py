"""tmap, tmap2 and prop_map as query aggregates: SQL, the sites' partials, k_min on both
sides of a voxel, DP noise, and the entry's answer against scipy.stats on pooled data
(the same path a federated query takes, without the daemons: tests/federation has that)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from stimnet.errors import QueryError
from stimnet.query.fields import FieldMeta
from stimnet.query.spec import QuerySpec
from stimnet.query.sql import parse_sql
from stimnetd.catalog.columns import Rows
from stimnetd.privacy.noise import add_noise, sensitivities
from stimnetd.privacy.suppress import suppress_small_cells
from stimnetd.privacy.threshold import gate_noised, threshold
from stimnetd.query.combine import combine
from stimnetd.query.engine import compute
from stimnetd.query.linear import linear_cohorts
from stimnetd.query.result import finalize
from tests.unit.fakes import FakeCatalog, numeric

SHAPE = (3, 3, 2)
FIELDS = {
    "w": numeric("w", -100, 100),
    "img": FieldMeta(name="img", table="t", type="image", max_voxels=18),
}


def sites(seed: int, sizes: tuple[int, ...] = (9, 12, 7)) -> tuple[list[FakeCatalog], pd.DataFrame]:
    """Random binary images and weights, one FakeCatalog per site over a shared image dict."""
    rng = np.random.default_rng(seed)
    images: dict[str, np.ndarray] = {}
    frames = []
    for s, size in enumerate(sizes):
        paths = [f"s{s}-{i}.nii" for i in range(size)]
        for path in paths:
            images[path] = (rng.random(SHAPE) < 0.6).astype(np.float32)
        frames.append(pd.DataFrame({"subject_id": paths, "img": paths,
                                    "w": np.round(rng.normal(3, 5, size), 3)}))
    cats = [FakeCatalog(df, FIELDS, images=images, shape=SHAPE) for df in frames]
    pooled = pd.concat(frames, ignore_index=True)
    pooled["mask"] = [images[p].ravel() > 0 for p in pooled["img"]]
    return cats, pooled


def answer(sql: str, cats: list[FakeCatalog], k_min: int = 1):
    spec = parse_sql(sql)
    parts = [suppress_small_cells(compute(spec, c, clamp=False).partials, k_min)[0] for c in cats]
    res = finalize(spec, combine(parts))
    return res, {m["name"]: m for m in res.maps}


def pooled_columns(pooled: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
    return np.stack(pooled["mask"].to_list()), pooled["w"].to_numpy()


def test_sql_options_and_condition_round_trip_as_a_spec() -> None:
    """Named options and prop_map's condition parse, serialise and come back equal."""
    spec = parse_sql("SELECT tmap(img, w, mu => -1, min_n => 3, correction => 'fdr') AS t, "
                     "tmap2(img, w, correction => 'bonferroni'), "
                     "prop_map(img, w > 2, min_frac => 0.1) AS p FROM t")
    t, t2, p = spec.aggregates
    assert t.options == (("correction", "fdr"), ("min_n", 3), ("mu", -1))
    assert p.condition is not None and p.fields == ("img",)
    assert QuerySpec.from_dict(spec.to_dict()) == spec
    assert "options" not in parse_sql("SELECT count(*) FROM t").to_dict()["aggregates"][0]


@pytest.mark.parametrize("sql, message", [
    ("SELECT tmap(img, w, mu => 'x') FROM t", "mu must be a finite number"),
    # An integer no float holds: math.isfinite raises OverflowError on it.
    ("SELECT tmap(img, w, mu => 1" + "0" * 400 + ") FROM t", "mu must be a finite number"),
    ("SELECT tmap2(img, w, mu => 1) FROM t", "unknown option 'mu'"),
    ("SELECT tmap(img, w, min_frac => 2) FROM t", "min_frac must be a fraction"),
    ("SELECT tmap(img, w, correction => 'holm') FROM t", "correction must be one of"),
    ("SELECT prop_map(img) FROM t", "takes an image and a condition"),
    ("SELECT tmap(img) FROM t", "takes exactly 2 fields"),
])
def test_bad_options_are_refused_naming_them(sql: str, message: str) -> None:
    with pytest.raises(QueryError, match=message):
        parse_sql(sql)


def test_tmap_and_tmap2_equal_scipy_on_the_pooled_subjects() -> None:
    """Three sites, k_min = 1, dp off: t and p per voxel are scipy's on the pooled data;
    FDR and Bonferroni are false_discovery_control and min(1, m p) over the tested voxels
    (those left by the N-threshold, on both sides for tmap2)."""
    cats, pooled = sites(1)
    masks, w = pooled_columns(pooled)
    one = [stats.ttest_1samp(w[masks[:, v]], 1.0) for v in range(masks.shape[1])]
    m = _check(cats, "SELECT tmap(img, w, mu => 1) AS t FROM t",
               [r.statistic for r in one], [r.pvalue for r in one], "fdr_bh")
    assert m["n"] == len(pooled) and m["correction"] == "fdr_bh" and m["mu"] == 1
    need = masks.sum(axis=0)
    two = [stats.ttest_ind(w[masks[:, v]], w[~masks[:, v]], equal_var=False)
           if min(need[v], len(w) - need[v]) >= 11 else None for v in range(masks.shape[1])]
    assert any(r is None for r in two) and any(r is not None for r in two)
    m = _check(cats, "SELECT tmap2(img, w, correction => 'bonferroni', min_n => 11) AS t FROM t",
               [np.nan if r is None else r.statistic for r in two],
               [np.nan if r is None else r.pvalue for r in two], "bonferroni")
    assert m["min_n"] == 11 and m["threshold"].startswith("bonferroni p <= 0.05")


def _check(cats: list[FakeCatalog], sql: str, t: list[float], p: list[float],
           correction: str) -> dict:
    res, maps = answer(sql, cats)
    m = maps["t"]
    got = {k: res.arrays[key].ravel() for k, key in m["arrays"].items()}
    np.testing.assert_allclose(got["stat"], t, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(got["p"], p, rtol=1e-9, atol=1e-12)
    tested = np.isfinite(np.asarray(p))
    want = stats.false_discovery_control(np.asarray(p)[tested]) if correction == "fdr_bh" \
        else np.minimum(1.0, np.asarray(p)[tested] * tested.sum())
    np.testing.assert_allclose(got["q"][tested], want, rtol=1e-9, atol=1e-12)
    keep = got["q"] <= 0.05
    np.testing.assert_array_equal(np.isfinite(got["thresholded"]), keep)
    assert m["tested_voxels"] == tested.sum() and m["significant_voxels"] == keep.sum()
    return m


def test_prop_map_equals_binomtest_against_the_cohort_rate() -> None:
    cats, pooled = sites(2)
    res, maps = answer("SELECT prop_map(img, w > 3, correction => 'none') AS p FROM t", cats)
    masks, w = pooled_columns(pooled)
    met = w > 3
    rate = met.mean()
    m = maps["p"]
    frac, p = (res.arrays[m["arrays"][k]].ravel() for k in ("stat", "p"))
    for v in range(masks.shape[1]):
        k, n = int(met[masks[:, v]].sum()), int(masks[:, v].sum())
        assert frac[v] == pytest.approx(k / n)
        assert p[v] == pytest.approx(stats.binomtest(k, n, rate).pvalue, rel=1e-9, abs=1e-12)
    assert "df" not in m["arrays"]


def test_k_min_withholds_voxels_with_few_subjects_on_either_side() -> None:
    """A voxel nearly everybody covers is withheld as surely as one nearly nobody does: the
    released cohort totals minus the voxel's sums would be the few not covering it."""
    cats, _ = sites(3, sizes=(10,))
    spec = parse_sql("SELECT tmap2(img, w) AS t FROM t")
    (p,) = compute(spec, cats[0], clamp=False).partials
    counts = p.stats["count"].ravel()
    (out,), _ = suppress_small_cells([p], 3)
    mask = out.cell_mask.ravel()
    np.testing.assert_array_equal(mask, (counts < 3) | (10 - counts < 3))
    assert mask.any() and not np.any(out.stats["sum"].ravel()[mask])
    assert out.stats["total_n"][0] == 10
    assert out.stats["total_sum"][0] == pytest.approx(p.stats["total_sum"][0])
    # At k_min = 1 no side can hold 1..k_min-1 subjects: nothing is masked, empty sides
    # included, so the pooled test stays the pooled data's.
    (one,), _ = suppress_small_cells([p], 1)
    assert one.cell_mask is None


def test_dp_charges_every_sum_at_its_declared_sensitivity_and_gates_both_sides() -> None:
    """Under DP the six arrays take their share at V, V·B, V·B², 1, B, B² (prop_map: four, at
    B = 1), the noised total is the partial's n, and the gate masks both sides."""
    cats, _ = sites(4, sizes=(40,))
    spec = parse_sql("SELECT tmap(img, w) AS t, prop_map(img, w > 0) AS p FROM t")
    t, p = compute(spec, cats[0], clamp=True).partials
    assert sensitivities(t, FIELDS) == {"count": 18, "sum": 1800, "sum2": 180000, "total_n": 1,
                                        "total_sum": 100, "total_sum2": 10000}

    class Zero:
        def laplace(self, v: np.ndarray, scale: float) -> np.ndarray:
            return np.asarray(v, dtype=np.float64)

        def discrete_laplace(self, v: np.ndarray, scale: float) -> np.ndarray:
            return np.asarray(v, dtype=np.float64)

    noised, report = add_noise([t, p], FIELDS, 2000.0, Zero(), partitioned=True)
    assert sorted(a.stat for a in report.arrays if a.output == "p") == \
        ["count", "sum", "total_n", "total_sum"]
    assert report.epsilon == pytest.approx(2000.0) and noised[0].n == 40
    gated, _ = gate_noised(noised, report, 16, 1e-6)
    scale = next(a.scale for a in report.arrays if (a.output, a.stat) == ("t", "count"))
    assert scale == pytest.approx(18 / (2000 / 10))
    gate = threshold(16, scale, 1e-6)
    counts = t.stats["count"].ravel()
    mask = gated[0].cell_mask
    assert mask is not None and gated[0].stats["total_n"][0] == 40
    want = (counts < gate) | (40 - counts < gate)
    assert want.any() and not want.all()
    np.testing.assert_array_equal(mask.ravel(), want)


def test_prop_map_audits_its_condition_as_the_weight() -> None:
    """Exact auditing sees prop_map's sums over the subjects whose condition is known."""
    cats, _ = sites(5, sizes=(6,))
    spec = parse_sql("SELECT prop_map(img, w > 0) AS p, tmap(img, w) AS t FROM t")
    result = compute(spec, cats[0], audit=True, clamp=False)
    quantities = {lc.quantity for lc in result.linear}
    assert "img:img*w*w" in quantities and "sum:w" in quantities
    assert any(q.startswith("img:img*[") for q in quantities)
    with pytest.raises(ValueError, match="condition is known"):
        linear_cohorts(spec.aggregates[0], Rows(cats[0].columns()), ())
