"""Sample-and-aggregate (privacy/blocks.py): the split, each block's value, the release."""

from __future__ import annotations

import math
from types import MappingProxyType

import numpy as np
import pytest

from stimnet.query.fields import FieldMeta
from stimnet.query.spec import QuerySpec
from stimnet.query.sql import parse_sql
from stimnetd.config import BlockSplit
from stimnetd.privacy.blocks import assign, block_value, cells, release, require_ranges
from stimnetd.privacy.policy import PrivacyRefusal
from stimnetd.query.aggregate import Partial
from stimnetd.query.combine import combine
from stimnetd.query.result import finalize
from tests.unit.test_privacy_noise import ShiftNoise

FIELDS = MappingProxyType({
    "age": FieldMeta("age", "s", "numeric", bounds=(0.0, 100.0)),
    "x": FieldMeta("x", "s", "numeric", bounds=(0.0, 10.0)),
    "sex": FieldMeta("sex", "s", "categorical", levels=("F", "M")),
})


def _spec(sql: str) -> QuerySpec:
    return parse_sql(sql)


def _mean(name: str, values: list[float], group: tuple = ()) -> Partial:
    a = np.asarray(values, dtype=np.float64)
    return Partial(name, "moments", group, len(a), {"n": np.asarray([len(a)]),
                   "s1": np.asarray([a.sum()]), "s2": np.asarray([(a * a).sum()])},
                   {"field": "age", "stat": "mean"})


class TestSplit:
    def test_blocks_are_disjoint_cover_the_cohort_and_depend_on_the_key_only(self) -> None:
        """Every subject is in exactly one block; the same key gives the same split, and
        a subject's block does not move when another subject is added."""
        ids = [f"s{i:03d}" for i in range(200)]
        split = assign(ids, b"k", 10)
        assert sorted(s for b in split for s in b) == ids
        assert assign(ids, b"k", 10) == split
        grown = assign(ids + ["new"], b"k", 10)
        assert [[s for s in b if s != "new"] for b in grown] == split
        assert assign(ids, b"other", 10) != split

    def test_block_count_follows_the_policy(self) -> None:
        """B = max(1, min(n // subjects_per_block, max_blocks))."""
        split = BlockSplit(subjects_per_block=10, max_blocks=50)
        assert [split.blocks(n) for n in (0, 9, 10, 99, 500, 10_000)] == [1, 1, 1, 9, 50, 50]


class TestRanges:
    def test_an_output_without_a_range_is_refused_naming_it(self) -> None:
        """The refusal names the outputs without a range and the clamp() syntax."""
        spec = _spec("SELECT clamp(avg(age), 0, 100) AS m, count(*) AS n FROM c")
        with pytest.raises(PrivacyRefusal) as exc:
            require_ranges(spec, "c")
        assert exc.value.args[0] == (
            "under differential privacy each declared output of a script needs a range its "
            "value is clamped to (sample-and-aggregate); none for 'n': declare it with "
            "clamp(), e.g. --outputs \"SELECT clamp(avg(age), 18, 100) AS mean_age FROM c\"")

    def test_an_output_that_is_not_a_scalar_is_refused(self) -> None:
        """A histogram cannot be reduced to one number per block."""
        spec = _spec("SELECT clamp(histogram(age, 0, 50, 100), 0, 1) AS h FROM c")
        with pytest.raises(PrivacyRefusal, match="takes count, sum, mean, var, sd, corr, not "
                                                 "histogram"):
            require_ranges(spec, "c")

    def test_the_range_survives_the_signed_spec_round_trip(self) -> None:
        """clamp(agg, lo, hi) is the aggregate with its range, through to_dict/from_dict."""
        spec = _spec("SELECT clamp(avg(age), 18, 90) AS m FROM c")
        assert spec.aggregates[0].range == (18.0, 90.0)
        assert QuerySpec.from_dict(spec.to_dict()) == spec


class TestRelease:
    def test_release_is_the_clamped_block_mean_plus_scaled_noise(self) -> None:
        """Block means 20, 90 and a failed block (the midpoint, 30), clamped to [0, 60]:
        the release is their mean plus noise of scale 60 / (3·ε); a block's value past the
        range counts as the range's end."""
        spec = _spec("SELECT clamp(avg(age), 0, 60) AS m FROM c")
        per_block = [[_mean("m", [10, 30])], [_mean("m", [90, 90])], None]
        noise = ShiftNoise(0.0)
        out, report = release(spec, [()], per_block, 2.0, noise, n_subjects=4)
        assert noise.calls == [("laplace", 60 / 3 / 2.0, 1)]
        assert finalize(spec, out).rows == [[pytest.approx((20 + 60 + 30) / 3)]]
        assert (report.epsilon, [a.sensitivity for a in report.arrays]) == (2.0, [20.0])

    def test_epsilon_is_split_over_every_output_cell(self) -> None:
        """Two outputs over two groups: four cells, each at ε/4."""
        spec = _spec("SELECT sex, clamp(avg(age), 0, 100) AS m, clamp(count(*), 0, 50) AS n "
                     "FROM c GROUP BY sex")
        group_cells = cells(spec, FIELDS)
        assert group_cells == [(("sex", "F"),), (("sex", "M"),)]
        _, report = release(spec, group_cells, [None, None], 1.0, ShiftNoise(0.0), n_subjects=8)
        assert [a.epsilon for a in report.arrays] == [0.25] * 4
        assert report.epsilon == pytest.approx(1.0)

    def test_block_values_estimate_the_cohorts_statistic(self) -> None:
        """A count and a sum are scaled by B (the cohort's, not a block's); a mean is the
        block's; a variance needs two values."""
        spec = _spec("SELECT clamp(count(*), 0, 100) AS n, clamp(sum(age), 0, 1e4) AS s, "
                     "clamp(var(age), 0, 1e3) AS v FROM c")
        n, s, v = spec.aggregates
        count = Partial("n", "count", (), 3, {"n": np.asarray([3.0])})
        assert block_value(n, count, 4) == 12.0
        assert block_value(s, _mean("s", [1, 2, 3]), 4) == 24.0
        assert block_value(v, _mean("v", [1, 2, 3]), 4) == pytest.approx(1.0)
        assert block_value(v, _mean("v", [5]), 4) is None

    def test_sites_combine_into_the_mean_over_all_their_blocks(self) -> None:
        """Site a (2 blocks, mean 10) and site b (6 blocks, mean 30): the combined mean is
        25, the combined sd is the blocks' pooled one, and counts add."""
        spec = _spec("SELECT clamp(avg(age), 0, 100) AS m, clamp(sd(age), 0, 50) AS sd, "
                     "clamp(count(*), 0, 100) AS n FROM c")

        def site(blocks: int, mean: float, sd: float, count: float) -> list[Partial]:
            per = [[_mean("m", [mean]), _const_sd("sd", sd),
                    Partial("n", "count", (), 1, {"n": np.asarray([count / blocks])})]] * blocks
            return release(spec, [()], per, 1.0, ShiftNoise(0.0), n_subjects=10)[0]

        combined = combine([site(2, 10.0, 3.0, 20.0), site(6, 30.0, 5.0, 60.0)])
        row = finalize(spec, combined).rows[0]
        assert row == [pytest.approx(25.0), pytest.approx(math.sqrt((2 * 9 + 6 * 25) / 8)), 80]


def _const_sd(name: str, sd: float) -> Partial:
    # Two values ±sd/√2: their sample variance is sd².
    d = sd / math.sqrt(2)
    return Partial(name, "moments", (), 2, {"n": np.asarray([2.0]), "s1": np.asarray([0.0]),
                   "s2": np.asarray([2 * d * d])}, {"field": "age", "stat": "sd"})


def test_a_query_with_a_declared_range_is_refused() -> None:
    """clamp() is for a script's declared outputs; a query naming it is refused, not run
    with the range silently ignored."""
    from stimnet.errors import QueryError
    from stimnetd.query.engine import compute

    spec = _spec("SELECT clamp(avg(age), 0, 50) AS m FROM c")
    with pytest.raises(QueryError) as exc:
        compute(spec, _Catalog())  # type: ignore[arg-type]
    assert exc.value.args[0] == ("m: clamp() declares a script output's range (for "
                                 "sample-and-aggregate); a query clamps to the catalog's bounds")


class _Catalog:
    fields = FIELDS
