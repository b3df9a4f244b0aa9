"""Signed researcher jobs: what the researcher's key commits to, and how every site checks it.

The payload is canonical JSON (sorted keys, no whitespace, UTF-8) so that the bytes the
researcher signed are the bytes every site verifies — an entry node relays them untouched
and can neither forge a job nor alter one (spec, epsilon, catalog, scope) without breaking
the signature. Freshness (issued_at within a window) plus a per-site nonce memory refuse
replays. The payload names the entry node the researcher chose (`entry`): a site answers a
relayed job only from that node, so another node that sees the job (a peer it was relayed
to) cannot take it elsewhere — to collect a site's answer the entry never asked for, or to
spend the researcher's budget there first and have the real request refused as a replay.
"""

from __future__ import annotations

import functools
import hashlib
import json
import secrets
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from cryptography import x509

from stimnet import pki
from stimnet.errors import InvalidRequest, Unauthenticated
from stimnet.numbers import finite_number

if TYPE_CHECKING:
    from stimnet.query.spec import QuerySpec

# 2: `entry` (the node the researcher submits to) is signed too.
PAYLOAD_VERSION = 2
MAX_NODE_NAME = 255
KINDS = ("query", "script")
SCOPES = ("local", "federated")
MAX_PAYLOAD = 256 * 1024
MAX_SCRIPT = 1024 * 1024


@dataclass(frozen=True)
class JobRequest:
    """The signed content of a job. `spec` is a QuerySpec dict: a query's, or the outputs a
    script job declares (aggregates and GROUP BY; see jobs/scripts.py)."""

    kind: str
    catalog: str
    scope: str = "local"
    spec: dict[str, Any] | None = None
    script_sha256: str = ""
    epsilon: float | None = None
    min_sites: int = 1
    issued_at: float = 0.0
    nonce: str = ""
    entry: str = ""  # the node's name (its certificate's) the researcher submits the job to
    v: int = PAYLOAD_VERSION
    extra: dict[str, Any] = field(default_factory=dict)

    def to_payload(self) -> bytes:
        doc = {"v": self.v, "kind": self.kind, "catalog": self.catalog, "scope": self.scope,
               "spec": self.spec, "script_sha256": self.script_sha256, "epsilon": self.epsilon,
               "min_sites": self.min_sites, "issued_at": self.issued_at, "nonce": self.nonce,
               "entry": self.entry}
        return canonical(doc)

    @functools.cached_property
    def job_id(self) -> str:
        """Derived from the signed nonce, so every site names the same job the same way."""
        return hashlib.sha256(f"{self.nonce}".encode()).hexdigest()[:24]

    @functools.cached_property
    def query_spec(self) -> QuerySpec:
        """`spec` as a QuerySpec, parsed once: the entry reads it to fan out, to compute its
        own share and to finish (raises QueryError if it is not one)."""
        from stimnet.query.spec import QuerySpec

        return QuerySpec.from_dict(self.spec)

    @classmethod
    def from_payload(cls, payload: bytes) -> JobRequest:
        if len(payload) > MAX_PAYLOAD:
            raise InvalidRequest(f"signed job payload is {len(payload)} bytes; limit {MAX_PAYLOAD}")
        try:
            doc = json.loads(payload, parse_constant=_no_constant)
        except RecursionError:
            raise InvalidRequest("signed job payload nests too deeply to read") from None
        except ValueError as exc:  # not JSON, not UTF-8, NaN, an integer of 4,300+ digits
            raise InvalidRequest(f"signed job payload is not JSON: {exc}") from None
        if not isinstance(doc, dict):
            raise InvalidRequest("signed job payload must be a JSON object")
        try:
            same = canonical(doc) == payload
        except ValueError:  # a number past float range (1e999) reads as infinity
            raise InvalidRequest("signed job payload holds a number out of float range") from None
        if not same:
            raise InvalidRequest("signed job payload is not in canonical form")
        if doc.get("v") != PAYLOAD_VERSION:
            # Refused before its keys are read: another version's fields may mean other things.
            raise InvalidRequest(f"signed job version {doc.get('v')!r} is not supported (this "
                                 f"node accepts version {PAYLOAD_VERSION}, which names the entry "
                                 "node: update stimctl)")
        expected = {"v", "kind", "catalog", "scope", "spec", "script_sha256", "epsilon",
                    "min_sites", "issued_at", "nonce", "entry"}
        if set(doc) != expected:
            raise InvalidRequest(f"signed job payload keys differ from {sorted(expected)}")
        req = cls(kind=doc["kind"], catalog=doc["catalog"], scope=doc["scope"], spec=doc["spec"],
                  script_sha256=doc["script_sha256"], epsilon=doc["epsilon"],
                  min_sites=doc["min_sites"], issued_at=doc["issued_at"], nonce=doc["nonce"],
                  entry=doc["entry"])
        req.validate()
        return req

    def validate(self) -> None:
        if self.kind not in KINDS:
            raise InvalidRequest(f"job kind {self.kind!r} is not one of {', '.join(KINDS)}")
        if self.scope not in SCOPES:
            raise InvalidRequest(f"job scope {self.scope!r} is not one of {', '.join(SCOPES)}")
        if not isinstance(self.catalog, str) or not self.catalog:
            raise InvalidRequest("job names no catalog")
        if self.kind == "query" and not isinstance(self.spec, dict):
            raise InvalidRequest("a query job needs a spec")
        if not isinstance(self.script_sha256, str):
            raise InvalidRequest("script_sha256 must be a string (the script's SHA-256 in hex, "
                                 f"or empty for a query job), not {_json_type(self.script_sha256)}")
        if self.kind == "script" and len(self.script_sha256) != 64:
            raise InvalidRequest("a script job needs the script's SHA-256 (script_sha256)")
        if self.kind == "query" and self.script_sha256:
            raise InvalidRequest("script_sha256 must be empty for a query job")
        if self.kind == "script" and self.spec is not None and not isinstance(self.spec, dict):
            raise InvalidRequest("a script job's declared outputs (spec) must be an object")
        if self.epsilon is not None and not finite_number(self.epsilon):
            raise InvalidRequest("epsilon must be a finite number")
        if not isinstance(self.min_sites, int) or isinstance(self.min_sites, bool) \
                or not 1 <= self.min_sites <= 1000:
            raise InvalidRequest("min_sites must be an integer between 1 and 1000")
        if not isinstance(self.nonce, str) or not 16 <= len(self.nonce) <= 64:
            raise InvalidRequest("nonce must be 16-64 characters")
        if not finite_number(self.issued_at):
            raise InvalidRequest("issued_at must be unix seconds")
        if not isinstance(self.entry, str) or not 0 < len(self.entry) <= MAX_NODE_NAME:
            raise InvalidRequest("a job names its entry node (the node it is submitted to), "
                                 f"1-{MAX_NODE_NAME} characters")


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    return "an array" if isinstance(value, list) else "an object"


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def canonical(doc: Any) -> bytes:
    return json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=False,
                      allow_nan=False).encode()


def new_request(kind: str, catalog: str, *, entry: str, scope: str = "local",
                spec: dict[str, Any] | None = None, script: bytes | None = None,
                epsilon: float | None = None, min_sites: int = 1,
                now: float | None = None) -> JobRequest:
    """`entry`: the name of the node the job will be submitted to (NodeInfo.name)."""
    req = JobRequest(kind=kind, catalog=catalog, scope=scope, spec=spec,
                     script_sha256=hashlib.sha256(script).hexdigest() if script is not None else "",
                     epsilon=epsilon, min_sites=min_sites,
                     issued_at=round(time.time() if now is None else now, 3),
                     nonce=secrets.token_hex(16), entry=entry)
    req.validate()
    return req


@dataclass(frozen=True)
class SignedJob:
    payload: bytes
    signature: bytes
    signer_cert_pem: bytes
    script: bytes = b""


@functools.lru_cache(maxsize=8)
def _private_key(key_pem: bytes) -> Any:
    # Parsing a PEM key costs more than the signature; a client signs many jobs with one.
    from cryptography.hazmat.primitives.serialization import load_pem_private_key

    return load_pem_private_key(key_pem, password=None)


def sign(req: JobRequest, key_pem: bytes, cert_pem: bytes, script: bytes | None = None) -> SignedJob:
    key = _private_key(key_pem)
    payload = req.to_payload()
    return SignedJob(payload, pki.sign_payload(key, payload), cert_pem, script or b"")


@dataclass(frozen=True)
class VerifiedJob:
    request: JobRequest
    researcher: pki.Identity
    signed: SignedJob


def verify(signed: SignedJob, *, ca_cert: x509.Certificate, revoked: frozenset[int],
           max_age_s: float, now: float | None = None,
           chains: dict[bytes, tuple[x509.Certificate, pki.Identity]] | None = None
           ) -> VerifiedJob:
    """Checks signature, chain, revocation, role and freshness. Replay is the store's job.

    `chains` caches certificates whose CA signature was verified (the caller clears it
    when the CA changes); expiry and revocation are checked on every job regardless.
    """
    now = time.time() if now is None else now
    hit = chains.get(signed.signer_cert_pem) if chains is not None else None
    if hit is not None:
        cert, ident = hit
        if ident.not_after.timestamp() < now:
            raise Unauthenticated(f"signed job's certificate {ident} expired at "
                                  f"{ident.not_after:%Y-%m-%d %H:%M} UTC")
    else:
        try:
            cert = x509.load_pem_x509_certificate(signed.signer_cert_pem)
        except ValueError:
            raise Unauthenticated("signed job carries no valid signer certificate") from None
        try:
            ident = pki.verify_chain(cert, ca_cert)
        except pki.PkiError as exc:
            raise Unauthenticated(f"signed job's certificate is not acceptable: {exc}") from None
        if chains is not None:
            if len(chains) > 1024:
                chains.clear()
            chains[signed.signer_cert_pem] = (cert, ident)
    if ident.serial in revoked:
        raise Unauthenticated(f"signed job's certificate {ident} has been revoked")
    if ident.role != "researcher":
        raise Unauthenticated(f"jobs must be signed by a researcher, not {ident}")
    try:
        pki.verify_payload(cert, signed.payload, signed.signature)
    except pki.PkiError:
        raise Unauthenticated("signed job's signature does not match its content "
                              "(altered in transit or signed by another key)") from None
    req = JobRequest.from_payload(signed.payload)
    age = now - float(req.issued_at)
    if age > max_age_s:
        raise Unauthenticated(f"signed job is stale: issued {age:.0f}s ago by this site's clock, "
                              f"limit {max_age_s:.0f}s (if it was signed just now, the signing "
                              "computer's clock or this site's is wrong)")
    if age < -max_age_s:
        raise Unauthenticated(f"signed job is issued {-age:.0f}s in the future by this site's "
                              f"clock, beyond the allowed skew of {max_age_s:.0f}s (the signing "
                              "computer's clock or this site's is wrong)")
    if req.kind == "script":
        if len(signed.script) > MAX_SCRIPT:
            raise InvalidRequest(f"script is {len(signed.script)} bytes; limit {MAX_SCRIPT}")
        if hashlib.sha256(signed.script).hexdigest() != req.script_sha256:
            raise Unauthenticated("script body does not match the signed SHA-256")
    return VerifiedJob(req, ident, signed)
