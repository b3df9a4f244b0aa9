"""`stimctl demo init`: what it writes for each site (the run itself is tests/sandbox)."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from stimctl.demo import init
from stimctl.demo_steps import (
    COHORT_EPSILON,
    DEMO_BUDGET_EPSILON,
    DEMO_MAX_EPSILON,
    RUN_EPSILON,
    SCRIPT_EPSILON,
    TABLE_EPSILON,
    voxel_threshold,
)
from stimnet.pki import identity_from_cert
from stimnetd.config import load_config


def test_demo_init_makes_one_admin_per_site(tmp_path: Path) -> None:
    """Each site obeys its own admin only, and that admin's client talks to that site."""
    init(tmp_path / "demo", sites=2, subjects=12)
    root = tmp_path / "demo"
    for site in ("hospital-a", "hospital-b"):
        config = load_config(root / "sites" / site / "node.toml")
        assert config.node.admins == (f"ops-{site}",)
        client = tomllib.loads((root / "admin" / site / "client.toml").read_text())
        cert = identity_from_cert((root / "admin" / site / client["cert"]).read_bytes())
        assert (cert.role, cert.name) == ("admin", f"ops-{site}")
        assert client["address"] == f"127.0.0.1:{config.node.port}"


def test_demo_sites_require_dp_and_the_run_fits_their_budget(tmp_path: Path) -> None:
    """The demo's sites run dp = "required" (issue 20 item 4), every per-query ε the demo
    asks for is one they accept, and one run's charges fit the budget twice over."""
    init(tmp_path / "demo", sites=2, subjects=12)
    for site in ("hospital-a", "hospital-b"):
        privacy = load_config(tmp_path / "demo" / "sites" / site / "node.toml").privacy
        assert privacy.dp == "required"
        assert privacy.budget_epsilon == DEMO_BUDGET_EPSILON
        assert privacy.max_epsilon_per_query == DEMO_MAX_EPSILON
        for epsilon in (TABLE_EPSILON, COHORT_EPSILON, SCRIPT_EPSILON):
            assert 0 < epsilon <= privacy.max_epsilon_per_query
        assert 2 * RUN_EPSILON <= privacy.budget_epsilon
        assert 2 * 3 * privacy.delta <= privacy.budget_delta  # three noised answers a run


def test_demo_init_dp_optional_and_a_bad_mode(tmp_path: Path) -> None:
    """`--dp optional` makes exact sites (for the maps and models); a typo is refused."""
    init(tmp_path / "opt", sites=1, subjects=12, dp="optional")
    config = load_config(tmp_path / "opt" / "sites" / "hospital-a" / "node.toml")
    assert config.privacy.dp == "optional"
    with pytest.raises(ValueError, match="--dp must be"):
        init(tmp_path / "bad", sites=1, subjects=12, dp="requird")
    assert not (tmp_path / "bad").exists()


def test_voxel_threshold_matches_the_noisy_threshold() -> None:
    """The demo's explanation of why maps are skipped uses the site's own threshold rule."""
    from stimnetd.privacy.threshold import threshold

    for v, eps in ((162, 5.0), (162, 1.0), (10, 2.0)):
        ours = voxel_threshold(v, eps, 5, 1e-6)
        site = threshold(5, v / eps, 1e-6)
        assert abs(ours - site) <= 1, (v, eps, ours, site)
