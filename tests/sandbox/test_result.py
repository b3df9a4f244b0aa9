"""parse_result: every rule a script's result can break, one case each (no Docker)."""

from __future__ import annotations

import copy
from collections.abc import Callable
from types import MappingProxyType
from typing import Any

import numpy as np
import pytest

from stimnet.errors import StimnetError
from stimnet.query.fields import FieldMeta, ImageGeometry
from stimnetd.sandbox import ResultRejected, parse_result

FIELDS = MappingProxyType(
    {
        "age": FieldMeta("age", "subjects", "integer", bounds=(18.0, 100.0)),
        "updrs": FieldMeta("updrs", "outcomes", "numeric", bounds=(-60.0, 60.0)),
        "target": FieldMeta("target", "subjects", "categorical", levels=("STN", "GPi")),
        "side": FieldMeta("side", "subjects", "categorical", levels=("L", "R")),
        "vta": FieldMeta("vta", "images", "image", max_voxels=4),
        "note": FieldMeta("note", "subjects", "categorical"),
    }
)
ROWS = 10
AGES = np.array([20.0, 30.0, 40.0, 50.0])
UPDRS = np.array([-10.0, 5.0, 12.0, 20.0])


def _z() -> np.ndarray:
    z = np.column_stack([np.ones(4), AGES, UPDRS])
    return z.T @ z


def valid_doc() -> dict[str, Any]:
    return {
        "version": 1,
        "aggregates": [
            {"kind": "count", "name": "n", "n": 4, "stats": {"n": [4]}, "meta": {}},
            {
                "kind": "moments",
                "name": "mean_age",
                "n": 4,
                "stats": {"n": [4], "s1": [AGES.sum()], "s2": [(AGES**2).sum()]},
                "meta": {"field": "age", "stat": "mean"},
            },
            {
                "kind": "histogram",
                "name": "age_hist",
                "n": 4,
                "stats": {"counts": [0, 2, 2, 0]},
                "meta": {"field": "age", "edges": [18, 35, 60]},
            },
            {
                "kind": "crossprod",
                "name": "reg",
                "n": 4,
                "stats": {"m": _z().tolist()},
                "meta": {"fields": ["age", "updrs"], "purpose": "regression"},
            },
            {
                "kind": "contingency",
                "name": "tab",
                "n": 4,
                "stats": {"counts": [[1, 1], [2, 0]]},
                "meta": {"fields": ["target", "side"], "levels": [["STN", "GPi"], ["L", "R"]]},
            },
            {
                "kind": "voxel_map",
                "name": "vmap",
                "n": 4,
                "stats": {"count": {"npy": "a.npy"}, "sum": {"npy": "b.npy"}},
                "meta": {"column": "vta", "shape": [2, 3], "weight": "updrs"},
            },
            {
                "kind": "count",
                "name": "n",
                "n": 3,
                "stats": {"n": [3]},
                "group": [["target", "STN"]],
            },
        ],
    }


def valid_arrays() -> dict[str, np.ndarray]:
    count = np.array([[4, 3, 0], [1, 0, 0]], dtype=np.int32)
    return {"a.npy": count, "b.npy": count * 10.0}


def test_valid_result_parses_every_kind():
    """A well-formed result with every script kind parses into matching Partials."""
    partials = parse_result(valid_doc(), valid_arrays(), FIELDS, ROWS)
    by_key = {p.key: p for p in partials}
    assert [p.kind for p in partials] == [
        "count",
        "moments",
        "histogram",
        "crossprod",
        "contingency",
        "voxel_map",
        "count",
    ]
    assert by_key[("n", (("target", "STN"),))].n == 3
    assert by_key[("mean_age", ())].stats["s1"].dtype == np.float64
    assert by_key[("vmap", ())].stats["count"].shape == (2, 3)
    np.testing.assert_array_equal(by_key[("reg", ())].stats["m"], _z())


def test_result_rejected_is_a_stimnet_error():
    """ResultRejected maps to a gRPC status through the daemon's one error vocabulary."""
    assert issubclass(ResultRejected, StimnetError) is True
    assert ResultRejected.code == "FAILED_PRECONDITION"


Mutation = Callable[[dict[str, Any], dict[str, np.ndarray]], None]


def _agg(doc: dict[str, Any], name: str) -> dict[str, Any]:
    return next(a for a in doc["aggregates"] if a["name"] == name)


def _set(name: str, *path: Any, value: Any) -> Mutation:
    def mutate(doc: dict[str, Any], arrays: dict[str, np.ndarray]) -> None:
        target = _agg(doc, name)
        for key in path[:-1]:
            target = target[key]
        target[path[-1]] = value

    return mutate


def _array(name: str, value: np.ndarray) -> Mutation:
    def mutate(doc: dict[str, Any], arrays: dict[str, np.ndarray]) -> None:
        arrays[name] = value

    return mutate


def _doc(fn: Callable[[dict[str, Any]], None]) -> Mutation:
    return lambda doc, arrays: fn(doc)


BAD: tuple[tuple[str, Mutation, str], ...] = (
    ("not-object", _doc(lambda d: d.clear()), "missing"),
    ("top-unknown-key", _doc(lambda d: d.update(extra=1)), "result: unknown keys"),
    ("version", _doc(lambda d: d.update(version=2)), "unsupported version"),
    ("version-bool", _doc(lambda d: d.update(version=True)), "unsupported version"),
    ("aggregates-not-list", _doc(lambda d: d.update(aggregates={})), "must be a list"),
    ("unknown-kind", _set("n", "kind", value="quantiles"), "unknown kind"),
    ("unknown-agg-key", _set("n", "extra", value=1), "unknown keys"),
    ("bad-name", _set("n", "name", value="n\nx"), "name must match"),
    ("n-float", _set("n", "n", value=4.0), "'n': n must be an integer"),
    ("n-bool", _set("n", "n", value=True), "n must be an integer"),
    ("n-negative", _set("n", "n", value=-1), "n is negative"),
    ("n-above-rows", _set("n", "n", value=ROWS + 1), "n exceeds the catalog's row count"),
    ("count-mismatch", _set("n", "stats", "n", value=[5]), "stats n differs from n"),
    ("nan", _set("mean_age", "stats", "s1", value=[float("nan")]), "NaN or infinity"),
    ("inf", _set("mean_age", "stats", "s2", value=[float("inf")]), "NaN or infinity"),
    ("string-in-stats", _set("mean_age", "stats", "s1", value=["1"]), "only numbers"),
    ("bool-in-stats", _set("n", "stats", "n", value=[True]), "only numbers"),
    ("ragged", _set("reg", "stats", "m", value=[[1, 2], [3]]), "ragged"),
    ("stats-unknown-key", _set("n", "stats", "extra", value=[1]), "stats: unknown keys"),
    ("stats-missing-key", _set("mean_age", "stats", value={"n": [4], "s1": [1]}), "missing"),
    ("unknown-field", _set("mean_age", "meta", "field", value="secret_age_71"), "does not exist"),
    ("field-not-numeric", _set("mean_age", "meta", "field", value="target"), "expected numeric"),
    ("bad-stat", _set("mean_age", "meta", "stat", value="max"), "stat must be one of"),
    ("s1-above-bounds", _set("mean_age", "stats", "s1", value=[4 * 100.0 + 1]), "s1 outside"),
    ("s1-below-bounds", _set("mean_age", "stats", "s1", value=[4 * 18.0 - 1]), "s1 outside"),
    ("s2-negative", _set("mean_age", "stats", "s2", value=[-1.0]), "s2 outside"),
    ("s2-above-bounds", _set("mean_age", "stats", "s2", value=[4 * 100.0**2 + 1]), "s2 outside"),
    ("cauchy-schwarz", _set("mean_age", "stats", "s2", value=[4 * 18.0**2]), "s1² > n·s2"),
    ("hist-sum", _set("age_hist", "stats", "counts", value=[0, 2, 1, 0]), "do not sum to n"),
    ("hist-negative", _set("age_hist", "stats", "counts", value=[-1, 3, 2, 0]), "negative counts"),
    ("hist-fraction", _set("age_hist", "stats", "counts", value=[0.5, 1.5, 2, 0]), "non-integer"),
    ("hist-shape", _set("age_hist", "stats", "counts", value=[2, 2, 0]), "wrong shape"),
    (
        "hist-edges-order",
        _set("age_hist", "meta", "edges", value=[60, 35, 18]),
        "strictly increasing",
    ),
    ("hist-edges-nan", _set("age_hist", "meta", "edges", value=[18, "x", 60]), "only numbers"),
    ("hist-one-edge", _set("age_hist", "meta", "edges", value=[18]), "edges must be a list"),
    ("cp-n", _set("reg", "n", value=5), "m[0,0] differs from n"),
    ("cp-shape", _set("reg", "stats", "m", value=_z()[:2, :2].tolist()), "wrong shape"),
    ("cp-regression-needs-x", _set("reg", "meta", "fields", value=["age"]), "needs at least one x"),
    (
        "cp-asymmetric",
        _set("reg", "stats", "m", value=(_z() + np.triu(np.ones((3, 3)), 1)).tolist()),
        "not symmetric",
    ),
    ("cp-purpose", _set("reg", "meta", "purpose", value="anova"), "purpose must be"),
    ("cp-repeat", _set("reg", "meta", "fields", value=["age", "age"]), "fields repeat"),
    ("cp-unbounded", _set("reg", "meta", "fields", value=["age", "target"]), "expected numeric"),
    (
        "contingency-levels",
        _set("tab", "meta", "levels", value=[["STN", "X"], ["L", "R"]]),
        "declared levels",
    ),
    (
        "contingency-undeclared",
        _set("tab", "meta", "fields", value=["target", "note"]),
        "declared levels",
    ),
    (
        "contingency-cell-above-n",
        _set("tab", "stats", "counts", value=[[5, 0], [0, 0]]),
        "cell count above n",
    ),
    ("voxel-count-above-n", _array("a.npy", np.full((2, 3), 5)), "cell count above n"),
    ("voxel-wrong-grid", _array("a.npy", np.zeros((3, 2))), "wrong shape"),
    ("voxel-max-voxels", _array("a.npy", np.full((2, 3), 4)), "max_voxels"),
    ("voxel-sum-bounds", _array("b.npy", np.full((2, 3), 1000.0)), "sum map outside"),
    ("voxel-dtype", _array("b.npy", np.array([["a"] * 3] * 2)), "non-numeric dtype"),
    ("voxel-nan", _array("b.npy", np.full((2, 3), np.nan)), "NaN or infinity"),
    ("voxel-missing-npy", _set("vmap", "stats", "count", value={"npy": "zz.npy"}), "missing array"),
    ("voxel-not-image", _set("vmap", "meta", "column", value="age"), "expected image"),
    ("voxel-sum-unbounded", _set("vmap", "meta", "weight", value=None), "needs a bounded weight"),
    ("voxel-shape", _set("vmap", "meta", "shape", value=[2, -3]), "positive integers"),
    (
        "group-free-text",
        _set("n", "group", value=[["target", "patient s01"]]),
        "not a declared level",
    ),
    ("group-no-levels", _set("n", "group", value=[["note", "x"]]), "not a declared level"),
    ("group-unknown-field", _set("n", "group", value=[["secret", "x"]]), "does not exist"),
    ("group-shape", _set("n", "group", value=["target"]), "[field, level]"),
    ("duplicate", _doc(lambda d: d["aggregates"][-1].update(group=[])), "emitted twice"),
    # Each file is one statistic's: one small file referenced by many statistics would be
    # converted once per reference.
    ("npy-reused", _set("vmap", "stats", "sum", value={"npy": "a.npy"}), "already uses"),
    # 10**400 would make the float conversion raise OverflowError (an internal error).
    ("huge-int-stat", _set("n", "stats", "n", value=[10**400]), "beyond ±2^53"),
    ("huge-int-edge", _set("age_hist", "meta", "edges", value=[18, 10**400]), "beyond ±2^53"),
    # One name, one statistic: a count in one group and a mean in another would be shown
    # as one column of counts.
    (
        "kind-differs-by-group",
        _doc(lambda d: d["aggregates"].append({
            "kind": "moments", "name": "n", "n": 1, "group": [["target", "GPi"]],
            "stats": {"n": [1], "s1": [50.0], "s2": [2500.0]},
            "meta": {"field": "age", "stat": "mean"}})),
        "a different kind or setting in another group",
    ),
)


@pytest.mark.parametrize(("mutate", "message"), [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_rule_violations_are_rejected(mutate: Mutation, message: str):
    """Each broken rule raises ResultRejected naming the rule."""
    doc, arrays = copy.deepcopy(valid_doc()), valid_arrays()
    mutate(doc, arrays)
    with pytest.raises(ResultRejected, match=None) as info:
        parse_result(doc, arrays, FIELDS, ROWS)
    assert message in str(info.value)


def test_rejections_never_echo_script_values():
    """Messages name the rule, not the value the script wrote (which could carry data)."""
    cases: list[Mutation] = [
        _set("n", "n", value=1_234_567),
        _set("mean_age", "meta", "field", value="age_of_s01_is_71"),
        _set("n", "kind", value="leak71"),
        _set("n", "extra71", value=1),
        _array("a.npy", np.zeros((7, 1))),
    ]
    for mutate in cases:
        doc, arrays = copy.deepcopy(valid_doc()), valid_arrays()
        mutate(doc, arrays)
        with pytest.raises(ResultRejected) as info:
            parse_result(doc, arrays, FIELDS, ROWS)
        text = str(info.value)
        assert [s for s in ("71", "1234567", "(7, 1)") if s in text] == [], text


def _geometry(shape: tuple[int, ...]) -> dict[str, ImageGeometry]:
    affine = tuple(tuple(float(v) for v in row) for row in np.diag([2.0, 2.0, 2.0, 1.0]))
    return {"vta": ImageGeometry(shape, (2.0, 2.0, 2.0), affine, "MNI152")}


def test_voxel_map_must_be_on_the_catalog_grid():
    """When the catalog grid is known, a map on any other grid is refused."""
    with pytest.raises(ResultRejected, match="not on the catalog's grid"):
        parse_result(valid_doc(), valid_arrays(), FIELDS, ROWS, geometry=_geometry((2, 4)))


def test_voxel_map_affine_comes_from_the_catalog():
    """The released affine is the catalog's; a script cannot supply one."""
    partials = parse_result(valid_doc(), valid_arrays(), FIELDS, ROWS, geometry=_geometry((2, 3)))
    vmap = next(p for p in partials if p.kind == "voxel_map")
    assert vmap.meta["affine"] == np.diag([2.0, 2.0, 2.0, 1.0]).tolist()
    doc = valid_doc()
    _agg(doc, "vmap")["meta"]["affine"] = np.eye(4).tolist()
    with pytest.raises(ResultRejected, match="unknown keys"):
        parse_result(doc, valid_arrays(), FIELDS, ROWS)


def test_partial_meta_matches_the_query_engine():
    """Script partials carry the same meta keys the query engine's finaliser reads."""
    metas = {p.name: p.meta for p in parse_result(valid_doc(), valid_arrays(), FIELDS, ROWS)}
    assert metas["mean_age"] == {"func": "mean", "field": "age", "bounds": [18.0, 100.0]}
    assert metas["age_hist"] == {"func": "histogram", "field": "age", "edges": [18.0, 35.0, 60.0]}
    assert (metas["reg"]["func"], metas["reg"]["fields"]) == ("regression", ["age", "updrs"])
    assert metas["tab"]["levels"] == [["STN", "GPi"], ["L", "R"]]
    assert (metas["vmap"]["func"], metas["vmap"]["weight"]) == ("mean_map", "updrs")


def test_float_rounding_at_the_bound_is_accepted():
    """Sums of values clamped exactly at the bound pass despite float rounding."""
    values = np.full(7, 0.1)
    fields = {"x": FieldMeta("x", "t", "numeric", bounds=(0.0, 0.1))}
    doc = {
        "version": 1,
        "aggregates": [
            {
                "kind": "moments",
                "name": "m",
                "n": 7,
                "meta": {"field": "x", "stat": "sum"},
                "stats": {
                    "n": [7],
                    "s1": [float(np.add.reduce(values))],
                    "s2": [float((values**2).sum())],
                },
            }
        ],
    }
    [p] = parse_result(doc, {}, fields, 7)
    assert p.stats["s1"][0] == pytest.approx(0.7)


def test_all_arrays_of_a_result_are_bounded_together(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every statistic is held as float64: a result's arrays together hold at most
    MAX_RESULT_ELEMENTS numbers, lists and array files alike."""
    from stimnetd.sandbox import result

    parse_result(valid_doc(), valid_arrays(), FIELDS, ROWS)
    monkeypatch.setattr(result, "MAX_RESULT_ELEMENTS", 20)
    with pytest.raises(ResultRejected, match="more than 20 numbers in all"):
        parse_result(valid_doc(), valid_arrays(), FIELDS, ROWS)


def _npy(arr: np.ndarray, *, claim: tuple[int, ...] | None = None) -> bytes:
    import io

    fh = io.BytesIO()
    header = np.lib.format.header_data_from_array_1_0(arr)
    if claim is not None:
        header["shape"] = claim
    np.lib.format.write_array_header_1_0(fh, header)
    if arr.dtype.hasobject:
        import pickle

        fh.write(pickle.dumps(arr))
    else:
        fh.write(arr.tobytes())
    return fh.getvalue()


@pytest.mark.parametrize(("data", "reason"), [
    # np.load allocates what a header claims before reading: 728 TiB from 129 bytes.
    (lambda: _npy(np.zeros(1), claim=(10**7, 10**7)), "header does not match its contents"),
    (lambda: _npy(np.zeros(6), claim=(2, 2)), "header does not match its contents"),
    (lambda: _npy(np.array([{"a": 1}], dtype=object)), "header does not match its contents"),
    (lambda: b"PK\x03\x04 an npz archive is a zip", "not a valid .npy file"),
    (lambda: b"\x93NUMPY\x09\x00", "not a valid .npy file"),
], ids=["huge-claim", "short-claim", "object-dtype", "npz", "unknown-version"])
def test_array_files_are_checked_before_numpy_reads_them(data: Any, reason: str) -> None:
    """A script's .npy file is loaded only if its header is a plain numeric array whose
    size is exactly the bytes that follow; a valid one loads as written."""
    from stimnetd.sandbox.outputs import ResultRefused, load_npy

    with pytest.raises(ResultRefused, match=reason):
        load_npy(data())
    ok = np.arange(6, dtype=np.int32).reshape(2, 3)
    loaded = load_npy(_npy(ok))
    assert (loaded.dtype, loaded.tolist()) == (ok.dtype, ok.tolist())
