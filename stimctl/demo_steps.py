"""The demo's query and script steps, and what each costs under the sites' privacy policy.

The demo's sites run `dp = "required"` unless `stimctl demo init --dp` says otherwise: every
answer is noised, gated by noised counts and charged (ε, δ) to alice's budget at each site.
`RUN_EPSILON` is what one run of the demo spends per site; `DEMO_BUDGET_EPSILON` (the
sites' `budget_epsilon`) is sized for two runs of it plus a few queries of one's own.
Steps that differential privacy cannot answer usefully at the demo's size (voxel maps, the
IRLS fit, per-site estimates) say why and are left to a `--dp optional` federation, where
they are exact and checked by k_min and exact auditing (docs/privacy.md).
"""

from __future__ import annotations

import argparse
import asyncio
import math
import time
import tomllib
from pathlib import Path
from typing import Protocol


class DemoFederation(Protocol):
    """What the steps use of demo.DemoFederation (not imported: demo imports the steps)."""

    root: Path
    addresses: dict[str, str]

    @property
    def researcher_config(self) -> Path: ...

    @property
    def dp(self) -> str: ...

    def site_config(self, name: str) -> Path: ...


# Per-query ε under dp = "required". The grouped table query releases three arrays (a
# count, and an average's sum and count) per group: at ε 5 a cell is released where its
# noised count clears about 13 subjects (k_min 5 plus the δ margin), which the demo's
# larger STN and GPi groups do. The whole-cohort query asks for the site's default ε 1:
# 60 subjects clear its threshold easily, and the mean is still within a few years.
TABLE_EPSILON = 5.0
COHORT_EPSILON = 1.0
# A script job is released by sample-and-aggregate under noise (README, "Script jobs under
# differential privacy"): the blocks' mean gets Laplace noise of scale (hi - lo) / (B·ε).
SCRIPT_EPSILON = 5.0
RUN_EPSILON = TABLE_EPSILON + COHORT_EPSILON + SCRIPT_EPSILON
DEMO_BUDGET_EPSILON = 25.0
DEMO_MAX_EPSILON = 5.0


def _no_out() -> argparse.Namespace:
    return argparse.Namespace(json=False, csv=False, out=None)


def charged_line(manifest: list[dict]) -> str:
    """One line of what each contributing site charged, or that nothing was."""
    charged = [m for m in manifest if m.get("epsilon") is not None]
    if not charged:
        return "charged: nothing (exact release, k_min and exact auditing)"
    return "charged (ε, δ): " + ", ".join(
        f"{m['site']} ({m['epsilon']:g}, {m.get('delta') or 0:g})" for m in charged)


async def demo_table_query(fed: DemoFederation) -> None:
    from stimctl.client import AsyncClient
    from stimctl.jobs_cli import Progress, print_answer

    # Both outputs over the same subjects (those with a UPDRS change): under exact
    # releases, outputs whose NULLs differ would give the size of their difference.
    sql = ("SELECT target, count(updrs_change), avg(updrs_change) "
           "FROM dbs_outcomes WHERE diagnosis = 'PD' GROUP BY target")
    epsilon = TABLE_EPSILON if fed.dp == "required" else None
    flag = f" --epsilon {epsilon:g}" if epsilon else ""
    print(f"$ stimctl query --federated{flag} \"{sql}\"")
    if epsilon:
        print(f"  (groups are over disjoint subjects, so each group gets the whole ε {epsilon:g}; "
              "a group leaves a site only where its noised count clears k_min plus a margin "
              "for δ, so small groups at small sites are withheld)")
    async with AsyncClient.from_file(fed.researcher_config) as c:
        with Progress(enabled=True) as progress:
            answer = await c.query(sql, federated=True, min_sites=2, epsilon=epsilon,
                                   on_event=progress)
    print_answer(answer, _no_out())
    print(charged_line(answer.manifest))


async def demo_dp_query(fed: DemoFederation) -> None:
    from stimctl.client import AsyncClient
    from stimctl.jobs_cli import print_answer

    sql = "SELECT count(*), avg(age) FROM dbs_outcomes"
    print(f"$ stimctl query --federated --epsilon {COHORT_EPSILON:g} \"{sql}\"")
    print("  (each site adds OpenDP Laplace noise calibrated to the declared bounds, not to "
          "the data: age in [18, 90]; releases only counts whose noised value clears its "
          f"threshold, and charges ε {COHORT_EPSILON:g} and its δ to alice's budget)")
    async with AsyncClient.from_file(fed.researcher_config) as c:
        answer = await c.query(sql, federated=True, min_sites=2, epsilon=COHORT_EPSILON)
    print_answer(answer, _no_out())
    print(charged_line(answer.manifest))


def voxel_threshold(max_voxels: int, epsilon: float, k_min: int, delta: float) -> int:
    """About how many subjects must cover a voxel for it to clear the noisy threshold when
    all of `epsilon` goes to the voxel counts (privacy/threshold.py's T, rounded up)."""
    alpha = math.exp(-epsilon / max_voxels)
    return k_min - 1 + max(1, math.ceil(math.log(delta * (1 + alpha)) / math.log(alpha)))


async def demo_sweet_spot(fed: DemoFederation) -> None:
    if fed.dp == "required":
        cfg = tomllib.loads(fed.site_config(next(iter(fed.addresses))).read_text())
        fields = cfg["catalogs"][0]["fields"]
        v = int(fields["vta_path"]["max_voxels"])
        privacy = cfg["privacy"]
        need = voxel_threshold(v, DEMO_MAX_EPSILON, cfg["node"]["k_min"],
                               privacy.get("delta", 1e-6))
        print(f"skipped under dp = \"required\": one subject's VTA may cover max_voxels = {v} "
              f"voxels, so each voxel's count is noised at scale {v}/ε; even with all of "
              f"ε {DEMO_MAX_EPSILON:g} (the sites' maximum per query) on the counts, a voxel "
              f"is released only where some {need} subjects cover it, and these sites have "
              "60 subjects each. No budget is spent on an answer that would be withheld. "
              "`stimctl demo init DIR --dp optional` makes a federation that releases exact "
              "maps (k_min on both sides of each voxel, exact auditing).")
        return
    await _sweet_spot_maps(fed)


async def _sweet_spot_maps(fed: DemoFederation) -> None:
    from stimctl.client import AsyncClient
    from stimctl.jobs_cli import Progress, print_answer

    # The table's STN cell (PD patients with a UPDRS change), every output over it: a
    # cohort one subject off an earlier one would be refused by exact auditing.
    # The t-map tests the improvement of the subjects covering each voxel against 0, where
    # at least 10 % of them do, FDR-corrected across those voxels; each site withholds the
    # voxels with fewer than k_min subjects on either side.
    sql = ("SELECT count(vta_path), mean_map(vta_path, improvement_pct) AS sweet_spot, "
           "tmap(vta_path, improvement_pct, min_frac => 0.1, correction => 'fdr') AS "
           "sweet_spot_t, roi_overlap(vta_path) AS overlap FROM dbs_outcomes WHERE target = 'STN' AND "
           "diagnosis = 'PD' AND updrs_change IS NOT NULL AND improvement_pct IS NOT NULL")
    out = fed.root / "results" / "sweet_spot"
    print(f"$ stimctl query --federated \"{sql}\" --out {out}/")
    async with AsyncClient.from_file(fed.researcher_config) as c:
        with Progress(enabled=True) as progress:
            answer = await c.query(sql, federated=True, min_sites=2, on_event=progress)
    print_answer(answer, argparse.Namespace(json=False, csv=False, out=out))
    print(charged_line(answer.manifest))


DEMO_SCRIPT = b"""\
# A researcher's own analysis, run in each site's hardened sandbox (no network, read-only
# data, non-root, resource limits). It may only emit aggregates; each site's privacy layer
# checks them against the catalog and, under noise, runs it once per block of subjects
# and noises the blocks' mean before anything leaves the site.
from stimnet_runtime import load_table, emit_mean

outcomes = load_table("outcomes").merge(load_table("stimulation"), on="subject_id")
followed = outcomes[outcomes["updrs_change"].notna()]
emit_mean("mean_improvement", "updrs_change", followed["updrs_change"])
"""


# What the script emits, declared and signed with it: each site releases only exactly this.
# Under noise a script's outputs are released by sample-and-aggregate: each block of
# subjects' mean is clamped to the declared range, and the blocks' mean gets Laplace noise
# of scale (hi - lo) / (B·ε), so the range is the price of the answer's precision.
DEMO_OUTPUTS = ("SELECT clamp(avg(updrs_change), -40, 40) AS mean_improvement "
                "FROM dbs_outcomes")


async def demo_script_job(fed: DemoFederation) -> None:
    from stimctl.client import AsyncClient
    from stimctl.jobs_cli import Progress, print_answer

    path = fed.root / "results" / "mean_improvement.py"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(DEMO_SCRIPT)
    print(f"$ stimctl submit {path} --catalog dbs_outcomes --federated --watch \\\n"
          f"    --epsilon {SCRIPT_EPSILON:g} --outputs \"{DEMO_OUTPUTS}\"")
    print("  (each site splits its subjects into blocks by a keyed hash, runs the script once "
          "per block, clamps each block's mean to [-40, 40] and noises the blocks' mean: "
          "the guarantee does not depend on what the script does)")
    async with AsyncClient.from_file(fed.researcher_config) as c:
        job = await c.submit_script(DEMO_SCRIPT, "dbs_outcomes", federated=True, min_sites=2,
                                    outputs=DEMO_OUTPUTS, epsilon=SCRIPT_EPSILON)
        with Progress(enabled=True) as progress:
            answer = await c.run_job(job, progress)
    print_answer(answer, _no_out())
    charged = [m for m in answer.manifest if m.get("epsilon") is not None]
    for m in charged:
        print(f"  {m['site']}: charged (ε, δ) = ({m['epsilon']:g}, {m.get('delta') or 0:g})")


async def demo_metrics(fed: DemoFederation) -> None:
    import urllib.request

    cfg = tomllib.loads(fed.site_config(next(iter(fed.addresses))).read_text())
    url = f"http://{cfg['metrics']['listen']}/metrics"
    print(f"$ curl {url}   (selected lines)")
    # Store-derived gauges refresh every 2 s (a scrape never waits on the database), so
    # give the last query's charge and the last job's end a moment to show up.
    deadline = time.monotonic() + 6

    def settled(text: str) -> bool:
        busy = [ln for ln in text.splitlines()
                if ln.startswith(('stimnet_jobs{state="running"}', 'stimnet_jobs{state="queued"}'))
                and not ln.rstrip().endswith(" 0.0")]
        return "stimnet_epsilon_spent_total{" in text and not busy

    while True:
        body = urllib.request.urlopen(url, timeout=5).read().decode()
        if settled(body) or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.5)
    wanted = ("stimnet_rpc_total{", "stimnet_jobs{", "stimnet_queue_depth ", "stimnet_peers{",
              "stimnet_privacy_decisions_total{", "stimnet_epsilon_spent_total{",
              "stimnet_sandbox_run_seconds_count", "stimnet_certificate_expiry_timestamp_seconds",
              "stimnet_build_info")
    for line in body.splitlines():
        if line.startswith(wanted) and not line.rstrip().endswith(" 0.0"):
            print("  " + line)


def skipped_under_dp(what: str, why: str) -> None:
    """Say why a step is not run under dp = "required", and where it is."""
    print(f"skipped under dp = \"required\": {what} {why}; `stimctl demo init DIR --dp "
          "optional` makes a federation that runs it exactly (k_min and exact auditing).")


def budget_note(fed: DemoFederation) -> str:
    """What a run of the demo spends of alice's budget at each site."""
    cfg = tomllib.loads(fed.site_config(next(iter(fed.addresses))).read_text())
    budget = float(cfg["privacy"]["budget_epsilon"])
    spend = RUN_EPSILON if fed.dp == "required" else COHORT_EPSILON + SCRIPT_EPSILON
    return (f"privacy: dp = \"{fed.dp}\"; this run charges alice ε {spend:g} (and δ per query) "
            f"at each site, of a budget of ε {budget:g} per catalog; a run that finds it spent "
            "says so (start afresh with a new demo directory)")
