"""The CA's registry of every certificate it has signed (``index.json``).

The registry is what lets an operator list certificates and revoke one by name; the CRL
is written from it.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from cryptography import x509

from stimnet.pki.files import INDEX_FILE, load_ca_cert, read_bytes, write_atomic
from stimnet.pki.names import PkiError

INDEX_VERSION = 1


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


def read_index(ca_dir: Path) -> dict:
    path = Path(ca_dir) / INDEX_FILE
    raw = read_bytes(path, "CA index")
    try:
        index = json.loads(raw)
        if index.get("version") != INDEX_VERSION or not isinstance(index.get("certs"), list):
            raise ValueError(f"unsupported layout (version {index.get('version')!r})")
        for entry in index["certs"]:
            _record(entry)
    except (ValueError, TypeError, KeyError, AttributeError) as exc:
        raise PkiError(f"CA index {path} is corrupt: {exc}") from None
    return index


def write_index(ca_dir: Path, index: dict) -> None:
    data = json.dumps(index, indent=2, sort_keys=True).encode() + b"\n"
    write_atomic(Path(ca_dir) / INDEX_FILE, data, 0o600)


def empty_index() -> bytes:
    """The registry of a CA that has signed nothing yet."""
    return json.dumps({"version": INDEX_VERSION, "crl_number": 0, "certs": []}, indent=2).encode() + b"\n"


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


def index_entry(cert: x509.Certificate, name: str, role: str, hosts: Iterable[str]) -> dict:
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
    load_ca_cert(ca_dir)
    records = [_record(entry) for entry in read_index(ca_dir)["certs"]]
    return sorted(records, key=lambda r: (r.not_before, r.name, r.serial))
