"""Rows the store returns, as domain dataclasses."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

# Named in stimnet.states (the client reads the same states); re-exported for the store's
# callers.
from stimnet.states import JOB_STATES as JOB_STATES
from stimnet.states import TERMINAL_STATES as TERMINAL_STATES
from stimnet.states import JobState
from stimnetd.store import blobs


@dataclass(frozen=True)
class JobRecord:
    id: str
    kind: str
    scope: str
    catalog: str
    owner: str
    state: JobState
    detail: str
    created_at: float
    updated_at: float
    request_id: str
    origin: str
    payload: bytes
    signature: bytes
    signer_cert: bytes
    script: bytes | None = None
    script_sha256: str = ""
    sites: list[dict[str, Any]] = field(default_factory=list)
    result: bytes | None = None
    attempts: int = 0
    requeues: int = 0  # times a restart re-queued it after it was interrupted mid-run

    COLUMNS = ("id, kind, scope, catalog, owner, state, detail, created_at, updated_at, "
               "request_id, origin, payload, signature, signer_cert, script, script_sha256, "
               "sites_json, result, attempts, requeues")

    @classmethod
    def from_row(cls, row: Any) -> JobRecord:
        values = list(row)
        values[16] = json.loads(values[16])
        values[17] = blobs.expand(values[17])
        return cls(*values)

    @property
    def terminal(self) -> bool:
        return self.state in TERMINAL_STATES


# Cohorts a release discloses, each as (members, cohort_digest(members)).
Disclosed = tuple[tuple[frozenset[str], str], ...]


@dataclass(frozen=True)
class Release:
    job_id: str
    researcher: str
    catalog: str
    decision: str              # released | partially_suppressed | suppressed
    epsilon: float | None
    cohort: frozenset[str]
    partials: bytes | None
    at: float
    audit_detail: dict[str, Any] = field(default_factory=dict)
    cohort_key: str | None = None  # cohort_digest(cohort), if the caller already has it
    # The cohorts whose statistics this release discloses, as (members, digest): the
    # overlap guard checks each and records each. Empty: just `cohort` (ungrouped).
    guarded: Disclosed = ()
    # A grouped release with two or more released cells: those cells (members, digest), so
    # unions of some of them can be guarded and the query's cells recorded as a family.
    atoms: Disclosed = ()
    # The delta charged beside `epsilon` (0 for an exact release).
    delta: float = 0.0
    # An exact release's linear statistics: (quantity, cohort members, cohort digest), for
    # exact auditing (privacy/span.py). Recorded under `auditor`: the researcher, or "*"
    # where the site keeps one auditing history per catalog.
    linear: tuple[tuple[str, frozenset[str], str], ...] = ()
    shared_history: bool = False

    @property
    def auditor(self) -> str:
        return "*" if self.shared_history else self.researcher

    def disclosed(self) -> Disclosed:
        if self.guarded:
            return self.guarded
        if not self.cohort:
            return ()
        return ((self.cohort, self.cohort_key or cohort_digest(self.cohort)),)

    @classmethod
    def from_row(cls, row: Any) -> Release:
        # The stored release keeps the cohort's digest only; members live in `cohorts`.
        job_id, researcher, catalog, decision, eps, _digest, partials, at = row
        return cls(job_id, researcher, catalog, decision, eps, frozenset(),
                   blobs.expand(partials), at)


class LedgerView(Protocol):
    """What a release rule may read of the researcher's history on the release's catalog,
    inside the release's transaction (privacy/release.decide).

    Nothing a rule does through it is written, but for a sketch the store makes while
    finding an earlier cohort stored without one. Methods rather than fields: a rule reads
    only what it needs (a release the budget refuses loads no cohorts), and the window it
    asks for is the policy's, which the store does not know."""

    def spent(self) -> float:
        """The epsilon already charged to the researcher on the catalog."""

    def spent_delta(self) -> float:
        """The delta already charged to the researcher on the catalog."""

    def catalog_spent(self) -> float:
        """The epsilon already charged on the catalog to every researcher together."""

    def linear_history(self, quantity: str) -> list[tuple[frozenset[str], str, str]]:
        """(members, digest, job) of each cohort of `quantity` released before."""

    def linear_known(self, quantity: str, digests: list[str]) -> bool:
        """Whether all of `digests` were released before as `quantity`."""

    def near_cohorts(self, members: frozenset[str], digest: str,
                     window: int) -> list[frozenset[str]]:
        """Earlier released cohorts that could be within `window` subjects of `members`
        (whose digest is `digest`; that cohort itself is left out, as asking about it again
        discloses nothing new). Every cohort within `window` is among them; some farther
        ones may be too."""

    def near_families(self, atoms: Disclosed, window: int) -> list[list[frozenset[str]]]:
        """Earlier queries, each as its released cells (or one earlier cohort), some union
        of whose cells could be within `window` subjects of some union of `atoms`."""


class RefusalRecord(Protocol):
    """A rule's refusal, as the store audits it and raises it (privacy/release.Refusal)."""

    def audit_detail(self) -> Mapping[str, Any]:
        """Recorded in the refusal's audit entry, beside the job and catalog."""

    def error(self) -> Exception:
        """Raised to the caller once the audit entry is committed."""


# The release rules, as the store runs them inside the release's transaction.
ReleaseRule = Callable[[LedgerView, Release], RefusalRecord | None]


@dataclass(frozen=True)
class MemberRecord:
    name: str
    address: str
    incarnation: int
    status: str
    last_heard: float
    catalogs: tuple[tuple[str, int], ...]

    @classmethod
    def from_row(cls, row: Any) -> MemberRecord:
        name, address, inc, status, heard, cats = row
        return cls(name, address, int(inc), status, float(heard),
                   tuple((str(c), int(v)) for c, v in json.loads(cats)))

    def to_row(self) -> tuple[Any, ...]:
        return (self.name, self.address, self.incarnation, self.status, self.last_heard,
                json.dumps([list(c) for c in self.catalogs]))


def cohort_digest(cohort: frozenset[str]) -> str:
    """An order-free key for a set: the sum mod 2^128 of its members' hashes (AdHash),
    without sorting thousands of strings on every release.

    Members are normally HMAC fingerprints (uniform hex), which are their own hashes;
    anything else is hashed first.
    """
    try:
        total = sum(int(m[:32], 16) for m in cohort)
    except ValueError:
        total = sum(int.from_bytes(hashlib.blake2b(m.encode(), digest_size=16).digest())
                    for m in cohort)
    total %= 1 << 128
    return hashlib.sha256(f"{len(cohort)}:{total:032x}".encode()).hexdigest()


SKETCH_BUCKETS = 256


def cohort_sketch(cohort: Iterable[str]) -> bytes:
    """How many members fall in each of 256 buckets (by the member's hash), as uint32s.

    A lower bound on set difference: a bucket's counts can differ by at most the number of
    its members that are in only one of the sets, so their L1 distance (`sketch_distances`)
    is at most |A xor B|.
    The overlap guard need not load a cohort whose sketch is k_min or more away.
    """
    members = list(cohort)
    try:
        # HMAC fingerprints (uniform hex): each one's first byte, decoded in one call.
        heads = bytes.fromhex("".join(m[:2] for m in members))
        if len(heads) != len(members):  # a member shorter than two characters
            raise ValueError
        buckets = np.frombuffer(heads, dtype=np.uint8)
    except ValueError:
        buckets = np.asarray([_bucket(m) for m in members], dtype=np.intp)
    return np.bincount(buckets, minlength=SKETCH_BUCKETS).astype("<u4").tobytes()


def sketch_distances(a: bytes, others: list[bytes]) -> list[int]:
    """The L1 distance from sketch `a` to each of `others`."""
    if any(len(o) != len(a) for o in others):
        raise ValueError("cohort sketches of different sizes")
    x = np.frombuffer(a, dtype="<u4").astype(np.int64)
    ys = np.frombuffer(b"".join(others), dtype="<u4").astype(np.int64).reshape(len(others), -1)
    return np.abs(ys - x).sum(axis=1).tolist()


def _bucket(member: str) -> int:
    # Per member, so a member lands in the same bucket whatever set it is in (and the
    # same as the fast path above gives it).
    try:
        return bytes.fromhex(member[:2])[0]
    except (ValueError, IndexError):
        return hashlib.blake2b(member.encode(), digest_size=1).digest()[0]


@dataclass
class NonceClaim:
    """A signed request's nonce, to be remembered in the transaction that records what the
    request did (its release, or its refusal) instead of one of its own: a peer answers a
    federated query with one commit, not two. `accepted` is appended with it.

    Replays still cannot do anything twice: the release transaction inserts the nonce
    first and aborts on a duplicate, so of two concurrent copies only one releases."""

    nonce: str
    signer: str
    max_age_s: float
    accepted: tuple[str, str, str, str, dict[str, Any]] | None = None
    consumed: bool = False
    # Set in the release transaction that charged under this claim: the release (and its
    # charge) is this request's own, not a concurrent copy's (which fails on the nonce),
    # so only this request's sub-job may refund it.
    released: bool = False
