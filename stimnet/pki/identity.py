"""Who a certificate speaks for.

Identity and role travel in the certificate as a URI SAN ``stimnet://<role>/<name>``, so
the servicers take them from the TLS peer certificate and never from request fields.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from urllib.parse import urlsplit

from cryptography import x509

from stimnet.pki.files import parse_cert
from stimnet.pki.names import NAME_RE, ROLES, URI_SCHEME, PkiError, serial_hex


@dataclass(frozen=True)
class Identity:
    """Who a certificate speaks for: its name, its role, and until when."""

    name: str
    role: str
    serial: int
    not_after: datetime

    @property
    def uri(self) -> str:
        return f"{URI_SCHEME}://{self.role}/{self.name}"

    def __str__(self) -> str:
        return f"{self.role}/{self.name}"


def identity_from_cert(cert: x509.Certificate | bytes | str) -> Identity:
    """The identity a certificate (object, PEM or DER) carries in its stimnet:// URI SAN."""
    if isinstance(cert, str):
        cert = cert.encode()
    if isinstance(cert, bytes):
        try:
            cert = parse_cert(cert)
        except ValueError as exc:
            raise PkiError(f"not a valid PEM or DER certificate: {exc}") from None
    serial = serial_hex(cert.serial_number)
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        raise PkiError(
            f"certificate {serial} has no subjectAltName, so no StimNet identity"
        ) from None
    except ValueError as exc:
        raise PkiError(f"certificate {serial} has a malformed extension: {exc}") from None
    uris = [
        u
        for u in san.get_values_for_type(x509.UniformResourceIdentifier)
        if u.lower().startswith(f"{URI_SCHEME}:")
    ]
    if len(uris) != 1:
        found = "no" if not uris else f"{len(uris)}"
        raise PkiError(
            f"certificate {serial} has {found} {URI_SCHEME}:// URI SANs; expected exactly one"
        )
    parts = urlsplit(uris[0])
    role, name = parts.netloc, parts.path.removeprefix("/")
    if parts.scheme != URI_SCHEME or parts.query or parts.fragment or not name:
        raise PkiError(f"certificate {serial} has a malformed identity URI {uris[0]!r}")
    if role not in ROLES:
        raise PkiError(f"certificate {serial} has unknown role {role!r} in {uris[0]!r}")
    if not NAME_RE.fullmatch(name):
        raise PkiError(f"certificate {serial} has an invalid identity name in {uris[0]!r}")
    return Identity(
        name=name, role=role, serial=cert.serial_number, not_after=cert.not_valid_after_utc
    )


def cert_label(cert: x509.Certificate) -> str:
    """How error messages name a certificate: its identity if it has one, else its subject."""
    try:
        return f"{identity_from_cert(cert)} ({serial_hex(cert.serial_number)})"
    except PkiError:
        subject = cert.subject.rfc4514_string() or "<empty subject>"
        return f"{subject} ({serial_hex(cert.serial_number)})"
