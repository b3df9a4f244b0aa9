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
    try:
        ca_pem = cfg.ca.read_bytes()
        cert_pem = cfg.cert.read_bytes()
        key_pem = cfg.key.read_bytes()
        ca_cert = load_cert(cfg.ca)
        identity = identity_from_cert(load_cert(cfg.cert))
        crl = RevocationList.load(cfg.crl, ca_cert) if cfg.crl else RevocationList.empty()
        if cfg.crl and crl.is_stale():
            # Still enforced (old revocations stay revoked); newer ones may be missing.
            log.warning("CRL is past its next update; fetch a fresh one from the CA operator",
                        crl=str(cfg.crl))
    except OSError as exc:
        raise TlsError(f"TLS file unreadable: {exc.filename}: {exc.strerror}") from None
    except PkiError as exc:
        raise TlsError(str(exc)) from None
    if b"PRIVATE KEY" not in key_pem:
        raise TlsError(f"TLS key {cfg.key} does not contain a PEM private key")
    return TlsMaterial(ca_pem, cert_pem, key_pem, identity, ca_cert, crl.revoked_serials)


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
