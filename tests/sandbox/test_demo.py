"""The README's first command: the demo federation runs end to end and stops cleanly."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np


def test_demo_init_and_run(tmp_path: Path, sandbox_image: str) -> None:
    """`stimctl demo init` + `demo run`: every step succeeds, maps are written, sites exit 0."""
    root = tmp_path / "demo"
    stimctl = [sys.executable, "-m", "stimctl.cli"]
    init = subprocess.run([*stimctl, "demo", "init", str(root), "--sites", "3", "--subjects", "30"],
                          capture_output=True, text=True, timeout=120)
    assert init.returncode == 0, init.stderr
    run = subprocess.run([*stimctl, "demo", "run", str(root)], capture_output=True, text=True,
                         timeout=300)
    out = run.stdout + run.stderr
    assert run.returncode == 0, out[-4000:]
    assert "all 3 sites stopped cleanly (exit 0)" in out
    assert out.count("succeeded 3 site(s) contributed") >= 3, out[-4000:]
    assert "stimnet_epsilon_spent_total{catalog=\"dbs_outcomes\"}" in out
    assert 'stimnet_jobs{state="succeeded"}' in out
    assert 'stimnet_jobs{state="running"}' not in out  # shown once every job has ended
    # The GLM's iterations stream live, then its coefficients (or the separation it met).
    assert "iteration 1: deviance" in out and ("amplitude_ma" in out or "GLM separation" in out)
    assert "leave one site out" in out
    # The sandboxed script's answer is noised at every site, each printing what it charged.
    # Sample-and-aggregate (one run per block of subjects): pure ε-DP, so δ is 0.
    assert out.count(": charged (ε, δ) = (5, 0)") == 3, out[-4000:]
    assert (root / "forest_updrs_change.png").read_bytes()[:4] == b"\x89PNG"
    mean = nib.load(root / "results" / "sweet_spot" / "sweet_spot_mean.nii.gz")
    assert mean.shape == (91, 109, 91)
    assert bool(np.isfinite(np.asarray(mean.dataobj)).any()) is True
    assert (root / "results" / "sweet_spot" / "sweet_spot_mean.png").read_bytes()[:4] == b"\x89PNG"
    # The sweet-spot t-map with FDR: its NIfTIs in MNI, a sidecar naming the correction.
    t = nib.load(root / "results" / "sweet_spot" / "sweet_spot_t_q.nii.gz")
    assert t.shape == (91, 109, 91) and int(t.header["sform_code"]) == 4
    side = (root / "results" / "sweet_spot" / "sweet_spot_t_thresholded.json").read_text()
    assert '"correction": "fdr_bh"' in side
    assert (root / "results" / "sweet_spot" / "sweet_spot_t_stat.png").read_bytes()[:4] == \
        b"\x89PNG"
    again = subprocess.run([*stimctl, "demo", "init", str(root)], capture_output=True, text=True,
                           timeout=60)
    assert again.returncode == 2
    assert "not empty" in again.stderr
