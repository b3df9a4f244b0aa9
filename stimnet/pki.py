"""The federation PKI: one CA, certificates that carry an identity and a role, a CRL.

Identity and role travel in the certificate as a URI SAN ``stimnet://<role>/<name>``, so
the servicers take them from the TLS peer certificate and never from request fields.
The CA directory holds ``ca.crt``, ``ca.key``, ``crl.pem`` and ``index.json`` (the
registry of every certificate the CA has signed); see ``certs/README.md``.

Every failure is a :class:`PkiError` whose message names the file or identity at fault.
"""

from __future__ import annotations

import contextlib
import fcntl
import ipaddress
import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from urllib.parse import urlsplit

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

ROLES = ("node", "researcher", "admin")

URI_SCHEME = "stimnet"
CA_CERT = "ca.crt"
CA_KEY = "ca.key"
CRL_FILE = "crl.pem"
INDEX_FILE = "index.json"
_LOCK_FILE = ".lock"

# An offline CA cannot re-sign the CRL often; a month gives operators time to publish a
# fresh one (`stimctl certs refresh-crl`) before peers could start treating it as stale.
CRL_DAYS = 30
# Certificates start a few minutes in the past so that a peer whose clock runs slightly
# behind the CA's does not reject a certificate issued moments ago.
_BACKDATE = timedelta(minutes=5)
# A fixed prefix on everything sign_payload signs: the same key also authenticates TLS,
# and the prefix keeps a job signature from ever being valid for another protocol's bytes.
_SIGNING_CONTEXT = b"stimnet/v1 signed payload\x00"

_NAME_RE = re.compile(r"[a-z0-9][a-z0-9._-]{0,62}")
_DNS_LABEL_RE = re.compile(r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?")
_INDEX_VERSION = 1


class PkiError(Exception):
    """A certificate, key, CRL or CA directory problem, with a one-line message."""


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


@dataclass(frozen=True)
class IssuedCert:
    cert_path: Path
    key_path: Path
    serial: int


@dataclass(frozen=True)
class CertRecord:
    """One entry of the CA's registry of issued certificates."""

    name: str
    role: str
    serial: int
    hosts: tuple[str, ...]
    not_before: datetime
    not_after: datetime
    revoked: bool
    revoked_at: datetime | None = None


# --------------------------------------------------------------------------- validation


def check_name(name: str) -> str:
    """Return `name` if it is a valid identity name, else raise PkiError."""
    if not isinstance(name, str) or not _NAME_RE.fullmatch(name):
        raise PkiError(
            f"invalid identity name {name!r}: use 1-63 characters of a-z, 0-9, '.', '_', '-',"
            " starting with a letter or digit"
        )
    return name


def check_role(role: str) -> str:
    """Return `role` if it is one of ROLES, else raise PkiError."""
    if role not in ROLES:
        raise PkiError(f"unknown role {role!r} (expected one of {', '.join(ROLES)})")
    return role


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


def _fmt_time(when: datetime) -> str:
    return when.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _utcnow() -> datetime:
    # X.509 times have one-second resolution; truncating keeps the index equal to the cert.
    return datetime.now(UTC).replace(microsecond=0)


# --------------------------------------------------------------------------- file I/O


def _read_bytes(path: Path, what: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except FileNotFoundError:
        raise PkiError(f"{what} {path} does not exist") from None
    except IsADirectoryError:
        raise PkiError(f"{what} {path} is a directory, not a file") from None
    except OSError as exc:
        raise PkiError(f"cannot read {what} {path}: {exc.strerror or exc}") from None


def _write_new(path: Path, data: bytes, mode: int) -> None:
    """Create `path` with exactly `mode`; never replace an existing file."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    except FileExistsError:
        raise PkiError(f"refusing to overwrite existing {path}") from None
    except OSError as exc:
        raise PkiError(f"cannot create {path}: {exc.strerror or exc}") from None
    try:
        # The umask may have narrowed the mode; fchmod makes the file's mode exactly what
        # the caller asked for, which matters for readers that check key permissions.
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as out:
            out.write(data)
            out.flush()
            os.fsync(out.fileno())
    except OSError as exc:
        raise PkiError(f"cannot write {path}: {exc.strerror or exc}") from None


def _write_atomic(path: Path, data: bytes, mode: int = 0o644) -> None:
    """Replace `path` so that readers see either the old or the new content, never half."""
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    except OSError as exc:
        raise PkiError(f"cannot write {path}: {exc.strerror or exc}") from None
    try:
        with os.fdopen(fd, "wb") as out:
            os.fchmod(out.fileno(), mode)
            out.write(data)
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise PkiError(f"cannot write {path}: {exc.strerror or exc}") from None


@contextlib.contextmanager
def _ca_lock(ca_dir: Path) -> Iterator[None]:
    # Two operators (or two test workers) issuing at once must not lose each other's
    # index entries; the lock serialises read-modify-write of index.json and crl.pem.
    try:
        fd = os.open(ca_dir / _LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o600)
    except OSError as exc:
        raise PkiError(f"cannot lock CA directory {ca_dir}: {exc.strerror or exc}") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


# --------------------------------------------------------------------------- loading


def load_cert(path: Path) -> x509.Certificate:
    """Load a PEM or DER certificate from `path`."""
    path = Path(path)
    data = _read_bytes(path, "certificate")
    try:
        return _parse_cert(data)
    except ValueError as exc:
        raise PkiError(f"certificate {path} is not a valid PEM or DER certificate: {exc}") from None


def _parse_cert(data: bytes) -> x509.Certificate:
    if b"-----BEGIN" in data:
        return x509.load_pem_x509_certificate(data)
    return x509.load_der_x509_certificate(data)


def load_key(path: Path) -> ec.EllipticCurvePrivateKey:
    """Load an unencrypted PEM EC private key from `path`."""
    path = Path(path)
    data = _read_bytes(path, "private key")
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except TypeError:
        raise PkiError(
            f"private key {path} is encrypted; StimNet expects an unencrypted key"
        ) from None
    except ValueError as exc:
        raise PkiError(f"private key {path} is not a valid PEM private key: {exc}") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise PkiError(f"private key {path} is not an EC key (StimNet uses ECDSA P-256)")
    return key


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _cert_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _same_public_key(cert: x509.Certificate, key: ec.EllipticCurvePrivateKey) -> bool:
    fmt = (serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return cert.public_key().public_bytes(*fmt) == key.public_key().public_bytes(*fmt)


def _load_ca(ca_dir: Path) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    ca_dir = Path(ca_dir)
    if not (ca_dir / CA_CERT).exists():
        raise PkiError(f"no CA in {ca_dir}: {ca_dir / CA_CERT} does not exist (run init-ca first)")
    cert = load_cert(ca_dir / CA_CERT)
    key = load_key(ca_dir / CA_KEY)
    if not _same_public_key(cert, key):
        raise PkiError(f"CA key {ca_dir / CA_KEY} does not belong to {ca_dir / CA_CERT}")
    return cert, key


# --------------------------------------------------------------------------- index


def _read_index(ca_dir: Path) -> dict:
    path = Path(ca_dir) / INDEX_FILE
    raw = _read_bytes(path, "CA index")
    try:
        index = json.loads(raw)
        if index.get("version") != _INDEX_VERSION or not isinstance(index.get("certs"), list):
            raise ValueError(f"unsupported layout (version {index.get('version')!r})")
        for entry in index["certs"]:
            _record(entry)
    except (ValueError, TypeError, KeyError, AttributeError) as exc:
        raise PkiError(f"CA index {path} is corrupt: {exc}") from None
    return index


def _write_index(ca_dir: Path, index: dict) -> None:
    data = json.dumps(index, indent=2, sort_keys=True).encode() + b"\n"
    _write_atomic(Path(ca_dir) / INDEX_FILE, data, 0o600)


def _record(entry: dict) -> CertRecord:
    revoked_at = entry.get("revoked_at")
    return CertRecord(
        name=entry["name"],
        role=entry["role"],
        serial=int(entry["serial"]),
        hosts=tuple(entry.get("hosts", ())),
        not_before=datetime.fromisoformat(entry["not_before"]),
        not_after=datetime.fromisoformat(entry["not_after"]),
        revoked=revoked_at is not None,
        revoked_at=datetime.fromisoformat(revoked_at) if revoked_at else None,
    )


def _index_entry(cert: x509.Certificate, name: str, role: str, hosts: Iterable[str]) -> dict:
    return {
        # Serials are ~128-bit; stored as decimal strings so tools with float-only JSON
        # numbers (jq < 1.7, JavaScript) cannot silently round them.
        "serial": str(cert.serial_number),
        "name": name,
        "role": role,
        "hosts": list(hosts),
        "not_before": cert.not_valid_before_utc.isoformat(),
        "not_after": cert.not_valid_after_utc.isoformat(),
        "revoked_at": None,
    }


def list_certs(ca_dir: Path) -> list[CertRecord]:
    """Every certificate the CA in `ca_dir` has issued, oldest first."""
    _load_ca_cert_only(ca_dir)
    records = [_record(entry) for entry in _read_index(ca_dir)["certs"]]
    return sorted(records, key=lambda r: (r.not_before, r.name, r.serial))


def _load_ca_cert_only(ca_dir: Path) -> x509.Certificate:
    ca_dir = Path(ca_dir)
    if not (ca_dir / CA_CERT).exists():
        raise PkiError(f"no CA in {ca_dir}: {ca_dir / CA_CERT} does not exist (run init-ca first)")
    return load_cert(ca_dir / CA_CERT)


# --------------------------------------------------------------------------- CA


def init_ca(ca_dir: Path, *, common_name: str = "StimNet Federation CA", days: int = 3650) -> Path:
    """Create a new CA in `ca_dir` and return the path of its certificate."""
    ca_dir = Path(ca_dir)
    if days <= 0:
        raise PkiError(f"CA validity must be at least one day, got {days}")
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

    key = ec.generate_private_key(ec.SECP256R1())
    now = _utcnow()
    subject = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "StimNet"),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _BACKDATE)
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

    with _ca_lock(ca_dir):
        # The key first, with O_EXCL: if two init-ca race, exactly one wins the key and
        # the other stops before writing a certificate that would not match it.
        _write_new(ca_dir / CA_KEY, _key_pem(key), 0o600)
        _write_new(ca_dir / CA_CERT, _cert_pem(cert), 0o644)
        _write_new(
            ca_dir / INDEX_FILE,
            json.dumps({"version": _INDEX_VERSION, "crl_number": 0, "certs": []}, indent=2).encode()
            + b"\n",
            0o600,
        )
        _write_crl_locked(ca_dir, cert, key)
    return ca_dir / CA_CERT


def _write_crl_locked(
    ca_dir: Path,
    ca_cert: x509.Certificate,
    ca_key: ec.EllipticCurvePrivateKey,
    *,
    days: int = CRL_DAYS,
) -> Path:
    index = _read_index(ca_dir)
    number = int(index.get("crl_number", 0)) + 1
    now = _utcnow()
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
    _write_index(ca_dir, index)
    path = Path(ca_dir) / CRL_FILE
    _write_atomic(path, crl.public_bytes(serialization.Encoding.PEM), 0o644)
    return path


def refresh_crl(ca_dir: Path, *, days: int = CRL_DAYS) -> Path:
    """Re-sign crl.pem with a new next_update and CRL number; the revoked set is unchanged."""
    ca_dir = Path(ca_dir)
    ca_cert, ca_key = _load_ca(ca_dir)
    with _ca_lock(ca_dir):
        return _write_crl_locked(ca_dir, ca_cert, ca_key, days=days)


# --------------------------------------------------------------------------- issuing


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
    now = _utcnow()
    start = not_before if not_before is not None else now - _BACKDATE
    end = not_after if not_after is not None else now + timedelta(days=days)
    if start.tzinfo is None or end.tzinfo is None:
        raise PkiError("not_before/not_after must be timezone-aware datetimes")
    start, end = (
        start.astimezone(UTC).replace(microsecond=0),
        end.astimezone(UTC).replace(microsecond=0),
    )
    if end <= start:
        raise PkiError(f"validity ends ({_fmt_time(end)}) before it starts ({_fmt_time(start)})")
    if end > ca_cert.not_valid_after_utc:
        raise PkiError(
            f"requested validity ends {_fmt_time(end)}, after the CA certificate expires"
            f" ({_fmt_time(ca_cert.not_valid_after_utc)}); use fewer --days or a new CA"
        )
    return start, end


def _copy_ca_cert(ca_dir: Path, out_dir: Path) -> None:
    src, dst = Path(ca_dir) / CA_CERT, out_dir / CA_CERT
    if src.resolve() == dst.resolve():
        return
    if dst.exists():
        if _read_bytes(dst, "CA certificate") != _read_bytes(src, "CA certificate"):
            raise PkiError(f"{dst} exists and is not the certificate of the CA in {ca_dir}")
        return
    try:
        shutil.copyfile(src, dst)
    except OSError as exc:
        raise PkiError(f"cannot copy {src} to {dst}: {exc.strerror or exc}") from None


def _make_out_dir(out_dir: Path) -> Path:
    out_dir = Path(out_dir)
    try:
        # 0700 only when we create it: an existing directory's mode is its owner's choice.
        out_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as exc:
        raise PkiError(f"cannot create output directory {out_dir}: {exc.strerror or exc}") from None
    return out_dir


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

    ca_cert, ca_key = _load_ca(ca_dir)
    start, end = _validity(ca_cert, days, not_before, not_after)
    out_dir = _make_out_dir(out_dir)
    cert_path, key_path = out_dir / f"{name}.crt", out_dir / f"{name}.key"
    for path in (cert_path, key_path):
        if path.exists():
            raise PkiError(f"refusing to overwrite existing {path}")
    with _ca_lock(ca_dir):
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
    index = _read_index(ca_dir)
    index["certs"].append(_index_entry(cert, name, role, hosts))
    _write_index(ca_dir, index)
    cert_path, key_path = out_dir / f"{name}.crt", out_dir / f"{name}.key"
    _write_new(key_path, _key_pem(key), 0o600)
    _write_new(cert_path, _cert_pem(cert), 0o644)
    _copy_ca_cert(ca_dir, out_dir)
    return IssuedCert(cert_path=cert_path, key_path=key_path, serial=cert.serial_number)


# --------------------------------------------------------------------------- revocation


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
    ca_cert, ca_key = _load_ca(ca_dir)
    with _ca_lock(ca_dir):
        index = _read_index(ca_dir)
        serial = _parse_serial(serial_or_name)
        by_serial = [e for e in index["certs"] if serial is not None and int(e["serial"]) == serial]
        if by_serial and serial is not None:
            entry = by_serial[0]
            if entry.get("revoked_at"):
                raise PkiError(
                    f"certificate {serial_hex(serial)} ({entry['role']}/{entry['name']}) was"
                    f" already revoked at {entry['revoked_at']}"
                )
            targets = by_serial
        else:
            by_name = [e for e in index["certs"] if e["name"] == serial_or_name]
            if not by_name:
                raise PkiError(
                    f"no certificate with serial or name {serial_or_name!r}"
                    f" in {ca_dir / INDEX_FILE}"
                )
            targets = [e for e in by_name if not e.get("revoked_at")]
            if not targets:
                raise PkiError(f"every certificate named {serial_or_name!r} is already revoked")
        now = _utcnow().isoformat()
        for entry in targets:
            entry["revoked_at"] = now
        _write_index(ca_dir, index)
        _write_crl_locked(ca_dir, ca_cert, ca_key)
    return [int(e["serial"]) for e in targets]


def serial_hex(serial: int) -> str:
    """The display form of a serial, which revoke() also accepts."""
    return f"0x{serial:x}"


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
        data = _read_bytes(crl_path, "CRL")
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


# --------------------------------------------------------------------------- identity


def identity_from_cert(cert: x509.Certificate | bytes | str) -> Identity:
    """The identity a certificate (object, PEM or DER) carries in its stimnet:// URI SAN."""
    if isinstance(cert, str):
        cert = cert.encode()
    if isinstance(cert, bytes):
        try:
            cert = _parse_cert(cert)
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
    if not _NAME_RE.fullmatch(name):
        raise PkiError(f"certificate {serial} has an invalid identity name in {uris[0]!r}")
    return Identity(
        name=name, role=role, serial=cert.serial_number, not_after=cert.not_valid_after_utc
    )


def _label(cert: x509.Certificate) -> str:
    try:
        return f"{identity_from_cert(cert)} ({serial_hex(cert.serial_number)})"
    except PkiError:
        subject = cert.subject.rfc4514_string() or "<empty subject>"
        return f"{subject} ({serial_hex(cert.serial_number)})"


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
    label = _label(cert)
    try:
        cert.verify_directly_issued_by(ca_cert)
    except (ValueError, TypeError, InvalidSignature):
        raise PkiError(
            f"certificate for {label} was not issued by {ca_cert.subject.rfc4514_string()}"
        ) from None
    if now > ca_cert.not_valid_after_utc:
        raise PkiError(
            f"the federation CA certificate expired at {_fmt_time(ca_cert.not_valid_after_utc)}"
        )
    identity = identity_from_cert(cert)
    if now < cert.not_valid_before_utc:
        raise PkiError(
            f"certificate for {label} is not valid until {_fmt_time(cert.not_valid_before_utc)}"
        )
    if now > cert.not_valid_after_utc:
        raise PkiError(f"certificate for {label} expired at {_fmt_time(cert.not_valid_after_utc)}")
    if revocations is not None and revocations.is_revoked(cert.serial_number):
        raise PkiError(f"certificate for {label} has been revoked")
    return identity


# --------------------------------------------------------------------------- renewal


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
    ca_cert, ca_key = _load_ca(ca_dir)
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
    out_dir = _make_out_dir(out_dir if out_dir is not None else cert_path.parent)
    with _ca_lock(ca_dir):
        entry = next(
            (e for e in _read_index(ca_dir)["certs"] if int(e["serial"]) == old.serial_number), None
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


# --------------------------------------------------------------------------- job signing


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
        raise PkiError(f"certificate for {_label(cert)} does not hold an EC key")
    try:
        key.verify(bytes(signature), _SIGNING_CONTEXT + bytes(payload), ec.ECDSA(hashes.SHA256()))
    except (InvalidSignature, ValueError):
        raise PkiError(f"signature does not match the payload for {_label(cert)}") from None
