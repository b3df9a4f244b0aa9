"""Issuing and renewing leaf certificates for nodes, researchers and admins.

Each issued pair is registered in the CA's index before its files are written, so every
certificate the CA signed can be listed and revoked by name.
"""

from __future__ import annotations

import ipaddress
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from stimnet.pki.files import (
    ca_lock,
    cert_pem,
    copy_ca_cert,
    key_pem,
    load_ca,
    load_cert,
    make_out_dir,
    write_new,
)
from stimnet.pki.identity import identity_from_cert
from stimnet.pki.index import index_entry, read_index, write_index
from stimnet.pki.names import (
    BACKDATE,
    URI_SCHEME,
    PkiError,
    check_name,
    check_role,
    fmt_time,
    serial_hex,
    utcnow,
)

_DNS_LABEL_RE = re.compile(r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?")


@dataclass(frozen=True)
class IssuedCert:
    cert_path: Path
    key_path: Path
    serial: int


def _host_san(host: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        pass
    dns = host.lower().rstrip(".")
    labels = dns.split(".")
    # Wildcards are refused: a node certificate names the hosts of exactly one node.
    if not dns or len(dns) > 253 or not all(_DNS_LABEL_RE.fullmatch(label) for label in labels):
        raise PkiError(f"invalid host {host!r}: expected an IP address or a DNS name")
    return x509.DNSName(dns)


def _build_leaf(
    ca_cert: x509.Certificate,
    ca_key: ec.EllipticCurvePrivateKey,
    key: ec.EllipticCurvePrivateKey,
    name: str,
    role: str,
    hosts: tuple[str, ...],
    not_before: datetime,
    not_after: datetime,
) -> x509.Certificate:
    sans: list[x509.GeneralName] = [x509.UniformResourceIdentifier(f"{URI_SCHEME}://{role}/{name}")]
    sans += [_host_san(h) for h in hosts]
    # Nodes both serve and call each other; users only ever call.
    usages = [ExtendedKeyUsageOID.CLIENT_AUTH]
    if role == "node":
        usages.insert(0, ExtendedKeyUsageOID.SERVER_AUTH)
    ca_ski = ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    return (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )


def _validity(
    ca_cert: x509.Certificate,
    days: int,
    not_before: datetime | None,
    not_after: datetime | None,
) -> tuple[datetime, datetime]:
    now = utcnow()
    start = not_before if not_before is not None else now - BACKDATE
    end = not_after if not_after is not None else now + timedelta(days=days)
    if start.tzinfo is None or end.tzinfo is None:
        raise PkiError("not_before/not_after must be timezone-aware datetimes")
    start, end = (
        start.astimezone(UTC).replace(microsecond=0),
        end.astimezone(UTC).replace(microsecond=0),
    )
    if end <= start:
        raise PkiError(f"validity ends ({fmt_time(end)}) before it starts ({fmt_time(start)})")
    if end > ca_cert.not_valid_after_utc:
        raise PkiError(
            f"requested validity ends {fmt_time(end)}, after the CA certificate expires"
            f" ({fmt_time(ca_cert.not_valid_after_utc)}); use fewer --days or a new CA"
        )
    return start, end


def issue(
    ca_dir: Path,
    name: str,
    role: str,
    out_dir: Path,
    *,
    hosts: Iterable[str] = (),
    days: int = 397,
    not_before: datetime | None = None,
    not_after: datetime | None = None,
) -> IssuedCert:
    """Generate a key and a certificate for `role`/`name`, signed by the CA in `ca_dir`.

    Writes ``out_dir/<name>.crt``, ``out_dir/<name>.key`` (0600) and ``out_dir/ca.crt``.
    """
    ca_dir = Path(ca_dir)
    check_name(name)
    check_role(role)
    hosts = tuple(hosts)
    if role == "node" and not hosts:
        raise PkiError(f"node certificate for {name!r} needs at least one host (--host)")
    if role != "node" and hosts:
        raise PkiError(f"only node certificates carry hosts; {role} {name!r} was given {hosts}")
    for host in hosts:
        _host_san(host)
    if days <= 0 and not_after is None:
        raise PkiError(f"certificate validity must be at least one day, got {days}")

    ca_cert, ca_key = load_ca(ca_dir)
    start, end = _validity(ca_cert, days, not_before, not_after)
    out_dir = make_out_dir(out_dir)
    cert_path, key_path = out_dir / f"{name}.crt", out_dir / f"{name}.key"
    for path in (cert_path, key_path):
        if path.exists():
            raise PkiError(f"refusing to overwrite existing {path}")
    with ca_lock(ca_dir):
        return _issue_locked(ca_dir, ca_cert, ca_key, name, role, hosts, start, end, out_dir)


def _issue_locked(
    ca_dir: Path,
    ca_cert: x509.Certificate,
    ca_key: ec.EllipticCurvePrivateKey,
    name: str,
    role: str,
    hosts: tuple[str, ...],
    start: datetime,
    end: datetime,
    out_dir: Path,
) -> IssuedCert:
    key = ec.generate_private_key(ec.SECP256R1())
    cert = _build_leaf(ca_cert, ca_key, key, name, role, hosts, start, end)
    # Registered before the files are written: a certificate the CA signed but cannot
    # list (and so cannot revoke by name) is worse than an entry whose files never landed.
    index = read_index(ca_dir)
    index["certs"].append(index_entry(cert, name, role, hosts))
    write_index(ca_dir, index)
    cert_path, key_path = out_dir / f"{name}.crt", out_dir / f"{name}.key"
    write_new(key_path, key_pem(key), 0o600)
    write_new(cert_path, cert_pem(cert), 0o644)
    copy_ca_cert(ca_dir, out_dir)
    return IssuedCert(cert_path=cert_path, key_path=key_path, serial=cert.serial_number)


def _hosts_of(cert: x509.Certificate) -> tuple[str, ...]:
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return ()
    hosts = list(san.get_values_for_type(x509.DNSName))
    hosts += [str(ip) for ip in san.get_values_for_type(x509.IPAddress)]
    return tuple(hosts)


def _backup(path: Path, serial: int) -> None:
    target = path.with_name(f"{path.name}.bak-{serial_hex(serial)}")
    if target.exists():
        raise PkiError(f"refusing to renew: backup {target} already exists")
    try:
        os.rename(path, target)
    except OSError as exc:
        raise PkiError(f"cannot move {path} to {target}: {exc.strerror or exc}") from None


def renew(
    ca_dir: Path, cert_path: Path, out_dir: Path | None = None, days: int = 397
) -> IssuedCert:
    """Issue a new key and certificate with the same name, role and hosts as `cert_path`.

    An existing ``<name>.crt``/``<name>.key`` in the output directory is moved to
    ``<name>.crt.bak-<serial>``/``<name>.key.bak-<serial>`` first. The old certificate is
    not revoked, so running peers keep working until they pick up the new pair.
    """
    ca_dir, cert_path = Path(ca_dir), Path(cert_path)
    ca_cert, ca_key = load_ca(ca_dir)
    old = load_cert(cert_path)
    try:
        old.verify_directly_issued_by(ca_cert)
    except (ValueError, TypeError, InvalidSignature):
        raise PkiError(
            f"{cert_path} was not issued by the CA in {ca_dir}; cannot renew it"
        ) from None
    identity = identity_from_cert(old)
    if days <= 0:
        raise PkiError(f"certificate validity must be at least one day, got {days}")
    start, end = _validity(ca_cert, days, None, None)
    out_dir = make_out_dir(out_dir if out_dir is not None else cert_path.parent)
    with ca_lock(ca_dir):
        entry = next(
            (e for e in read_index(ca_dir)["certs"] if int(e["serial"]) == old.serial_number), None
        )
        if entry is not None and entry.get("revoked_at"):
            raise PkiError(
                f"certificate for {identity} ({serial_hex(old.serial_number)}) is revoked;"
                " issue a new one deliberately instead of renewing it"
            )
        # The index keeps the hosts in the order the operator gave them; the SAN is the
        # fallback for a certificate whose index entry was lost.
        hosts = tuple(entry["hosts"]) if entry is not None else _hosts_of(old)
        cert_out, key_out = out_dir / f"{identity.name}.crt", out_dir / f"{identity.name}.key"
        current = old.serial_number
        if cert_out.exists():
            current = load_cert(cert_out).serial_number
        for path in (cert_out, key_out):
            if path.exists():
                _backup(path, current)
        return _issue_locked(
            ca_dir, ca_cert, ca_key, identity.name, identity.role, hosts, start, end, out_dir
        )
