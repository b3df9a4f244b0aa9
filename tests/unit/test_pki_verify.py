"""Reading certificates and what they carry: loading files, the identity in the URI SAN,
chain checks and payload signatures (stimnet.pki.files, .identity, .verify)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from stimnet import pki
from stimnetd.testing import CertFactory, foreign


def _leaf_with_sans(ca_dir: Path, sans: list[x509.GeneralName] | None) -> x509.Certificate:
    ca_cert, ca_key = pki.load_cert(ca_dir / "ca.crt"), pki.load_key(ca_dir / "ca.key")
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.now(UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "mallory")]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=1))
        .not_valid_after(now + timedelta(days=1))
    )
    if sans is not None:
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    return builder.sign(ca_key, hashes.SHA256())



# --------------------------------------------------------------------------- loading


def test_load_cert_and_key_report_missing_and_corrupt_files(tmp_path: Path) -> None:
    """Missing or corrupt certificate/key files raise PkiError naming the file."""
    missing = tmp_path / "nope.crt"
    with pytest.raises(pki.PkiError, match=f"{missing} does not exist"):
        pki.load_cert(missing)
    junk = tmp_path / "junk.pem"
    junk.write_text("-----BEGIN CERTIFICATE-----\nnot base64\n-----END CERTIFICATE-----\n")
    with pytest.raises(pki.PkiError, match=f"certificate {junk} is not a valid"):
        pki.load_cert(junk)
    with pytest.raises(pki.PkiError, match=f"private key {junk} is not a valid"):
        pki.load_key(junk)


def test_identity_requires_a_stimnet_uri_san(ca_dir: Path) -> None:
    """Certificates lacking one stimnet:// URI SAN with a known role carry no identity."""
    with pytest.raises(pki.PkiError, match="no subjectAltName"):
        pki.identity_from_cert(_leaf_with_sans(ca_dir, None))
    with pytest.raises(pki.PkiError, match="no stimnet:// URI SANs"):
        pki.identity_from_cert(_leaf_with_sans(ca_dir, [x509.DNSName("example.org")]))
    with pytest.raises(pki.PkiError, match="unknown role 'root'"):
        pki.identity_from_cert(
            _leaf_with_sans(ca_dir, [x509.UniformResourceIdentifier("stimnet://root/mallory")])
        )
    two = [
        x509.UniformResourceIdentifier("stimnet://researcher/a"),
        x509.UniformResourceIdentifier("stimnet://admin/a"),
    ]
    with pytest.raises(pki.PkiError, match="expected exactly one"):
        pki.identity_from_cert(_leaf_with_sans(ca_dir, two))


# --------------------------------------------------------------------------- verify_chain


def test_expired_cert_fails_verify_chain_with_clear_message(tmp_path: Path) -> None:
    """An expired certificate is refused with a message naming the identity and the expiry."""
    factory = CertFactory(tmp_path)
    paths = factory.issue("alice", "researcher", expired=True)
    cert, ca_cert = pki.load_cert(paths.cert), pki.load_cert(factory.ca_cert_path)
    expected = cert.not_valid_after_utc.strftime("%Y-%m-%dT%H:%M:%SZ")
    with pytest.raises(
        pki.PkiError, match=f"certificate for researcher/alice .* expired at {expected}"
    ):
        pki.verify_chain(cert, ca_cert)


def test_not_yet_valid_cert_fails_verify_chain(
    ca_dir: Path, ca_cert: x509.Certificate, tmp_path: Path
) -> None:
    """A certificate checked before its not_before is refused."""
    issued = pki.issue(ca_dir, "alice", "researcher", tmp_path / "a")
    cert = pki.load_cert(issued.cert_path)
    with pytest.raises(pki.PkiError, match="is not valid until"):
        pki.verify_chain(cert, ca_cert, now=cert.not_valid_before_utc - timedelta(seconds=1))


def test_cert_from_another_ca_fails_verify_chain(tmp_path: Path) -> None:
    """A certificate from an unrelated CA with the same CA name is refused by signature."""
    ours, theirs = CertFactory(tmp_path), foreign(tmp_path)
    paths = theirs.issue("alice", "researcher")
    ours_cert = pki.load_cert(ours.ca_cert_path)
    assert pki.load_cert(theirs.ca_cert_path).subject == ours_cert.subject
    with pytest.raises(pki.PkiError, match="researcher/alice .* was not issued by"):
        pki.verify_chain(pki.load_cert(paths.cert), ours_cert)


def test_verify_chain_refuses_revoked_cert_when_given_a_crl(tmp_path: Path) -> None:
    """verify_chain with a RevocationList refuses a revoked certificate and accepts others."""
    factory = CertFactory(tmp_path)
    alice, bob = factory.issue("alice", "researcher"), factory.issue("bob", "researcher")
    factory.revoke("alice")
    ca_cert, crl = pki.load_cert(factory.ca_cert_path), factory.revocations()
    with pytest.raises(pki.PkiError, match="researcher/alice .* has been revoked"):
        pki.verify_chain(pki.load_cert(alice.cert), ca_cert, revocations=crl)
    assert pki.verify_chain(pki.load_cert(bob.cert), ca_cert, revocations=crl).name == "bob"


# --------------------------------------------------------------------------- job signatures


def test_signed_payload_verifies_and_tampering_is_refused(tmp_path: Path) -> None:
    """A payload signature verifies with the signer's cert, and not after the payload changes."""
    factory = CertFactory(tmp_path)
    alice = factory.issue("alice", "researcher")
    cert, key = pki.load_cert(alice.cert), pki.load_key(alice.key)
    payload = b'{"catalog": "dbs_outcomes", "nonce": "1"}'

    signature = pki.sign_payload(key, payload)

    pki.verify_payload(cert, payload, signature)
    with pytest.raises(
        pki.PkiError, match="signature does not match the payload for researcher/alice"
    ):
        pki.verify_payload(cert, payload.replace(b"1", b"2"), signature)
    with pytest.raises(pki.PkiError, match="signature does not match"):
        pki.verify_payload(cert, payload, b"\x30\x00")


def test_signature_from_another_key_is_refused(tmp_path: Path) -> None:
    """A payload signed by bob does not verify against alice's certificate."""
    factory = CertFactory(tmp_path)
    alice, bob = factory.issue("alice", "researcher"), factory.issue("bob", "researcher")
    payload = b"job"
    with pytest.raises(pki.PkiError, match="researcher/alice"):
        pki.verify_payload(
            pki.load_cert(alice.cert), payload, pki.sign_payload(pki.load_key(bob.key), payload)
        )


