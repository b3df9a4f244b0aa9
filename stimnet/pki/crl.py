"""Revocation: marking certificates revoked, signing the CRL, and reading a CRL back.

The CA writes ``crl.pem`` from its registry; peers load it as a :class:`RevocationList`
after checking that the federation CA signed it.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from stimnet.pki.files import CRL_FILE, INDEX_FILE, ca_lock, load_ca, read_bytes, write_atomic
from stimnet.pki.index import read_index, write_index
from stimnet.pki.names import PkiError, serial_hex, utcnow

# An offline CA cannot re-sign the CRL often; a month gives operators time to publish a
# fresh one (`stimctl certs refresh-crl`) before peers could start treating it as stale.
CRL_DAYS = 30


def write_crl_locked(
    ca_dir: Path,
    ca_cert: x509.Certificate,
    ca_key: ec.EllipticCurvePrivateKey,
    *,
    days: int = CRL_DAYS,
) -> Path:
    """Sign a CRL listing every revoked entry of the registry; the caller holds ca_lock."""
    index = read_index(ca_dir)
    number = int(index.get("crl_number", 0)) + 1
    now = utcnow()
    next_update = min(now + timedelta(days=days), ca_cert.not_valid_after_utc)
    builder = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(ca_cert.subject)
        .last_update(now)
        .next_update(next_update)
        .add_extension(x509.CRLNumber(number), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
        )
    )
    # Expired entries stay listed: a peer with a wrong clock must still refuse them.
    for entry in index["certs"]:
        if entry.get("revoked_at"):
            builder = builder.add_revoked_certificate(
                x509.RevokedCertificateBuilder()
                .serial_number(int(entry["serial"]))
                .revocation_date(datetime.fromisoformat(entry["revoked_at"]))
                .build()
            )
    crl = builder.sign(ca_key, hashes.SHA256())
    index["crl_number"] = number
    # Index before CRL: if we stop between the two, the next CRL still lists the revocation.
    write_index(ca_dir, index)
    path = Path(ca_dir) / CRL_FILE
    write_atomic(path, crl.public_bytes(serialization.Encoding.PEM), 0o644)
    return path


def refresh_crl(ca_dir: Path, *, days: int = CRL_DAYS) -> Path:
    """Re-sign crl.pem with a new next_update and CRL number; the revoked set is unchanged."""
    ca_dir = Path(ca_dir)
    ca_cert, ca_key = load_ca(ca_dir)
    with ca_lock(ca_dir):
        return write_crl_locked(ca_dir, ca_cert, ca_key, days=days)


def _parse_serial(text: str) -> int | None:
    text = text.strip()
    try:
        if text.lower().startswith("0x"):
            return int(text[2:], 16)
        if ":" in text:
            return int(text.replace(":", ""), 16)
        if text.isdigit():
            return int(text, 10)
        return int(text, 16)
    except ValueError:
        return None


def revoke(ca_dir: Path, serial_or_name: str) -> list[int]:
    """Revoke by serial (decimal, 0x-hex or colon hex) or by name (every live cert of it).

    Returns the serials revoked by this call and rewrites crl.pem.
    """
    ca_dir = Path(ca_dir)
    ca_cert, ca_key = load_ca(ca_dir)
    with ca_lock(ca_dir):
        index = read_index(ca_dir)
        targets = _revocation_targets(ca_dir, index["certs"], serial_or_name)
        now = utcnow().isoformat()
        for entry in targets:
            entry["revoked_at"] = now
        write_index(ca_dir, index)
        write_crl_locked(ca_dir, ca_cert, ca_key)
    return [int(e["serial"]) for e in targets]


def _revocation_targets(ca_dir: Path, certs: list[dict], serial_or_name: str) -> list[dict]:
    serial = _parse_serial(serial_or_name)
    by_serial = [e for e in certs if serial is not None and int(e["serial"]) == serial]
    if by_serial and serial is not None:
        entry = by_serial[0]
        if entry.get("revoked_at"):
            raise PkiError(
                f"certificate {serial_hex(serial)} ({entry['role']}/{entry['name']}) was"
                f" already revoked at {entry['revoked_at']}"
            )
        return by_serial
    by_name = [e for e in certs if e["name"] == serial_or_name]
    if not by_name:
        raise PkiError(
            f"no certificate with serial or name {serial_or_name!r}"
            f" in {ca_dir / INDEX_FILE}"
        )
    targets = [e for e in by_name if not e.get("revoked_at")]
    if not targets:
        raise PkiError(f"every certificate named {serial_or_name!r} is already revoked")
    return targets


@dataclass(frozen=True)
class RevocationList:
    """The set of revoked serials from a CRL whose signature has been checked."""

    revoked_serials: frozenset[int]
    last_update: datetime | None = None
    next_update: datetime | None = None
    number: int | None = None

    @classmethod
    def empty(cls) -> RevocationList:
        return cls(frozenset())

    @classmethod
    def load(cls, crl_path: Path, ca_cert: x509.Certificate) -> RevocationList:
        crl_path = Path(crl_path)
        data = read_bytes(crl_path, "CRL")
        try:
            if b"-----BEGIN" in data:
                crl = x509.load_pem_x509_crl(data)
            else:
                crl = x509.load_der_x509_crl(data)
        except ValueError as exc:
            raise PkiError(f"CRL {crl_path} is not a valid PEM or DER CRL: {exc}") from None
        if crl.issuer != ca_cert.subject:
            raise PkiError(
                f"CRL {crl_path} was issued by {crl.issuer.rfc4514_string()},"
                f" not by the CA {ca_cert.subject.rfc4514_string()}"
            )
        try:
            valid = crl.is_signature_valid(ca_cert.public_key())  # type: ignore[arg-type]
        except TypeError:
            valid = False
        if not valid:
            raise PkiError(f"CRL {crl_path} has a bad signature: not signed by the federation CA")
        try:
            number = crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number
        except x509.ExtensionNotFound:
            number = None
        return cls(
            revoked_serials=frozenset(r.serial_number for r in crl),
            last_update=crl.last_update_utc,
            next_update=crl.next_update_utc,
            number=number,
        )

    def is_revoked(self, serial: int) -> bool:
        return serial in self.revoked_serials

    def is_stale(self, now: datetime | None = None) -> bool:
        """True once the CRL's next_update has passed (its issuer promised a newer one)."""
        now = now or datetime.now(UTC)
        return self.next_update is not None and now > self.next_update
