"""TLS material for the server and for node-to-node channels, reloadable without restart.

The server uses gRPC's dynamic credentials: the fetcher runs at each new handshake and
hands over a new certificate once `reload()` has read one, so SIGHUP rotates the server
certificate for new connections while open ones finish (bounded by max connection age).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import grpc
import structlog
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from stimnet.pki import Identity, PkiError, RevocationList, identity_from_cert, load_cert
from stimnetd.config import TlsConfig

log = structlog.get_logger("stimnetd.tls")


class TlsError(Exception):
    pass


@dataclass(frozen=True)
class TlsMaterial:
    ca_pem: bytes
    cert_pem: bytes
    key_pem: bytes
    identity: Identity
    ca_cert: x509.Certificate
    revoked: frozenset[int]


def read_material(cfg: TlsConfig) -> TlsMaterial:
    """The node's TLS files, each checked for what it must be; a TlsError names the
    `[tls]` key and file at fault."""

    def where(key: str, path: Path | None) -> str:
        return f"[tls].{key} ({path})"

    try:
        ca_pem, cert_pem, key_pem = cfg.ca.read_bytes(), cfg.cert.read_bytes(), cfg.key.read_bytes()
    except OSError as exc:
        raise TlsError(f"TLS file unreadable: {exc.filename}: {exc.strerror}") from None
    try:
        ca_cert = load_cert(cfg.ca)
    except PkiError as exc:
        raise TlsError(f"{where('ca', cfg.ca)}: {exc}") from None
    if not _is_ca(ca_cert):
        raise TlsError(f"{where('ca', cfg.ca)}: not a CA certificate (use the federation's "
                       "ca.crt)")
    try:
        cert = load_cert(cfg.cert)
    except PkiError as exc:
        raise TlsError(f"{where('cert', cfg.cert)}: {exc}") from None
    if _is_ca(cert):
        raise TlsError(f"{where('cert', cfg.cert)}: is a CA certificate; the node's own "
                       "certificate (stimctl certs issue --role node) belongs here")
    try:
        identity = identity_from_cert(cert)
    except PkiError as exc:
        raise TlsError(f"{where('cert', cfg.cert)}: {exc}") from None
    if b"PRIVATE KEY" not in key_pem:
        raise TlsError(f"{where('key', cfg.key)}: does not contain a PEM private key")
    try:
        key = serialization.load_pem_private_key(key_pem, password=None)
    except (ValueError, TypeError) as exc:
        raise TlsError(f"{where('key', cfg.key)}: not a usable unencrypted private key "
                       f"({str(exc).splitlines()[0] if str(exc) else type(exc).__name__})"
                       ) from None
    if _public_der(key.public_key()) != _public_der(cert.public_key()):
        raise TlsError(f"{where('key', cfg.key)}: does not belong to the certificate "
                       f"{cfg.cert} (another key pair; renewing replaces both files)")
    try:
        crl = RevocationList.load(cfg.crl, ca_cert) if cfg.crl else RevocationList.empty()
    except OSError as exc:
        raise TlsError(f"TLS file unreadable: {exc.filename}: {exc.strerror}") from None
    except PkiError as exc:
        raise TlsError(f"{where('crl', cfg.crl)}: {exc}") from None
    if cfg.crl and crl.is_stale():
        # Still enforced (old revocations stay revoked); newer ones may be missing.
        log.warning("CRL is past its next update; fetch a fresh one from the CA operator",
                    crl=str(cfg.crl))
    return TlsMaterial(ca_pem, cert_pem, key_pem, identity, ca_cert, crl.revoked_serials)


def _is_ca(cert: x509.Certificate) -> bool:
    try:
        return bool(cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca)
    except (x509.ExtensionNotFound, ValueError):
        return False


def _public_der(key: object) -> bytes:
    return key.public_bytes(serialization.Encoding.DER,  # type: ignore[attr-defined]
                            serialization.PublicFormat.SubjectPublicKeyInfo)


class ServerTls:
    def __init__(self, cfg: TlsConfig) -> None:
        self._cfg = cfg
        self.material = read_material(cfg)
        self._pending: grpc.ServerCertificateConfiguration | None = None
        self._lock = threading.Lock()

    def credentials(self) -> grpc.ServerCredentials:
        # Only with `[tls] terminate = "grpc"` (by default tlsfront.py terminates TLS).
        # gRPC Python offers only "require and verify" or "don't request" for client
        # certificates, so a caller without a valid federation certificate is refused by
        # the TLS handshake itself, before any RPC exists to audit.
        return grpc.dynamic_ssl_server_credentials(
            self._config(self.material), self._fetch, require_client_authentication=True)

    @staticmethod
    def _config(m: TlsMaterial) -> grpc.ServerCertificateConfiguration:
        return grpc.ssl_server_certificate_configuration([(m.key_pem, m.cert_pem)],
                                                         root_certificates=m.ca_pem)

    def _fetch(self) -> grpc.ServerCertificateConfiguration | None:
        # Called by gRPC core on a handshake thread; None means "keep the current one".
        with self._lock:
            pending, self._pending = self._pending, None
        return pending

    def reload(self) -> TlsMaterial:
        material = read_material(self._cfg)
        if material.identity.name != self.material.identity.name:
            raise TlsError(f"new certificate is for {material.identity}, not "
                           f"{self.material.identity}; refusing to switch identity")
        with self._lock:
            self._pending = self._config(material)
        self.material = material
        log.info("tls reloaded", serial=f"{material.identity.serial:x}",
                 revoked=len(material.revoked))
        return material

    def days_left(self, now: datetime | None = None) -> float:
        now = now or datetime.now(UTC)
        return (self.material.identity.not_after - now).total_seconds() / 86400


def channel_credentials(m: TlsMaterial) -> grpc.ChannelCredentials:
    return grpc.ssl_channel_credentials(root_certificates=m.ca_pem, private_key=m.key_pem,
                                        certificate_chain=m.cert_pem)


def read_pem(path: Path) -> bytes:
    return path.read_bytes()
