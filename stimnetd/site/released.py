"""What a release shows, for the privacy rules: which cells of a partial left the site (for
exact auditing), and whether its groups may be released under DP at all."""

from __future__ import annotations

import numpy as np

from stimnetd.catalog import Catalog
from stimnetd.privacy.policy import PrivacyRefusal
from stimnetd.query.aggregate import Partial
from stimnetd.query.linear import LinearCohort


def cell_shown(p: Partial, lc: LinearCohort, n_cells: int) -> bool:
    """Whether the site released cell `lc.cell` of `p`. A contingency whose undeclared
    levels were left out is matched by level; any other doubt counts as released."""
    assert lc.cell is not None
    mask = None if p.cell_mask is None else np.asarray(p.cell_mask, dtype=bool)
    if lc.levels is not None and "levels" in p.meta:
        rows, cols = (list(lv) for lv in p.meta["levels"])
        if lc.levels[0] not in rows or lc.levels[1] not in cols:
            return False
        return mask is None or not bool(mask[rows.index(lc.levels[0]), cols.index(lc.levels[1])])
    if mask is None or mask.size != n_cells:
        return True
    return not bool(mask.ravel()[lc.cell])


def declared_groups_only(partials: list[Partial], catalog: Catalog) -> None:
    """Under DP every group and table level must be a declared level: groups present in
    the data would make which groups exist (and their labels) an exact output. Decided on
    the request and the catalog's public metadata alone."""
    for p in partials:
        names = [f for f, _ in p.group]
        if p.kind == "contingency":
            names += list(p.meta.get("fields", ()))
        for f in names:
            meta = catalog.fields.get(f)
            if meta is None or not meta.levels:
                raise PrivacyRefusal(
                    "dp", f"field {f!r} declares no levels, so grouping or tabulating by it "
                    "would release which of its values occur here; under differential privacy "
                    "only fields with declared levels can be grouped on (the catalog's "
                    "administrator can declare them)")
