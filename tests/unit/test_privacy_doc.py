"""The privacy model (docs/privacy.md) and the README back claims with named tests: every
test they name exists."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_every_test_the_privacy_model_names_exists() -> None:
    """A renamed or deleted test would leave a claim in the privacy model with no test behind
    it while the text still looks backed."""
    text = (ROOT / "docs" / "privacy.md").read_text() + (ROOT / "README.md").read_text()
    named = set(re.findall(r"`(test_[a-z0-9_]+)(?:\[[^\]]*\])?`", text))
    defined = set()
    for path in (ROOT / "tests").rglob("test_*.py"):
        defined |= set(re.findall(r"^\s*(?:async )?def (test_[a-z0-9_]+)\(", path.read_text(),
                                  re.MULTILINE))
    assert len(named) > 20
    assert sorted(named - defined) == []
