"""The committed generated code is exactly what the protos produce."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_generated_code_matches_protos() -> None:
    """scripts/gen_protos.py --check passes: nobody edited generated files or forgot to regenerate."""
    r = subprocess.run([sys.executable, str(ROOT / "scripts" / "gen_protos.py"), "--check"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr


def test_check_detects_a_stale_file(tmp_path: Path) -> None:
    """The check fails when a generated module differs from a fresh generation."""
    import shutil

    copy = tmp_path / "repo"
    shutil.copytree(ROOT / "protos", copy / "protos")
    shutil.copytree(ROOT / "stimnet", copy / "stimnet")
    shutil.copytree(ROOT / "scripts", copy / "scripts")
    target = copy / "stimnet" / "v1" / "node_pb2.py"
    target.write_text(target.read_text() + "\n# edited by hand\n")
    r = subprocess.run([sys.executable, str(copy / "scripts" / "gen_protos.py"), "--check"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 1 and "node_pb2.py" in r.stderr
