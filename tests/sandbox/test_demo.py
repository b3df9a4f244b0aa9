"""The README's first command: the demo federation runs end to end and stops cleanly.

Its sites run dp = "required" (the default): every answer is noised and charged, and the
steps DP cannot answer at the demo's size say why. A `--dp optional` federation runs the
exact maps and models.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np

from stimctl.demo_steps import RUN_EPSILON

STIMCTL = [sys.executable, "-m", "stimctl.cli"]
RUN_TIMEOUT_S = 600


def _demo(root: Path, *init_args: str) -> str:
    init = subprocess.run([*STIMCTL, "demo", "init", str(root), "--sites", "3", *init_args],
                          capture_output=True, text=True, timeout=120)
    assert init.returncode == 0, init.stderr
    run = subprocess.run([*STIMCTL, "demo", "run", str(root)], capture_output=True, text=True,
                         timeout=RUN_TIMEOUT_S)
    out = run.stdout + run.stderr
    assert run.returncode == 0, out[-4000:]
    assert "all 3 sites stopped cleanly (exit 0)" in out
    return out


def test_demo_runs_under_dp_required(tmp_path: Path, sandbox_image: str) -> None:
    """Default `demo init` + `demo run`: the table query, the whole-cohort query and the
    sandboxed script are noised, each site stating the (ε, δ) it charged; the ledger's
    total is what the demo says a run costs; the map and model steps say why they skip."""
    root = tmp_path / "demo"
    out = _demo(root)
    assert out.count("│ differential privacy │ required") == 3, out[:3000]
    assert out.count("succeeded 3 site(s) contributed") >= 2, out[-4000:]
    # The grouped table: the STN group (the largest at every site) is released, noised.
    stn = re.search(r"│ STN\s+│ (\d+)\s+│ (-?\d+(?:\.\d+)?)\s+│", out)
    assert stn is not None, out[-6000:]
    assert 0 < int(stn.group(1)) and -132 <= float(stn.group(2)) <= 132
    sites = ("hospital-a", "hospital-b", "hospital-c")
    assert "charged (ε, δ): " + ", ".join(f"{s} (5, 1e-06)" for s in sites) in out
    assert "charged (ε, δ): " + ", ".join(f"{s} (1, 1e-06)" for s in sites) in out
    age = re.search(r"┃ count\(\*\) ┃ avg\(age\) ┃\n.*\n│ (\d+)\s+│ (\d+(?:\.\d+)?)\s+│", out)
    assert age is not None and 18 <= float(age.group(2)) <= 90, out[-6000:]
    # Sample-and-aggregate: pure ε-DP, so δ is 0.
    assert out.count(": charged (ε, δ) = (5, 0)") == 3, out[-4000:]
    mean = re.search(r"┃ mean_improvement ┃\n.*\n│ (-?\d+(?:\.\d+)?)\s+│", out)
    assert mean is not None and -40 <= float(mean.group(1)) <= 40, out[-6000:]
    assert out.count('skipped under dp = "required"') == 3
    assert "some 430 subjects cover it" in out  # max_voxels 162 at ε 5, k_min 5, δ 1e-6
    assert f'stimnet_epsilon_spent_total{{catalog="dbs_outcomes"}} {RUN_EPSILON}' in out
    assert 'stimnet_jobs{state="running"}' not in out  # shown once every job has ended
    assert not (root / "results" / "sweet_spot").exists()
    again = subprocess.run([*STIMCTL, "demo", "init", str(root)], capture_output=True, text=True,
                           timeout=60)
    assert again.returncode == 2
    assert "not empty" in again.stderr


def test_demo_runs_exact_maps_and_models_under_dp_optional(tmp_path: Path,
                                                           sandbox_image: str) -> None:
    """`demo init --dp optional`: the GLM, the meta-analysis and the sweet-spot t-map with
    FDR (NIfTI + PNG) run exactly; the script job is still noised (it asks for an ε)."""
    root = tmp_path / "demo"
    out = _demo(root, "--dp", "optional")
    assert out.count("succeeded 3 site(s) contributed") >= 3, out[-4000:]
    assert "skipped under" not in out
    assert "iteration 1: deviance" in out and ("amplitude_ma" in out or "GLM separation" in out)
    assert "leave one site out" in out
    assert out.count(": charged (ε, δ) = (5, 0)") == 3, out[-4000:]
    assert (root / "forest_updrs_change.png").read_bytes()[:4] == b"\x89PNG"
    maps = root / "results" / "sweet_spot"
    mean = nib.load(maps / "sweet_spot_mean.nii.gz")
    assert mean.shape == (91, 109, 91)
    assert bool(np.isfinite(np.asarray(mean.dataobj)).any()) is True
    assert (maps / "sweet_spot_mean.png").read_bytes()[:4] == b"\x89PNG"
    t = nib.load(maps / "sweet_spot_t_q.nii.gz")
    assert t.shape == (91, 109, 91) and int(t.header["sform_code"]) == 4
    assert '"correction": "fdr_bh"' in (maps / "sweet_spot_t_thresholded.json").read_text()
    assert (maps / "sweet_spot_t_stat.png").read_bytes()[:4] == b"\x89PNG"
