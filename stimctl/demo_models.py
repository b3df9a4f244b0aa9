"""The demo's model steps: a federated logistic regression and a meta-analysis."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Protocol

from stimctl.demo_steps import skipped_under_dp


class DemoFederation(Protocol):
    """What these steps use of demo.DemoFederation (not imported: demo imports them)."""

    root: Path

    @property
    def researcher_config(self) -> Path: ...

    @property
    def dp(self) -> str: ...


async def demo_glm(fed: DemoFederation) -> None:
    from stimctl.client import AsyncClient
    from stimctl.jobs_cli import Progress, print_answer
    from stimnet.errors import JobFailed

    if fed.dp == "required":
        skipped_under_dp("the IRLS fit", "sends each round's XᵀWX noised at a scale set by "
                         "the declared bounds over every round (README, \"DP GLM\"): on the "
                         "demo's 60 subjects a site, even at ε 5 the noised XᵀWX comes out "
                         "singular and the fit ends with no estimates")
        return
    sql = ("SELECT glm('responder ~ amplitude_ma + target', 'binomial') FROM dbs_outcomes")
    print(f"$ stimctl query --federated \"{sql}\"")
    print("  (responder: improvement_pct > 30 at 12 months; one fan-out per IRLS iteration, "
          "each site sending XᵀWX and XᵀWz at the entry's current coefficients; equal to "
          "statsmodels on the pooled rows)")
    async with AsyncClient.from_file(fed.researcher_config) as c:
        with Progress(enabled=True) as progress:
            try:
                answer = await c.query(sql, federated=True, min_sites=2, on_event=progress)
            except JobFailed as exc:
                # A small cohort can be separated (every VIM patient a responder): the fit
                # says so instead of printing estimates.
                print(f"stimctl: {exc}")
                return
    print_answer(answer, argparse.Namespace(json=False, csv=False, out=None))


async def demo_meta(fed: DemoFederation) -> None:
    from stimctl.client import AsyncClient
    from stimctl.jobs_cli import print_answer

    if fed.dp == "required":
        skipped_under_dp("meta()", "releases each site's own estimate and standard error, "
                         "which sites refuse under differential privacy")
        return
    # updrs_change is recorded for PD patients only. No WHERE: the cohort is the catalog's,
    # which earlier steps released already (the overlap guard refuses near-copies).
    sql = "SELECT meta(avg(updrs_change)) FROM dbs_outcomes"
    png = fed.root / "forest_updrs_change.png"
    print(f"$ stimctl query --federated --forest {png} \"{sql}\"")
    async with AsyncClient.from_file(fed.researcher_config) as c:
        answer = await c.query(sql, federated=True, min_sites=2)
    print_answer(answer, argparse.Namespace(json=False, csv=False, out=None))
    answer.save_forest(png)
    print(f"forest plot written to {png}")
