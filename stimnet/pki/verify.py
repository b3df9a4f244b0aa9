"""Checking a presented certificate against the federation CA, and signing or checking
a payload with a certificate's key (signed researcher jobs)."""

from __future__ import annotations

from datetime import UTC, datetime

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec

from stimnet.pki.crl import RevocationList
from stimnet.pki.identity import Identity, cert_label, identity_from_cert
from stimnet.pki.names import PkiError, fmt_time

# A fixed prefix on everything sign_payload signs: the same key also authenticates TLS,
# and the prefix keeps a job signature from ever being valid for another protocol's bytes.
_SIGNING_CONTEXT = b"stimnet/v1 signed payload\x00"


def verify_chain(
    cert: x509.Certificate,
    ca_cert: x509.Certificate,
    *,
    now: datetime | None = None,
    revocations: RevocationList | None = None,
) -> Identity:
    """Check `cert` was signed by `ca_cert`, is within its validity window and (if given)
    not revoked; return the identity it carries."""
    now = now or datetime.now(UTC)
    label = cert_label(cert)
    try:
        cert.verify_directly_issued_by(ca_cert)
    except (ValueError, TypeError, InvalidSignature):
        raise PkiError(
            f"certificate for {label} was not issued by {ca_cert.subject.rfc4514_string()}"
        ) from None
    if now > ca_cert.not_valid_after_utc:
        raise PkiError(
            f"the federation CA certificate expired at {fmt_time(ca_cert.not_valid_after_utc)}"
        )
    identity = identity_from_cert(cert)
    if now < cert.not_valid_before_utc:
        raise PkiError(
            f"certificate for {label} is not valid until {fmt_time(cert.not_valid_before_utc)}"
        )
    if now > cert.not_valid_after_utc:
        raise PkiError(f"certificate for {label} expired at {fmt_time(cert.not_valid_after_utc)}")
    if revocations is not None and revocations.is_revoked(cert.serial_number):
        raise PkiError(f"certificate for {label} has been revoked")
    return identity


def sign_payload(private_key: ec.EllipticCurvePrivateKey, payload: bytes) -> bytes:
    """An ECDSA-SHA256 signature (DER) over `payload`, for signed researcher jobs."""
    if not isinstance(private_key, ec.EllipticCurvePrivateKey):
        raise PkiError("signing key is not an EC private key (StimNet uses ECDSA P-256)")
    return private_key.sign(_SIGNING_CONTEXT + bytes(payload), ec.ECDSA(hashes.SHA256()))


def verify_payload(cert: x509.Certificate, payload: bytes, signature: bytes) -> None:
    """Raise PkiError unless `signature` is the certificate key's signature over `payload`.

    This checks the signature only; the caller checks the certificate with verify_chain.
    """
    key = cert.public_key()
    if not isinstance(key, ec.EllipticCurvePublicKey):
        raise PkiError(f"certificate for {cert_label(cert)} does not hold an EC key")
    try:
        key.verify(bytes(signature), _SIGNING_CONTEXT + bytes(payload), ec.ECDSA(hashes.SHA256()))
    except (InvalidSignature, ValueError):
        raise PkiError(f"signature does not match the payload for {cert_label(cert)}") from None
