"""Test helpers that need the client: they live with the tests, since the daemon's shipped
helpers (`stimnetd.testing`) must not import `stimctl`."""

from __future__ import annotations

import os
import shutil
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


def fill_volume(volume: Path, leave: int = 0) -> Path:
    """A file taking every free byte of `volume` but `leave`."""
    filler = volume / "filler"
    if leave:
        filler.write_bytes(b"\0" * max(0, shutil.disk_usage(volume).free - leave))
        return filler
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        for size in (1 << 20, 4096, 1):
            try:
                while os.write(fd, b"\0" * size):
                    pass
            except OSError:
                continue
    finally:
        os.close(fd)
    return filler
