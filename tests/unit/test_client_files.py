"""The client reads its key and certificate once, and again only when they change."""

from __future__ import annotations

from pathlib import Path

import pytest
from cryptography import x509

from stimctl.client import AsyncClient
from stimnet import signing
from stimnet.query.sql import parse_sql
from stimnetd.testing import CertFactory
from tests.helpers import client_config


async def test_a_renewed_certificate_signs_the_next_job(
        pki: CertFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """Jobs are signed with the files as they are: a renewal (new key and certificate in
    place) signs the next job without a new client; unchanged files are not reread."""
    alice = pki.issue("alice", "researcher")
    async with AsyncClient(client_config(alice, "127.0.0.1:1")) as c:
        spec = parse_sql("SELECT count(*) FROM cnsim").to_dict()
        req = signing.new_request("query", "cnsim", spec=spec, entry="node-a")
        first = c.sign(req)
        assert first.signer_cert_pem == alice.cert.read_bytes()
        reads: list[Path] = []
        read_bytes = Path.read_bytes

        def counted(self: Path) -> bytes:
            reads.append(self)
            return read_bytes(self)
        monkeypatch.setattr(Path, "read_bytes", counted)
        assert c.sign(req).signer_cert_pem == first.signer_cert_pem
        assert reads == []  # unchanged: not read again
        # A new key and certificate in place (as a renewal writes them; here bob's, from
        # the same CA, so that the change shows).
        other = pki.issue("bob", "researcher")
        alice.key.write_bytes(other.key.read_bytes())
        alice.cert.write_bytes(other.cert.read_bytes())
        reads.clear()
        second = c.sign(req)
        assert sorted(reads) == sorted([alice.key, alice.cert])
    assert second.signer_cert_pem == other.cert.read_bytes()
    verified = signing.verify(second, ca_cert=x509.load_pem_x509_certificate(
        other.ca.read_bytes()), revoked=frozenset(), max_age_s=300)
    assert verified.researcher.name == "bob"
