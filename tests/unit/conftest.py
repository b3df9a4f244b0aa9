"""Fixtures shared by the PKI tests: a fresh CA directory and its certificate."""

from __future__ import annotations

from pathlib import Path

import pytest
from cryptography import x509

from stimnet import pki


@pytest.fixture
def ca_dir(tmp_path: Path) -> Path:
    pki.init_ca(tmp_path / "ca")
    return tmp_path / "ca"


@pytest.fixture
def ca_cert(ca_dir: Path) -> x509.Certificate:
    return pki.load_cert(ca_dir / "ca.crt")
