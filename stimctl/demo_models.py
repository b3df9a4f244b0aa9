"""The demo's model steps: a federated logistic regression and a meta-analysis."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Protocol


class DemoFederation(Protocol):
    """What these steps use of demo.DemoFederation (not imported: demo imports them)."""

    root: Path

    @property
    def researcher_config(self) -> Path: ...


async def demo_glm(fed: DemoFederation) -> None:
    from stimctl.client import AsyncClient
    from stimctl.jobs_cli import Progress, print_answer
    from stimnet.errors import JobFailed

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
