"""Creating the federation CA: its directory, key, self-signed certificate, empty
registry and first CRL."""

from __future__ import annotations

import os
from datetime import timedelta
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from stimnet.pki.crl import write_crl_locked
from stimnet.pki.files import CA_CERT, CA_KEY, CRL_FILE, INDEX_FILE, ca_lock, cert_pem, key_pem, write_new
from stimnet.pki.index import empty_index
from stimnet.pki.names import BACKDATE, PkiError, utcnow


def init_ca(ca_dir: Path, *, common_name: str = "StimNet Federation CA", days: int = 3650) -> Path:
    """Create a new CA in `ca_dir` and return the path of its certificate."""
    ca_dir = Path(ca_dir)
    if days <= 0:
        raise PkiError(f"CA validity must be at least one day, got {days}")
    _make_ca_dir(ca_dir)
    key = ec.generate_private_key(ec.SECP256R1())
    cert = _self_signed(key, common_name, days)
    with ca_lock(ca_dir):
        # The key first, with O_EXCL: if two init-ca race, exactly one wins the key and
        # the other stops before writing a certificate that would not match it.
        write_new(ca_dir / CA_KEY, key_pem(key), 0o600)
        write_new(ca_dir / CA_CERT, cert_pem(cert), 0o644)
        write_new(ca_dir / INDEX_FILE, empty_index(), 0o600)
        write_crl_locked(ca_dir, cert, key)
    return ca_dir / CA_CERT


def _make_ca_dir(ca_dir: Path) -> None:
    existing = [
        ca_dir / f for f in (CA_CERT, CA_KEY, CRL_FILE, INDEX_FILE) if (ca_dir / f).exists()
    ]
    if existing:
        raise PkiError(
            f"a CA already exists in {ca_dir} ({existing[0].name} present); refusing to overwrite"
        )
    try:
        if ca_dir.exists() and any(ca_dir.iterdir()):
            # Tightening the mode of a directory that holds other things (say, ".") would
            # surprise its owner; the CA gets a directory of its own.
            raise PkiError(f"CA directory {ca_dir} is not empty; use a new directory for the CA")
        ca_dir.mkdir(parents=True, exist_ok=True)
        os.chmod(ca_dir, 0o700)
    except OSError as exc:
        raise PkiError(f"cannot create CA directory {ca_dir}: {exc.strerror or exc}") from None


def _self_signed(key: ec.EllipticCurvePrivateKey, common_name: str, days: int) -> x509.Certificate:
    now = utcnow()
    subject = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "StimNet"),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - BACKDATE)
        .not_valid_after(now + timedelta(days=days))
        # path_length=0: the federation CA signs leaves only, never intermediate CAs.
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(ski, critical=False)
        .sign(key, hashes.SHA256())
    )
