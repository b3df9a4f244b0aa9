"""The node's own sections: who it is and where it listens ([node]), its TLS material and
front ([tls]) and its metrics endpoint ([metrics])."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from stimnet.pki import PkiError, check_name
from stimnetd.config.reader import Reader

TLS_TERMINATORS = ("stimnet", "grpc")


@dataclass(frozen=True)
class TlsConfig:
    ca: Path
    cert: Path
    key: Path
    crl: Path | None = None
    # Who terminates client TLS: "stimnet" (our TLS front: every caller gets a gRPC status
    # and an audit entry) or "grpc" (gRPC's own TLS: faster, but callers without a valid
    # certificate are cut off in the handshake, unaudited). See stimnetd/tlsfront.py.
    terminate: str = "stimnet"
    # The front's bounds on connections that have not finished their TLS handshake.
    handshake_timeout_s: float = 10.0
    max_handshakes: int = 256
    max_handshakes_per_host: int = 32
    # How long a connection over those bounds waits for a slot (as many may wait as
    # `max_handshakes`) before it is turned away with an alert the client names.
    handshake_wait_s: float = 10.0
    # Refused calls (unauthenticated, revoked, wrong role) audited one by one per source
    # per minute; the rest are counted into one entry (stimnetd/rpc/refusals.py).
    refusals_audited_per_minute: int = 20


@dataclass(frozen=True)
class NodeSettings:
    name: str
    host: str
    port: int
    advertise: str | None
    state_dir: Path
    k_min: int = 5
    grace_s: float = 10.0
    # Bounds how long a connection may live, so a revoked client cannot keep a channel.
    max_connection_age_s: float = 300.0
    # Finished jobs (their signed requests and answers) are deleted this long after they
    # finished; 0 keeps them forever. Releases, the ledger, cohorts and audit are kept.
    job_retention_days: float = 90.0
    # Queries one researcher may have running at once with this node as their entry (each
    # fans out to every site holding the catalog): a runaway notebook loop waits its turn.
    max_queries_per_researcher: int = 32
    # The admin identities (names in their `stimnet://admin/NAME` certificates) this node
    # obeys. An admin certificate is issued by the federation's CA, so it is valid at every
    # node: without this list one hospital's operator could approve scripts on another's
    # data. Empty: no admin is obeyed here.
    admins: tuple[str, ...] = ()


@dataclass(frozen=True)
class MetricsSettings:
    listen: str | None = None  # "127.0.0.1:9464"; None = off


def read_node(r: Reader, raw: dict[str, Any]) -> NodeSettings:
    w = "[node]"
    raw = r.table(raw, w, {"name", "listen", "advertise", "state_dir", "k_min",
                           "grace_s", "max_connection_age_s", "job_retention_days",
                           "max_queries_per_researcher", "admins"})
    name = r.get(raw, w, "name", str)
    try:
        check_name(name)
    except PkiError as exc:
        raise r.fail(f"{w}.name", str(exc)) from None
    host, port = r.address(r.get(raw, w, "listen", str), f"{w}.listen")
    # Without `advertise`, peers are told host:bound-port once the server listens.
    advertise = r.get(raw, w, "advertise", str, None) if "advertise" in raw else None
    if advertise is not None:
        r.address(advertise, f"{w}.advertise", allow_zero_port=False)
    k_min = r.get(raw, w, "k_min", int, 5)
    if not 1 <= k_min <= 1000:
        raise r.fail(f"{w}.k_min", f"must be between 1 and 1000, got {k_min}")
    grace = r.get(raw, w, "grace_s", float, 10.0)
    age = r.get(raw, w, "max_connection_age_s", float, 300.0)
    if grace <= 0 or age <= 0:
        raise r.fail(w, "grace_s and max_connection_age_s must be positive")
    retention = r.get(raw, w, "job_retention_days", float, 90.0)
    if retention < 0:
        raise r.fail(f"{w}.job_retention_days",
                     f"must be 0 (keep finished jobs forever) or more, got {retention:g}")
    admins = r.get(raw, w, "admins", list, [])
    for admin in admins:
        if not isinstance(admin, str):
            raise r.fail(f"{w}.admins", "must be a list of admin identity names (strings)")
        try:
            check_name(admin)
        except PkiError as exc:
            raise r.fail(f"{w}.admins", f"{admin!r}: {exc}") from None
    return NodeSettings(
        name=name, host=host, port=port, advertise=advertise, admins=tuple(admins),
        max_queries_per_researcher=r.limit(raw, w, "max_queries_per_researcher", 32),
        state_dir=r.path_of(r.get(raw, w, "state_dir", str, "state"), f"{w}.state_dir",
                            must_exist=False),
        k_min=k_min, grace_s=grace, max_connection_age_s=age, job_retention_days=retention,
    )


def read_tls(r: Reader, raw: dict[str, Any]) -> TlsConfig:
    w = "[tls]"
    raw = r.table(raw, w, {"ca", "cert", "key", "crl", "terminate", "handshake_timeout_s",
                           "handshake_wait_s", "max_handshakes", "max_handshakes_per_host",
                           "refusals_audited_per_minute"})
    crl = r.readable_file(raw, w, "crl") if "crl" in raw else None
    timeout = r.get(raw, w, "handshake_timeout_s", float, 10.0)
    if not 0.1 <= timeout <= 300:
        raise r.fail(f"{w}.handshake_timeout_s", "must be between 0.1 and 300 seconds")
    wait = r.get(raw, w, "handshake_wait_s", float, 10.0)
    if not 0 <= wait <= 300:
        raise r.fail(f"{w}.handshake_wait_s", "must be between 0 and 300 seconds")
    limits = {key: r.limit(raw, w, key, default)
              for key, default in (("max_handshakes", 256), ("max_handshakes_per_host", 32),
                                   ("refusals_audited_per_minute", 20))}
    return TlsConfig(ca=r.readable_file(raw, w, "ca"), cert=r.readable_file(raw, w, "cert"),
                     key=r.readable_file(raw, w, "key"), crl=crl,
                     terminate=r.get(raw, w, "terminate", str, "stimnet", choices=TLS_TERMINATORS),
                     handshake_timeout_s=timeout, handshake_wait_s=wait, **limits)


def read_metrics(r: Reader, raw: dict[str, Any]) -> MetricsSettings:
    w = "[metrics]"
    raw = r.table(raw, w, {"listen"})
    listen = r.get(raw, w, "listen", str, None) if "listen" in raw else None
    if listen is not None:
        r.address(listen, f"{w}.listen")
    return MetricsSettings(listen=listen)
