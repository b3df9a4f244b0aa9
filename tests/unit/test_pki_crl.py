"""Revocation: revoking by name or serial, the CA-signed CRL and its checks on load
(stimnet.pki.crl), and the registry it is written from (stimnet.pki.index)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from stimnet import pki


def test_revoke_by_name_revokes_every_cert_of_that_name(
    ca_dir: Path, ca_cert: x509.Certificate, tmp_path: Path
) -> None:
    """Revoking a name lists all its certificates in a CA-signed CRL, and no one else's."""
    a1 = pki.issue(ca_dir, "alice", "researcher", tmp_path / "a1")
    a2 = pki.issue(ca_dir, "alice", "researcher", tmp_path / "a2")
    bob = pki.issue(ca_dir, "bob", "researcher", tmp_path / "bob")

    revoked = pki.revoke(ca_dir, "alice")

    assert sorted(revoked) == sorted([a1.serial, a2.serial])
    crl = pki.RevocationList.load(ca_dir / "crl.pem", ca_cert)
    assert crl.revoked_serials == frozenset({a1.serial, a2.serial})
    assert [crl.is_revoked(s) for s in (a1.serial, a2.serial, bob.serial)] == [True, True, False]
    assert {r.serial for r in pki.list_certs(ca_dir) if r.revoked} == {a1.serial, a2.serial}


@pytest.mark.parametrize("form", [str, pki.serial_hex, lambda s: f"{s:X}"])
def test_revoke_by_serial_in_decimal_or_hex(
    ca_dir: Path, ca_cert: x509.Certificate, tmp_path: Path, form
) -> None:
    """A serial given as decimal, 0x-hex or bare hex revokes exactly that certificate."""
    a1 = pki.issue(ca_dir, "alice", "researcher", tmp_path / "a1")
    a2 = pki.issue(ca_dir, "alice", "researcher", tmp_path / "a2")

    assert pki.revoke(ca_dir, form(a1.serial)) == [a1.serial]

    crl = pki.RevocationList.load(ca_dir / "crl.pem", ca_cert)
    assert crl.revoked_serials == frozenset({a1.serial})
    assert crl.is_revoked(a2.serial) is False


def test_each_crl_has_a_higher_number(
    ca_dir: Path, ca_cert: x509.Certificate, tmp_path: Path
) -> None:
    """Every rewrite of the CRL carries a larger CRL number, so peers can tell newer from older."""
    first = pki.RevocationList.load(ca_dir / "crl.pem", ca_cert).number
    pki.issue(ca_dir, "alice", "researcher", tmp_path / "a")
    pki.revoke(ca_dir, "alice")
    second = pki.RevocationList.load(ca_dir / "crl.pem", ca_cert).number
    pki.refresh_crl(ca_dir)
    third = pki.RevocationList.load(ca_dir / "crl.pem", ca_cert)
    assert first is not None and second is not None and third.number is not None
    assert first < second < third.number
    assert len(third.revoked_serials) == 1


def test_revoke_unknown_or_already_revoked_is_an_error(ca_dir: Path, tmp_path: Path) -> None:
    """Revoking something the CA never issued, or revoking twice, raises PkiError."""
    pki.issue(ca_dir, "alice", "researcher", tmp_path / "a")
    with pytest.raises(pki.PkiError, match="no certificate with serial or name 'carol'"):
        pki.revoke(ca_dir, "carol")
    pki.revoke(ca_dir, "alice")
    with pytest.raises(pki.PkiError, match="already revoked"):
        pki.revoke(ca_dir, "alice")


def test_crl_with_flipped_signature_byte_is_refused(
    ca_dir: Path, ca_cert: x509.Certificate
) -> None:
    """A CRL whose bytes were altered fails its signature check on load."""
    der = bytearray(
        x509.load_pem_x509_crl((ca_dir / "crl.pem").read_bytes()).public_bytes(
            serialization.Encoding.DER
        )
    )
    der[-1] ^= 0x01
    tampered = ca_dir / "tampered.crl"
    tampered.write_bytes(bytes(der))
    with pytest.raises(pki.PkiError, match="bad signature"):
        pki.RevocationList.load(tampered, ca_cert)


def test_crl_signed_by_another_key_is_refused(ca_dir: Path, ca_cert: x509.Certificate) -> None:
    """A CRL that names our CA as issuer but is signed by another key is refused."""
    now = datetime.now(UTC)
    forged = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(ca_cert.subject)
        .last_update(now)
        .next_update(now + timedelta(days=1))
        .sign(ec.generate_private_key(ec.SECP256R1()), hashes.SHA256())
    )
    path = ca_dir / "forged.pem"
    path.write_bytes(forged.public_bytes(serialization.Encoding.PEM))
    with pytest.raises(pki.PkiError, match=f"CRL {path} has a bad signature"):
        pki.RevocationList.load(path, ca_cert)


def test_crl_is_stale_only_after_its_next_update(ca_dir: Path, ca_cert: x509.Certificate) -> None:
    """is_stale turns true once the CRL's next_update has passed, and not before."""
    crl = pki.RevocationList.load(ca_dir / "crl.pem", ca_cert)
    assert crl.next_update is not None
    assert crl.is_stale(crl.next_update - timedelta(seconds=1)) is False
    assert crl.is_stale(crl.next_update + timedelta(seconds=1)) is True


def test_corrupt_index_is_reported_with_its_path(ca_dir: Path) -> None:
    """A damaged index.json makes list_certs raise a PkiError naming the file."""
    (ca_dir / "index.json").write_text('{"version": 1, "certs": [{"serial": "x"}]}')
    with pytest.raises(pki.PkiError, match=f"CA index {ca_dir / 'index.json'} is corrupt"):
        pki.list_certs(ca_dir)


def test_empty_revocation_list_revokes_nothing() -> None:
    """RevocationList.empty() reports no serial as revoked."""
    assert pki.RevocationList.empty().is_revoked(1) is False
    assert pki.RevocationList.empty().revoked_serials == frozenset()


