"""The entry combines sites' shares one at a time: only the running sums and one site's
arrays are alive at once, and the result is the same as adding every site's together."""

from __future__ import annotations

import dataclasses
import gc
import weakref

import numpy as np
import pytest

from stimnet import codec
from stimnet.errors import IncompatiblePartials
from stimnetd.query import partial_docs
from stimnetd.query.aggregate import Partial
from stimnetd.query.combine import combine
from stimnetd.site.outcome import LEAN_BYTES, SiteOutcome, lean

SHAPE = (80, 80, 80)  # two float64 arrays: 8 MB, over LEAN_BYTES
META = {"column": "vta", "weight": "w", "shape": list(SHAPE), "xform_code": 4,
        "affine": np.eye(4).tolist()}


def _map(seed: int, withheld: bool) -> Partial:
    rng = np.random.default_rng(seed)
    count = np.zeros(SHAPE)
    count[10:20, 10:20, 10:20] = rng.integers(0, 9, (10, 10, 10))
    mask = (count > 0) & (count < 3) if withheld else None
    return Partial(name="m", kind="voxel_map", group=(("sex", "F"),), n=30 + seed,
                   stats={"count": count, "sum": count * rng.random(SHAPE)}, meta=dict(META),
                   cell_mask=mask, suppressed_reason="k_min: cells" if withheld else None)


def _packed(p: Partial) -> bytes:
    docs, arrays = partial_docs.partials_to_doc([p])
    return codec.pack({"partials": docs}, arrays)


@pytest.mark.parametrize("withheld", [(False, False, False), (True, False, True),
                                      (True, True, True)])
def test_folding_equals_adding_every_site(withheld: tuple[bool, ...]) -> None:
    """Sums, n, the OR of the withheld cells (partial) and their AND (empty everywhere):
    a site that withheld nothing makes the AND empty."""
    parts = [_map(i, w) for i, w in enumerate(withheld)]
    (out,) = combine((p,) for p in parts)  # type: ignore[misc]
    for k in ("count", "sum"):
        np.testing.assert_allclose(out.stats[k], sum(p.stats[k] for p in parts))
    assert out.n == sum(p.n for p in parts) and out.meta["sites"] == 3
    masks = [p.cell_mask if p.cell_mask is not None else np.zeros(SHAPE, bool) for p in parts]
    if any(withheld):
        np.testing.assert_array_equal(out.cell_mask, np.logical_or.reduce(masks))
        np.testing.assert_array_equal(out.meta["suppressed_everywhere"],
                                      np.logical_and.reduce(masks))
        assert out.meta["suppressed_everywhere"].any() == all(withheld)
    else:
        assert out.cell_mask is None and "suppressed_everywhere" not in out.meta
    assert parts[0].stats["count"].max() <= 8  # the sites' arrays are not modified


def test_a_sites_arrays_are_freed_before_the_next_is_decoded() -> None:
    """With shares decoded on demand, the first site's arrays are gone by the time the
    third is decoded: the entry never holds every site's maps together."""
    blobs = [_packed(_map(i, True)) for i in range(3)]
    alive: list[weakref.ref[np.ndarray]] = []
    alive_before_third: list[int] = []

    def shares():  # type: ignore[no-untyped-def]
        for i in range(3):
            if i == 2:
                gc.collect()
                alive_before_third.append(sum(r() is not None for r in alive))
            parts = list(SiteOutcome(f"s{i}", "done", packed=blobs[i]).one_by_one())
            alive.extend(weakref.ref(a) for a in parts[0].stats.values())
            yield parts
            del parts

    (out,) = combine(shares())
    assert alive_before_third == [0]
    np.testing.assert_array_equal(out.stats["count"],
                                  sum(_map(i, True).stats["count"] for i in range(3)))


def test_large_outcomes_keep_only_their_packed_form() -> None:
    """Past LEAN_BYTES an outcome drops its decoded partials; one_by_one() gives them back."""
    big = _map(0, True)
    assert sum(a.nbytes for a in big.stats.values()) > LEAN_BYTES
    blob = _packed(big)
    assert lean([big], blob) == [] and lean([big], None) == [big]
    small = Partial(name="c", kind="count", group=(), n=9, stats={"count": np.array([9.0])},
                    meta={"field": None})
    assert lean([small], _packed(small)) == [small]
    back = list(SiteOutcome("s", "done", packed=blob).one_by_one())[0]
    np.testing.assert_array_equal(back.stats["sum"], big.stats["sum"])
    np.testing.assert_array_equal(back.cell_mask, big.cell_mask)


def test_disagreeing_sites_are_named() -> None:
    a, b = _map(0, False), _map(1, False)
    b.meta["shape"] = [1, 2, 3]
    with pytest.raises(IncompatiblePartials, match="site-a and site-b disagree on shape"):
        combine([[a], [b]], ["site-a", "site-b"])


def test_within_a_share_each_partial_is_decoded_only_when_reached() -> None:
    """A share of several grouped maps, kept packed, is decoded partial by partial: when
    one reaches the sums, no earlier partial's arrays are alive any more."""
    parts = [dataclasses.replace(_map(i, True), group=(("sex", s),))
             for i, s in enumerate(["F", "M", "X"])]
    docs, arrays = partial_docs.partials_to_doc(parts)
    outcome = SiteOutcome("s", "done", packed=codec.pack({"partials": docs}, arrays))
    seen: list[weakref.ref[np.ndarray]] = []
    alive_earlier: list[int] = []

    def watched():  # type: ignore[no-untyped-def]
        for p in outcome.one_by_one():
            gc.collect()
            alive_earlier.append(sum(r() is not None for r in seen))
            seen.extend(weakref.ref(a) for a in p.stats.values())
            yield p
            del p

    out = combine([watched()])
    assert alive_earlier == [0, 0, 0] and len(out) == 3
    for p, o in zip(parts, out, strict=True):
        np.testing.assert_array_equal(o.stats["sum"], p.stats["sum"])


@pytest.mark.parametrize("sql", [
    "SELECT mean_map(vta, w) AS m FROM c GROUP BY sex",
    "SELECT mean_map(vta) AS m, count_map(vta) AS k FROM c GROUP BY sex",
])
def test_a_consumed_finalize_gives_the_same_answer(sql: str) -> None:
    """Handing the combined sums over (the entry does) turns them into the answer in place:
    the same means, counts and NaNs (withheld everywhere, or covered by nobody)."""
    from stimnet.query.sql import parse_sql
    from stimnetd.query.result import finalize

    spec = parse_sql(sql)
    def parts() -> list[Partial]:
        out = []
        for a in spec.aggregates:
            for i, sex in enumerate(["F", "M"]):
                p = _map(i, True)
                stats = p.stats if a.fields[1:] else {"count": p.stats["count"]}
                out.append(dataclasses.replace(p, name=a.name, group=(("sex", sex),),
                                               stats=stats, meta={**META, "weight": None}
                                               if not a.fields[1:] else dict(META)))
        return out

    kept = combine([parts(), parts()])
    handed = combine([parts(), parts()])
    plain, consumed = finalize(spec, kept), finalize(spec, handed, consume=True)
    assert handed == [] and plain.arrays.keys() == consumed.arrays.keys()
    for k, v in plain.arrays.items():
        np.testing.assert_array_equal(consumed.arrays[k], v)
    assert any(np.isnan(v).any() for v in plain.arrays.values())
