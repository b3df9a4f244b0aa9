"""A site that says nothing about privacy gets the formal guarantee."""

from __future__ import annotations

from pathlib import Path

from stimnetd.config.policy import PrivacySettings, read_privacy
from stimnetd.config.reader import Reader


def test_no_privacy_section_means_dp_required() -> None:
    assert read_privacy(Reader(Path("x.toml")), {}).dp == "required"
    assert PrivacySettings().dp == "required"
