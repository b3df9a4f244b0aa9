"""The entry combines partials its peers sent: any that lacks its kind's layout is refused
whole (`aggregate.layout_problem`, which the sub-job transport turns into that site's
"malformed partial aggregates" failure), so a malformed or hostile answer fails that site
in the manifest instead of the job with an internal error."""

from __future__ import annotations

import copy
import dataclasses

import numpy as np
import pandas as pd
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from stimnet import codec
from stimnet.errors import StimnetError
from stimnet.query.sql import parse_sql
from stimnetd.query import partial_docs
from stimnetd.query.aggregate import KINDS, layout_problem
from stimnetd.query.combine import combine
from stimnetd.query.engine import compute
from stimnetd.query.result import finalize
from tests.unit.fakes import FakeCatalog
from tests.unit.test_combine_property import FIELDS, ROIS, SHAPE, _sql

_RNG = np.random.default_rng(7)
_N = 40
_DF = pd.DataFrame({
    "x": _RNG.integers(-50, 50, _N) / 4, "y": _RNG.integers(-20, 20, _N) * 1.0,
    "z": _RNG.integers(-20, 20, _N) * 1.0, "g": _RNG.choice(["a", "b", "c"], _N),
    "h": _RNG.choice(["u", "v"], _N), "k": _RNG.choice(["p", "q", "r"], _N),
    "img": _RNG.choice(["i0", "i1", "i2"], _N)})
_IMAGES = {f"i{j}": _RNG.choice([0.0, 0.5, 2.0], 8).reshape(SHAPE) for j in range(3)}
_CATALOG = FakeCatalog(_DF, FIELDS, name="sim", images=_IMAGES, rois=ROIS, shape=SHAPE)


def _two_sites(grouped: bool):  # type: ignore[no-untyped-def]
    # The shared query plus the voxel tests (their voxel_stats partials).
    sql = _sql(-25, grouped).replace(" FROM sim", ", tmap(img, x) AS tm, prop_map(img, y > 0) "
                                     "AS pm FROM sim")
    spec = parse_sql(sql)
    sites = [compute(spec, c).partials for c in _CATALOG.split([i % 2 for i in range(_N)], 2)]
    return spec, sites


@pytest.mark.parametrize("grouped", [False, True])
def test_every_kind_the_engine_makes_has_its_layout(grouped: bool) -> None:
    """Every kind of partial the engine computes has the layout its kind declares, and survives
    the peer codec."""
    spec, sites = _two_sites(grouped)
    # Model kinds are the only output of their query (test_model_kinds_have_their_layout).
    assert {p.kind for p in sites[0]} == set(KINDS) - MODEL_KINDS
    for p in sites[0] + sites[1]:
        assert layout_problem(p) is None, (p.name, layout_problem(p))
    docs, arrays = partial_docs.partials_to_doc(sites[1])
    back = partial_docs.partials_from_doc(docs, arrays)  # what the entry reads from a peer
    assert [p.key for p in back] == [p.key for p in sites[1]]


MODEL_KINDS = {"glm_round", "estimate", "threshold_counts"}


@pytest.mark.parametrize(("sql", "kind"), [
    ("SELECT glm('y ~ x + z', 'gaussian') FROM sim", "glm_round"),
    ("SELECT meta(lm('y ~ x + z')) FROM sim", "estimate"),
    ("SELECT meta(avg(x)) FROM sim", "estimate"),
    ("SELECT quantile_exact(x, 0.1, 0.9) FROM sim", "threshold_counts"),
])
def test_model_kinds_have_their_layout(sql: str, kind: str) -> None:
    """A GLM round and a site's own estimates have their kinds' layouts, and a peer's one
    with a stat of the wrong shape is refused."""
    part = compute(parse_sql(sql), _CATALOG).partials[0]
    assert part.kind == kind and layout_problem(part) is None
    docs, arrays = partial_docs.partials_to_doc([part])
    back = partial_docs.partials_from_doc(docs, arrays)[0]
    assert layout_problem(back) is None and back.meta == part.meta
    first = next(iter(part.stats))
    bad = dataclasses.replace(part, stats={**part.stats, first: part.stats[first][..., :-1]})
    assert "layout" in (layout_problem(bad) or "")


_MUTATIONS = ["drop_stat", "reshape", "n", "meta", "kind", "non_finite", "mask", "text"]


@pytest.mark.parametrize("grouped", [False, True])
@settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))
@given(data=st.data())
def test_a_mangled_peer_answer_is_refused_or_combines_cleanly(grouped: bool, data) -> None:  # type: ignore[no-untyped-def]
    """A peer's answer mangled in any one way is refused by the codec or the layout check, or
    combines without error."""
    spec, sites = _two_sites(grouped)
    docs, arrays = partial_docs.partials_to_doc(sites[1])
    docs, arrays = copy.deepcopy(docs), {k: v.copy() for k, v in arrays.items()}
    p = docs[data.draw(st.integers(0, len(docs) - 1))]
    what = data.draw(st.sampled_from(_MUTATIONS))
    stat = data.draw(st.sampled_from(sorted(p["stats"])))
    if what == "drop_stat":
        del p["stats"][stat]
    elif what == "reshape":
        shape = data.draw(st.sampled_from([(0,), (3,), (2, 2), (50,)]))
        if shape == arrays[p["stats"][stat]].shape:
            what = "same shape"
        arrays[p["stats"][stat]] = np.zeros(shape)
    elif what == "n":
        p["n"] = data.draw(st.sampled_from([-5, 10**12, 2.5, True]))
    elif what == "meta":
        key = data.draw(st.sampled_from(sorted(p["meta"])))
        p["meta"][key] = data.draw(st.sampled_from([None, 0, -1, "x", [], [1, 2], [[1], "a"],
                                                    {"a": 1}, 1e300, float("nan"), 10**400,
                                                    [0, 10**400]]))
    elif what == "kind":
        p["kind"] = data.draw(st.sampled_from(KINDS))
    elif what == "non_finite":
        arrays[p["stats"][stat]] = np.full_like(arrays[p["stats"][stat]],
                                                data.draw(st.sampled_from([np.nan, np.inf])))
    elif what == "mask":
        p["cell_mask"] = p["stats"][stat]
    else:
        p["suppressed_reason"] = data.draw(st.sampled_from([7, ["x"]]))
    try:
        mine = partial_docs.partials_from_doc(docs, arrays)
    except codec.CodecError as exc:
        assert isinstance(exc.args[0], str) and exc.args[0] != ""
        return
    problems = [layout_problem(q) for q in mine if layout_problem(q) is not None]
    if problems:
        if what == "non_finite":
            assert "non-finite" in problems[0], problems
        return
    # Stats of the wrong keys, shapes or values never pass.
    assert what in ("n", "meta", "kind", "mask", "text", "same shape"), what
    try:
        finalize(spec, combine([sites[0], mine])).to_dict()
    except StimnetError as exc:  # sites disagree on a grid: named, not an internal error
        assert "site 1 and site 2 disagree on" in str(exc) or "different shapes" in str(exc), exc


def test_sites_that_disagree_on_a_grid_are_named() -> None:
    """Which two sites disagree, and on what (it said only "sites disagree")."""
    import dataclasses

    from stimnet.errors import IncompatiblePartials

    _, sites = _two_sites(False)
    odd = [dataclasses.replace(p, meta={**p.meta, "affine": [[2.0, 0, 0, 0], [0, 2.0, 0, 0],
                                                              [0, 0, 2.0, 0], [0, 0, 0, 1.0]]})
           if p.kind == "voxel_map" else p for p in sites[1]]
    with pytest.raises(IncompatiblePartials, match=r"hospital-a and hospital-c disagree on "
                                                   r"affine"):
        combine([sites[0], odd], ["hospital-a", "hospital-c"])
