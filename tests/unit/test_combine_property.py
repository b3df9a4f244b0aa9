"""Federated == pooled: compute per site, combine, finalize, and compare with pandas/numpy
on the concatenated rows (the acceptance criterion of the query engine)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from stimnet.query.sql import parse_sql
from stimnetd.query.combine import combine
from stimnetd.query.engine import QUANTILE_BINS, compute
from stimnetd.query.result import QueryResult, finalize
from stimnetd.testing import shared_data
from tests.unit.fakes import FakeCatalog, categorical, image, numeric

LO, HI = -10.0, 10.0  # x is drawn from [-12.5, 12.5], so clamping bites
SHAPE = (2, 2, 2)
ROIS = {
    "left": np.array([[[1, 1], [1, 1]], [[0, 0], [0, 0]]], dtype=bool),
    "corner": np.array([[[1, 0], [0, 0]], [[0, 0], [0, 0]]], dtype=bool),
}
FIELDS = {
    "x": numeric("x", LO, HI),
    "y": numeric("y", -100, 100),
    "z": numeric("z", -100, 100),
    "g": categorical("g"),
    "h": categorical("h"),
    "k": categorical("k"),
    "img": image("img"),
}
EDGES = (-5.0, 0.0, 5.0)
PROBS = (0.1, 0.5, 0.9)


def _sql(threshold: float, grouped: bool) -> str:
    return (
        f"SELECT {'g, ' if grouped else ''}count(*) AS n_all, count(x) AS n_x, sum(x) AS sx, "
        "avg(x) AS mx, variance(x) AS vx, stddev(x) AS sdx, quantile(x, 0.1, 0.5, 0.9) AS qx, "
        "corr(x, y) AS rxy, histogram(x, -5, 0, 5) AS hx, contingency(h, k) AS ct, "
        "regress(y, x, z) AS fit, count_map(img) AS cm, mean_map(img, x) AS mm, "
        f"roi_overlap(img) AS ro FROM sim WHERE NOT y < {threshold}"
        + (" GROUP BY g" if grouped else "")
    )


def _maybe(values: st.SearchStrategy) -> st.SearchStrategy:
    return st.one_of(st.none(), values)


@st.composite
def datasets(draw: st.DrawFn) -> tuple[pd.DataFrame, dict[str, np.ndarray], list[int], int]:
    n = draw(st.integers(0, 30))
    col = lambda s: draw(st.lists(s, min_size=n, max_size=n))  # noqa: E731
    df = pd.DataFrame(
        {
            # quarter steps keep sums of squares exact enough to compare at 1e-9
            "x": pd.array(
                [None if v is None else v / 4 for v in col(_maybe(st.integers(-50, 50)))],
                dtype="Float64",
            ).astype(float),
            "y": pd.array(col(_maybe(st.integers(-20, 20))), dtype="Float64").astype(float),
            "z": pd.array(col(_maybe(st.integers(-20, 20))), dtype="Float64").astype(float),
            "g": col(_maybe(st.sampled_from(["a", "b", "c"]))),
            "h": col(st.sampled_from(["u", "v"])),
            "k": col(_maybe(st.sampled_from(["p", "q", "r"]))),
            "img": col(_maybe(st.sampled_from(["i0", "i1", "i2"]))),
        }
    )
    images = {
        f"i{j}": np.array(
            draw(st.lists(st.sampled_from([0.0, 0.5, 2.0]), min_size=8, max_size=8))
        ).reshape(SHAPE)
        for j in range(3)
    }
    sites = draw(st.integers(1, 5))
    assignment = draw(st.lists(st.integers(0, sites - 1), min_size=n, max_size=n))
    return df, images, assignment, sites


def federated(sql: str, catalog: FakeCatalog, assignment: list[int], sites: int) -> QueryResult:
    spec = parse_sql(sql)
    per_site = [compute(spec, c).partials for c in catalog.split(assignment, sites)]
    return finalize(spec, combine(per_site))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=datasets(), threshold=st.integers(-25, 5), grouped=st.booleans())
def test_federated_equals_pooled(data, threshold, grouped):
    """For any rows split over 1-5 sites, every aggregate's federated answer equals the
    pooled pandas/numpy answer (quantiles within the documented bin-width bound)."""
    df, images, assignment, sites = data
    catalog = FakeCatalog(df, FIELDS, name="sim", images=images, rois=ROIS, shape=SHAPE)
    res = federated(_sql(threshold, grouped), catalog, assignment, sites)

    pooled = df[df["y"].notna() & (df["y"] >= threshold)]
    if grouped:
        pooled = pooled[pooled["g"].notna()]
        groups = {(("g", g),): rows for g, rows in pooled.groupby("g")}
    else:
        groups = {(): pooled}
    got_groups = [tuple(zip(["g"], r[:1], strict=True)) if grouped else () for r in res.rows]
    assert got_groups == sorted(groups)
    offset = 1 if grouped else 0
    for row, key in zip(res.rows, got_groups, strict=True):
        cell = dict(zip(res.columns[offset:], row[offset:], strict=True))
        _check_scalars(cell, groups[key])
        _check_extras(res, key, groups[key], images)


def _close(got, want, tol=1e-9):
    if want is None:
        assert got is None
        return
    assert got == pytest.approx(want, rel=tol, abs=tol)


def _check_scalars(cell: dict, rows: pd.DataFrame) -> None:
    x = rows["x"].dropna().clip(LO, HI)
    assert cell["n_all"] == len(rows)
    assert cell["n_x"] == len(x)
    _close(cell["sx"], x.sum())
    _close(cell["mx"], x.mean() if len(x) else None)
    _close(cell["vx"], x.var(ddof=1) if len(x) > 1 else None)
    _close(cell["sdx"], x.std(ddof=1) if len(x) > 1 else None)
    for p in PROBS:
        got = cell[f"qx[{p:g}]"]
        if len(x) == 0:
            assert got is None
        else:
            assert abs(got - np.quantile(x, p)) <= (HI - LO) / QUANTILE_BINS + 1e-12
    cc = rows[["x", "y"]].dropna()
    cx, cy = cc["x"].clip(LO, HI), cc["y"]
    if len(cc) > 1 and cx.var() > 0 and cy.var() > 0:
        _close(cell["rxy"], np.corrcoef(cx, cy)[0, 1])
    else:
        assert cell["rxy"] is None


def _pick(items: list[dict], name: str, key: tuple) -> dict:
    (hit,) = [i for i in items if i["name"] == name and i["group"] == dict(key)]
    return hit


def _check_extras(res: QueryResult, key: tuple, rows: pd.DataFrame, images: dict) -> None:
    raw = rows["x"].dropna().to_numpy()
    hist = _pick(res.histograms, "hx", key)
    assert hist["under"] == int((raw < EDGES[0]).sum())
    assert hist["over"] == int((raw > EDGES[-1]).sum())
    assert hist["counts"] == np.histogram(raw, bins=EDGES)[0].tolist()

    ct = _pick(res.contingency, "ct", key)
    pairs = rows[["h", "k"]].dropna()
    got = {
        (a, b): ct["counts"][i][j]
        for i, a in enumerate(ct["levels"][0])
        for j, b in enumerate(ct["levels"][1])
        if ct["counts"][i][j]
    }
    assert got == pairs.value_counts().to_dict()

    _check_regression(_pick(res.regressions, "fit", key), rows)

    with_img = rows[rows["img"].notna()]
    stack = np.array([images[p] > 0 for p in with_img["img"]], dtype=bool).reshape(-1, *SHAPE)
    cm = _pick(res.maps, "cm", key)
    np.testing.assert_array_equal(res.arrays[cm["count_key"]], stack.sum(axis=0))
    weighted = with_img[with_img["x"].notna()]
    wstack = np.array([images[p] > 0 for p in weighted["img"]], dtype=bool).reshape(-1, *SHAPE)
    w = weighted["x"].clip(LO, HI).to_numpy()
    count = wstack.sum(axis=0)
    total = (wstack * w[:, None, None, None]).sum(axis=0)
    mm = _pick(res.maps, "mm", key)
    np.testing.assert_allclose(res.arrays[mm["count_key"]], count)
    want = np.divide(total, count, out=np.full(SHAPE, np.nan), where=count > 0)
    np.testing.assert_allclose(res.arrays[mm["mean_key"]], want, rtol=1e-9, atol=1e-12)

    ro = _pick(res.roi_overlap, "ro", key)
    assert ro["subjects"] == len(with_img)
    for entry in ro["rois"]:
        overlap = (stack & ROIS[entry["roi"]]).sum(axis=(1, 2, 3))
        touching = overlap[overlap > 0]
        assert entry["n"] == len(touching)
        _close(entry["mean_voxels"], touching.mean() if len(touching) else None)
        _close(entry["sd_voxels"], touching.std(ddof=1) if len(touching) > 1 else None)


def _check_regression(fit: dict, rows: pd.DataFrame) -> None:
    cc = rows[["y", "x", "z"]].dropna()
    X = np.column_stack([np.ones(len(cc)), cc["x"].clip(LO, HI), cc["z"]])
    y = cc["y"].to_numpy()
    assert fit["n"] == len(cc)
    if len(cc) < 3 or np.linalg.matrix_rank(X) < 3:
        assert fit["coefficients"] is None
        return
    if np.linalg.cond(X) > 1e6:
        return  # nearly collinear draws: both answers are numerically meaningless
    beta, rss, *_ = np.linalg.lstsq(X, y, rcond=None)
    np.testing.assert_allclose(fit["coefficients"], beta, rtol=1e-6, atol=1e-6)
    resid = float(((y - X @ beta) ** 2).sum())
    _close(fit["rss"], resid, tol=1e-6)
    if len(cc) > 3:
        se = np.sqrt(np.diag(np.linalg.inv(X.T @ X)) * resid / (len(cc) - 3))
        np.testing.assert_allclose(fit["std_errors"], se, rtol=1e-5, atol=1e-6)


def _cnsim(i: int) -> pd.DataFrame:
    df = pd.read_csv(shared_data("cnsim", f"CNSIM{i}.csv"), index_col=0)
    df.columns = [c.strip() for c in df.columns]
    return df


def test_cnsim_federated_equals_pooled():
    """On the public CNSIM data split as published (3 sites), federated count, mean,
    variance of LAB_TSC and the regression LAB_TSC ~ LAB_TRIG equal pandas/numpy on the
    concatenated files; bounds are wide (±1e6) so clamping changes nothing."""
    frames = [_cnsim(i) for i in (1, 2, 3)]
    wide = {c: numeric(c, -1e6, 1e6) for c in ("LAB_TSC", "LAB_TRIG")}
    spec = parse_sql(
        "SELECT count(*) AS rows, count(LAB_TSC) AS n, avg(LAB_TSC) AS mean, "
        "variance(LAB_TSC) AS var, lm('LAB_TSC ~ LAB_TRIG') AS fit FROM cnsim"
    )
    per_site = [compute(spec, FakeCatalog(f, wide, name="cnsim")).partials for f in frames]
    res = finalize(spec, combine(per_site))

    pooled = pd.concat(frames, ignore_index=True)
    tsc = pooled["LAB_TSC"].dropna()
    row = dict(zip(res.columns, res.rows[0], strict=True))
    assert row["rows"] == len(pooled)
    assert row["n"] == len(tsc)
    _close(row["mean"], tsc.mean(), tol=1e-12)
    _close(row["var"], tsc.var(ddof=1), tol=1e-9)
    cc = pooled[["LAB_TSC", "LAB_TRIG"]].dropna()
    X = np.column_stack([np.ones(len(cc)), cc["LAB_TRIG"]])
    beta, rss, *_ = np.linalg.lstsq(X, cc["LAB_TSC"].to_numpy(), rcond=None)
    (fit,) = res.regressions
    assert fit["n"] == len(cc)
    np.testing.assert_allclose(fit["coefficients"], beta, rtol=1e-9)
    _close(fit["rss"], float(rss[0]), tol=1e-8)
