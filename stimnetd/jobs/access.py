"""Who may see a job and its answer, and the stored job's signed request, verified again."""

from __future__ import annotations

from typing import Protocol

from stimnet.pki import Identity
from stimnet.signing import SignedJob, VerifiedJob
from stimnetd.store.records import JobRecord

REPLAYED = "replayed request: this signed job was already submitted"


class JobVerifier(Protocol):
    def __call__(self, signed: SignedJob, *, fresh: bool = True) -> VerifiedJob:
        """Chain, revocation and signature; with `fresh`, the request's age too."""


def owns(record: JobRecord, caller: Identity) -> bool:
    """Jobs are researchers' (their signer's): an admin or a node certificate that happens
    to carry a researcher's name owns nothing of theirs."""
    return caller.role == "researcher" and record.owner == caller.name


def may_see(record: JobRecord, caller: Identity) -> bool:
    return caller.role == "admin" or owns(record, caller)


def restore(record: JobRecord, verify: JobVerifier) -> VerifiedJob:
    """A stored job's signed request, re-verified (chain, revocation, signature) but not
    for freshness: it was fresh when accepted and has waited in our queue since."""
    signed = SignedJob(record.payload, record.signature, record.signer_cert, record.script or b"")
    return verify(signed, fresh=False)
