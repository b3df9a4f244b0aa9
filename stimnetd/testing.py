"""Test helpers shipped with the daemon, so integration tests elsewhere can build real PKIs.

Everything here writes real files under a directory the caller owns (a pytest tmp_path);
nothing is cached between instances.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from stimnetd import pki

# --------------------------------------------------------------------------- certificates


@dataclass(frozen=True)
class CertPaths:
    """The files a TLS peer needs: its certificate, its key and the CA to trust."""

    cert: Path
    key: Path
    ca: Path


class CertFactory:
    """A throw-away federation CA under `base_dir`, issuing certificates per identity."""

    def __init__(self, base_dir: Path, *, common_name: str = "StimNet Test CA") -> None:
        self.base_dir = Path(base_dir)
        self.ca_dir = self.base_dir / "ca"
        pki.init_ca(self.ca_dir, common_name=common_name)

    @property
    def ca_cert_path(self) -> Path:
        return self.ca_dir / pki.CA_CERT

    @property
    def crl_path(self) -> Path:
        return self.ca_dir / pki.CRL_FILE

    def issue(
        self,
        name: str,
        role: str,
        *,
        hosts: tuple[str, ...] = ("127.0.0.1", "localhost"),
        expired: bool = False,
        days: int = 30,
    ) -> CertPaths:
        """Issue into ``base_dir/<role>-<name>/`` (``<role>-<name>-expired/`` if expired).

        `hosts` apply to nodes only, so the default suits every role. An expired
        certificate ended a day ago, so a test can hold a valid and an expired one of the
        same identity side by side.
        """
        suffix = "-expired" if expired else ""
        out_dir = self.base_dir / f"{role}-{name}{suffix}"
        window: dict[str, datetime] = {}
        if expired:
            now = datetime.now(UTC)
            window = {
                "not_before": now - timedelta(days=days + 1),
                "not_after": now - timedelta(days=1),
            }
        issued = pki.issue(
            self.ca_dir,
            name,
            role,
            out_dir,
            hosts=hosts if role == "node" else (),
            days=days,
            **window,
        )
        return CertPaths(cert=issued.cert_path, key=issued.key_path, ca=out_dir / pki.CA_CERT)

    def revoke(self, name: str) -> list[int]:
        """Revoke every certificate of `name` and rewrite the CRL at `crl_path`."""
        return pki.revoke(self.ca_dir, name)

    def revocations(self) -> pki.RevocationList:
        """The current CRL, signature-checked."""
        return pki.RevocationList.load(self.crl_path, pki.load_cert(self.ca_cert_path))


def foreign(base_dir: Path) -> CertFactory:
    """An unrelated CA in ``base_dir/foreign`` for "wrong CA" tests.

    It uses the same common name as CertFactory's default, so a check that compared
    issuer names only, and not signatures, would wrongly accept its certificates.
    """
    return CertFactory(Path(base_dir) / "foreign")
