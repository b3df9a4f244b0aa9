"""A query's planned answer size, from the spec and the catalog's declarations alone."""

from __future__ import annotations

import pandas as pd
import pytest

from stimnet.errors import AnswerTooLarge
from stimnet.query.fields import FieldMeta
from stimnet.query.sql import parse_sql
from stimnetd.query.plan import MB, answer_plan, refuse_too_large
from tests.unit.fakes import FakeCatalog, image

SHAPE = (91, 109, 91)
VOXELS = 91 * 109 * 91


def _catalog(ages: list[float]) -> FakeCatalog:
    fields = {
        "vta": image("vta"),
        "w": FieldMeta("w", "t", "continuous"),
        "sex": FieldMeta("sex", "t", "categorical", levels=("F", "M")),
        "target": FieldMeta("target", "t", "categorical", levels=("STN", "GPi", "VIM")),
        "site_code": FieldMeta("site_code", "t", "categorical"),  # no declared levels
        "age": FieldMeta("age", "t", "continuous"),
    }
    n = len(ages)
    df = pd.DataFrame({"vta": [f"{i}.nii" for i in range(n)], "w": 1.0, "sex": "F",
                       "target": "STN", "site_code": "x", "age": ages})
    return FakeCatalog(df, fields, shape=SHAPE)


def test_declared_groups_times_maps_times_grid() -> None:
    """6 declared groups × (weighted mean_map: 2 arrays + count_map: 1) float64 grids, with
    a mask byte per voxel each; table statistics add nothing worth counting."""
    spec = parse_sql("SELECT sex, target, mean_map(vta, w), count_map(vta), avg(age) "
                     "FROM c GROUP BY sex, target")
    plan = answer_plan(spec, _catalog([50.0] * 10))
    assert (plan.groups, plan.maps, plan.declared) == (6, 2, True)
    assert plan.bytes == 6 * VOXELS * ((8 * 2 + 1) + (8 * 1 + 1))


def test_the_plan_does_not_depend_on_the_rows_values() -> None:
    """Two catalogs with the same declarations and subject count but different data have
    the same plan: a refusal reveals nothing the query's rows hold."""
    spec = parse_sql("SELECT site_code, mean_map(vta, w) FROM c WHERE age > 60 GROUP BY site_code")
    a, b = answer_plan(spec, _catalog([40.0] * 8)), answer_plan(spec, _catalog([70.0] * 8))
    assert a == b and a.groups == 8 and not a.declared


def test_over_the_limit_is_refused_naming_it() -> None:
    spec = parse_sql("SELECT sex, target, mean_map(vta, w) FROM c GROUP BY sex, target")
    cat = _catalog([50.0] * 10)
    planned = answer_plan(spec, cat).bytes / MB
    refuse_too_large(spec, cat, planned + 1)  # under: nothing raised
    refuse_too_large(spec, cat, None)
    with pytest.raises(AnswerTooLarge, match=r"6 groups × 1 map\(s\): 88 MiB .* "
                                             r"\[storage\] max_answer_mb = 50"):
        refuse_too_large(spec, cat, 50)


def test_an_undeclared_group_field_is_refused_without_the_subject_count() -> None:
    """The bound behind a field without levels is the site's subject count; the message
    says how it was counted, not the number."""
    spec = parse_sql("SELECT site_code, mean_map(vta, w) FROM c GROUP BY site_code")
    with pytest.raises(AnswerTooLarge, match="one group per subject") as info:
        refuse_too_large(spec, _catalog([50.0] * 37), 1)
    assert "37" not in str(info.value) and "MiB" not in str(info.value)


def test_a_map_of_a_field_that_is_no_image_plans_no_grid() -> None:
    """The plan comes before validation: mean_map(age) or count_map(nope) has no grid to
    plan (a real catalog has none: KeyError, once an internal error at every site); the
    query is left to validation, which refuses it naming the field."""
    class Strict(FakeCatalog):
        def geometry(self, image_field: str):  # type: ignore[no-untyped-def]
            if self.fields[image_field].type != "image":
                raise KeyError(image_field)
            return super().geometry(image_field)

    cat = _catalog([50.0] * 10)
    strict = Strict(cat.frame(), cat.fields, shape=SHAPE)
    for sql in ("SELECT mean_map(age) FROM c", "SELECT count_map(nope), avg(age) FROM c"):
        plan = answer_plan(parse_sql(sql), strict)
        assert (plan.bytes, plan.maps) == (0, 0)
    refuse_too_large(parse_sql("SELECT sex, mean_map(age) FROM c GROUP BY sex"), strict, 1)
