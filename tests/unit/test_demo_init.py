"""`stimctl demo init`: what it writes for each site (the run itself is tests/sandbox)."""

from __future__ import annotations

import tomllib
from pathlib import Path

from stimctl.demo import init
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
