"""The CA directory and certificate files: reading, writing without tearing, locking.

A CA directory holds ``ca.crt``, ``ca.key``, ``crl.pem`` and ``index.json``; a directory
that receives an issued pair holds ``<name>.crt``, ``<name>.key`` and a copy of ``ca.crt``.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from stimnet.pki.names import PkiError

CA_CERT = "ca.crt"
CA_KEY = "ca.key"
CRL_FILE = "crl.pem"
INDEX_FILE = "index.json"
LOCK_FILE = ".lock"


def read_bytes(path: Path, what: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except FileNotFoundError:
        raise PkiError(f"{what} {path} does not exist") from None
    except IsADirectoryError:
        raise PkiError(f"{what} {path} is a directory, not a file") from None
    except OSError as exc:
        raise PkiError(f"cannot read {what} {path}: {exc.strerror or exc}") from None


def write_new(path: Path, data: bytes, mode: int) -> None:
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


def write_atomic(path: Path, data: bytes, mode: int = 0o644) -> None:
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
def ca_lock(ca_dir: Path) -> Iterator[None]:
    # Two operators (or two test workers) issuing at once must not lose each other's
    # index entries; the lock serialises read-modify-write of index.json and crl.pem.
    try:
        fd = os.open(ca_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o600)
    except OSError as exc:
        raise PkiError(f"cannot lock CA directory {ca_dir}: {exc.strerror or exc}") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def load_cert(path: Path) -> x509.Certificate:
    """Load a PEM or DER certificate from `path`."""
    path = Path(path)
    data = read_bytes(path, "certificate")
    try:
        return parse_cert(data)
    except ValueError as exc:
        raise PkiError(f"certificate {path} is not a valid PEM or DER certificate: {exc}") from None


def parse_cert(data: bytes) -> x509.Certificate:
    if b"-----BEGIN" in data:
        return x509.load_pem_x509_certificate(data)
    return x509.load_der_x509_certificate(data)


def load_key(path: Path) -> ec.EllipticCurvePrivateKey:
    """Load an unencrypted PEM EC private key from `path`."""
    path = Path(path)
    data = read_bytes(path, "private key")
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


def key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def cert_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _same_public_key(cert: x509.Certificate, key: ec.EllipticCurvePrivateKey) -> bool:
    fmt = (serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return cert.public_key().public_bytes(*fmt) == key.public_key().public_bytes(*fmt)


def load_ca(ca_dir: Path) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """The CA's certificate and the key that belongs to it."""
    cert = load_ca_cert(ca_dir)
    key = load_key(Path(ca_dir) / CA_KEY)
    if not _same_public_key(cert, key):
        raise PkiError(f"CA key {Path(ca_dir) / CA_KEY} does not belong to {Path(ca_dir) / CA_CERT}")
    return cert, key


def load_ca_cert(ca_dir: Path) -> x509.Certificate:
    ca_dir = Path(ca_dir)
    if not (ca_dir / CA_CERT).exists():
        raise PkiError(f"no CA in {ca_dir}: {ca_dir / CA_CERT} does not exist (run init-ca first)")
    return load_cert(ca_dir / CA_CERT)


def make_out_dir(out_dir: Path) -> Path:
    out_dir = Path(out_dir)
    try:
        # 0700 only when we create it: an existing directory's mode is its owner's choice.
        out_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as exc:
        raise PkiError(f"cannot create output directory {out_dir}: {exc.strerror or exc}") from None
    return out_dir


def copy_ca_cert(ca_dir: Path, out_dir: Path) -> None:
    src, dst = Path(ca_dir) / CA_CERT, out_dir / CA_CERT
    if src.resolve() == dst.resolve():
        return
    if dst.exists():
        if read_bytes(dst, "CA certificate") != read_bytes(src, "CA certificate"):
            raise PkiError(f"{dst} exists and is not the certificate of the CA in {ca_dir}")
        return
    try:
        shutil.copyfile(src, dst)
    except OSError as exc:
        raise PkiError(f"cannot copy {src} to {dst}: {exc.strerror or exc}") from None
