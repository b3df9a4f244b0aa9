"""The sweet-spot notebook under examples/ runs against a live demo federation (real
daemons, real mTLS) with nbclient, and writes its maps: a t-map in MNI space with its
provenance, and a figure on the template."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path

import nbformat
import nibabel as nib
from nbclient import NotebookClient

from stimctl.demo import DemoFederation, daemon_program

NOTEBOOK = Path(__file__).resolve().parents[2] / "examples" / "sweet_spot.ipynb"


def test_the_sweet_spot_notebook_runs_against_the_demo(tmp_path: Path) -> None:
    root = tmp_path / "demo"
    init = subprocess.run([sys.executable, "-m", "stimctl.cli", "demo", "init", str(root),
                           "--sites", "3", "--subjects", "30", "--dp", "optional"],
                          capture_output=True, text=True, timeout=120)
    assert init.returncode == 0, init.stderr
    fed = DemoFederation(root, daemon_program())
    fed.start()
    out = tmp_path / "maps"
    try:
        asyncio.run(fed.wait_healthy())
        nb = nbformat.read(NOTEBOOK, as_version=4)
        env = {"STIMNET_CLIENT_CONFIG": str(fed.researcher_config),
               "STIMNET_NOTEBOOK_OUT": str(out)}
        old = {k: os.environ.get(k) for k in env}
        os.environ.update(env)  # the kernel inherits this process's environment
        try:
            NotebookClient(nb, timeout=300, kernel_name="python3",
                           resources={"metadata": {"path": str(tmp_path)}}).execute()
        finally:
            for k, v in old.items():
                os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)
    finally:
        codes = fed.stop()
    assert set(codes.values()) == {0}, codes
    printed = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code"
                      for o in c.get("outputs", []))
    assert "sites contributed" in printed and "voxels tested:" in printed, printed
    t = nib.load(out / "sweet_spot_stat.nii.gz")
    assert (int(t.header["sform_code"]), int(t.header["qform_code"])) == (4, 4)
    side = json.loads((out / "sweet_spot_stat.json").read_text())
    assert side["correction"] == "fdr_bh" and side["space"] == "MNI" and side["n"] > 0
    import matplotlib.image as mpimg

    pixels = mpimg.imread(out / "sweet_spot_t_notebook.png")[..., :3]
    # Drawn on the MNI template, not a map on black: most pixels are not black.
    assert (pixels.max(axis=-1) > 0.05).mean() > 0.5
    if os.environ.get("STIMNET_KEEP_NOTEBOOK_PNG"):
        Path(os.environ["STIMNET_KEEP_NOTEBOOK_PNG"]).write_bytes(
            (out / "sweet_spot_t_notebook.png").read_bytes())
