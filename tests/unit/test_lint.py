"""The tree passes the project's lint rules (ruff, configured in pyproject.toml)."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_ruff_is_clean() -> None:
    """`ruff check` reports nothing on the package, tests, benches and scripts."""
    r = subprocess.run([sys.executable, "-m", "ruff", "check", "stimnetd", "stimctl", "tests",
                        "bench", "scripts", "sandbox"], cwd=ROOT, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stdout[-3000:]
