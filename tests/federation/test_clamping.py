"""Declared bounds clamp values only where DP needs them: with DP off, federated equals
pooled even when the data fall outside the bounds."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from tests.federation.conftest import cnsim_catalog, pooled_cnsim


def _narrow_trig(tmp: Path, i: int) -> dict:
    cat = cnsim_catalog(tmp, i)
    fields = {k: dict(v) for k, v in cat["fields"].items()}
    fields["LAB_TRIG"]["bounds"] = [0, 20]  # CNSIM has negative LAB_TRIG values
    return {**cat, "fields": fields}


async def test_bounds_narrower_than_the_data_do_not_clamp_with_dp_off(
        federation, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    pooled = pooled_cnsim()
    trig = pooled["LAB_TRIG"].dropna()
    assert (trig < 0).sum() > 0  # the premise: bounds narrower than the data
    cats = [[_narrow_trig(tmp_path, i)] for i in (1, 2, 3)]
    async with federation(cats) as fed, fed.client() as c:
        ans = await c.query("SELECT avg(LAB_TRIG), regress(LAB_TSC, LAB_TRIG) FROM cnsim",
                            federated=True, min_sites=3)
    assert all(not p.get("epsilon") for p in ans.privacy)  # dp off
    assert ans.rows[0][0] == pytest.approx(trig.mean(), rel=1e-12)
    both = pooled[["LAB_TSC", "LAB_TRIG"]].dropna()
    X = np.column_stack([np.ones(len(both)), both["LAB_TRIG"]])
    beta, *_ = np.linalg.lstsq(X, both["LAB_TSC"].to_numpy(), rcond=None)
    assert ans.result["regressions"][0]["coefficients"] == pytest.approx(beta.tolist(), rel=1e-9)
