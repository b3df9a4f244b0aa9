"""Test helpers that need the client: they live with the tests, since the daemon's shipped
helpers (`stimnetd.testing`) must not import `stimctl`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from stimctl import demodata
from stimctl.client import ClientConfig
from stimnetd.testing import CertPaths


def client_config(certs: CertPaths, address: str, timeout_s: float = 10.0) -> ClientConfig:
    """A client config for the holder of `certs`, calling the node at `address`."""
    return ClientConfig(address=address, ca=certs.ca, cert=certs.cert, key=certs.key,
                        timeout_s=timeout_s)


def demo_catalog(root: Path, site: str = "site-a", *, site_index: int = 0, n_subjects: int = 20,
                 seed: int = 3) -> dict[str, Any]:
    """A small synthetic DBS catalog entry (with its `root`) for node configs."""
    entry = demodata.generate_site(root, site=site, site_index=site_index,
                                   n_subjects=n_subjects, seed=seed)
    return {**entry, "root": str(root)}
