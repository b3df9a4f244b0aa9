"""The tree passes the project's lint rules and type checks (ruff and mypy, configured in
pyproject.toml)."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_ruff_is_clean() -> None:
    """`ruff check` reports nothing on the package, tests, benches and scripts."""
    r = subprocess.run([sys.executable, "-m", "ruff", "check", "stimnet", "stimnetd", "stimctl", "tests",
                        "bench", "scripts", "sandbox"], cwd=ROOT, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stdout[-3000:]


def test_mypy_is_clean() -> None:
    """`mypy` (configured in pyproject.toml: every function typed, no stale ignores) reports
    nothing on the wire package, the daemon and the client."""
    r = subprocess.run([sys.executable, "-m", "mypy", "stimnet", "stimnetd", "stimctl"], cwd=ROOT,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:]
