"""The in-container runtime and entrypoint, exercised on the host (no Docker): what a
script's emit calls write must be exactly what parse_result accepts."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from types import MappingProxyType
from typing import Any

import numpy as np
import pytest

from stimnet.query.fields import FieldMeta
from stimnetd.sandbox import job_manifest, parse_result

RUNTIME = Path(__file__).resolve().parents[2] / "sandbox" / "runtime"

FIELDS = MappingProxyType(
    {
        "subject": FieldMeta("subject", "subjects", "id"),
        "age": FieldMeta("age", "subjects", "integer", bounds=(18.0, 90.0)),
        "score": FieldMeta("score", "subjects", "numeric", bounds=(0.0, 10.0)),
        "vta": FieldMeta("vta", "subjects", "image", max_voxels=8),
        "arm": FieldMeta("arm", "subjects", "categorical", levels=("A", "B")),
        "site": FieldMeta("site", "subjects", "categorical", levels=("x", "y")),
    }
)


@pytest.fixture
def sandbox_dirs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, Path]:
    data, job, out = tmp_path / "data", tmp_path / "job", tmp_path / "out"
    for d in (data, job, out):
        d.mkdir()
    (data / "img").mkdir()
    rows = ["subject,age,score,vta,arm,site"]
    arms = [("A", "x"), ("A", "y"), ("B", "y"), ("C", "x")]
    for i, (age, score) in enumerate([(20, 1.0), (95, 4.0), (40, 12.0), (60, 3.0)]):
        mask = np.zeros((2, 2, 2))
        mask[0, i % 2, 0] = 1.0
        np.save(data / "img" / f"s{i}.npy", mask)
        rows.append(f"s{i},{age},{score},img/s{i}.npy,{arms[i][0]},{arms[i][1]}")
    (data / "subjects.csv").write_text("\n".join(rows) + "\n")
    (job / "manifest.json").write_text(
        json.dumps(job_manifest({"subjects": "subjects.csv"}, "subject", FIELDS))
    )
    (tmp_path / "outside.npy").write_bytes(b"")
    (data / "escape.npy").symlink_to(tmp_path / "outside.npy")
    for name, path in (("STIMNET_DATA", data), ("STIMNET_JOB", job), ("STIMNET_OUT", out)):
        monkeypatch.setenv(name, str(path))
    monkeypatch.syspath_prepend(str(RUNTIME))
    return {"data": data, "job": job, "out": out}


def _load_outputs(out: Path) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    doc = json.loads((out / "result.json").read_text())
    arrays = {p.name: np.load(p) for p in out.glob("*.npy")}
    return doc, arrays


def test_emitted_result_round_trips_through_parse_result(sandbox_dirs):
    """Every emit function writes aggregates parse_result accepts, clamped to bounds."""
    import stimnet_runtime as rt

    frame = rt.load_table("subjects")
    rt.emit_count("n", len(frame))
    rt.emit_mean("mean_age", "age", frame["age"])
    rt.emit_variance("var_score", "score", frame["score"], group=None)
    rt.emit_histogram("age_hist", "age", frame["age"], [18, 50, 90])
    rt.emit_correlation("corr", ["age", "score"], frame)
    rt.emit_contingency("tab", "arm", "site", frame)
    count = sum((img > 0).astype(float) for _, img in rt.load_images("vta"))
    rt.emit_voxel_map("vmap", "vta", count)
    rt.emit_voxel_map("big", "vta", np.zeros((80, 80, 1)), n=4)

    doc, arrays = _load_outputs(sandbox_dirs["out"])
    partials = {p.name: p for p in parse_result(doc, arrays, FIELDS, catalog_rows=4)}
    ages = np.clip([20, 95, 40, 60], 18, 90)
    assert partials["mean_age"].stats["s1"][0] == ages.sum()
    assert partials["var_score"].stats["s1"][0] == 1.0 + 4.0 + 10.0 + 3.0
    assert partials["age_hist"].stats["counts"].tolist() == [0, 2, 2, 0]
    assert (partials["vmap"].n, partials["vmap"].stats["count"].sum()) == (4, 4)
    assert partials["tab"].stats["counts"].tolist() == [[1.0, 1.0], [0.0, 1.0]]
    assert partials["tab"].n == 3
    assert doc["aggregates"][-1]["stats"]["count"] == {"npy": "a0007_count.npy"}


@pytest.mark.parametrize(
    "path", ["../outside.npy", "/etc/passwd", "img/../../outside.npy", "escape.npy"]
)
def test_load_image_refuses_paths_outside_the_catalog(sandbox_dirs, path):
    """Absolute paths, '..' and symlinks leading out of /data are refused."""
    import stimnet_runtime as rt

    with pytest.raises(PermissionError):
        rt.load_image(path)


def _entrypoint(tmp_path: Path, script: str, **env: str) -> subprocess.CompletedProcess[str]:
    path = tmp_path / "script.py"
    path.write_text(script)
    return subprocess.run(
        [sys.executable, "-I", "-B", str(RUNTIME / "entrypoint.py")],
        env={**os.environ, "STIMNET_SCRIPT": str(path), **env},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_entrypoint_reports_only_type_and_line(tmp_path: Path):
    """A failing script's stderr carries the exception type and line, not its message."""
    proc = _entrypoint(tmp_path, "x = 1\nraise ValueError('patient s01 is 71')\n")
    assert proc.returncode == 1
    assert proc.stderr == "stimnet-runtime: ValueError at line 2\n"


def test_entrypoint_verbose_errors_are_opt_in(tmp_path: Path):
    """With STIMNET_VERBOSE_ERRORS=1 the site gets the full traceback."""
    proc = _entrypoint(tmp_path, "raise ValueError('detail')\n", STIMNET_VERBOSE_ERRORS="1")
    assert proc.returncode == 1
    assert "ValueError: detail" in proc.stderr


def test_entrypoint_passes_exit_status(tmp_path: Path):
    """sys.exit(n) in the script becomes the container's exit status."""
    assert _entrypoint(tmp_path, "import sys\nsys.exit(7)\n").returncode == 7
    assert _entrypoint(tmp_path, "import sys\nsys.exit()\n").returncode == 0


def test_entrypoint_reports_syntax_errors_with_their_line(tmp_path: Path):
    """A script that does not compile is reported as SyntaxError at its line."""
    proc = _entrypoint(tmp_path, "x = 1\ny = (\n")
    assert proc.stderr.startswith("stimnet-runtime: SyntaxError at line 2")


def test_runtime_imports_nothing_from_stimnetd():
    """The in-image runtime stays independent of the daemon package."""
    for path in RUNTIME.rglob("*.py"):
        assert "stimnetd" not in path.read_text().replace("imports nothing from ``stimnetd``", "")
