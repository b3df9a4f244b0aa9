"""The hash chain that makes the audit log tamper-evident.

Each entry commits to its predecessor: hash = SHA-256(prev_hash, seq, at, actor, role,
action, decision, detail). Editing a row breaks its own hash; deleting or reordering rows
breaks the link or the sequence. Verification needs nothing but the rows.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass

GENESIS = "0" * 64

INSERT_ROW = ("INSERT INTO audit (seq, at, actor, role, action, decision, detail_json, "
              "prev_hash, hash) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)")
# In storage order, which verification needs: a reordered row must show as one.
SELECT_ROWS = ("SELECT seq, at, actor, role, action, decision, detail_json, prev_hash, hash "
               "FROM audit WHERE at >= ? ORDER BY rowid")
SELECT_HEAD = "SELECT seq, hash FROM audit ORDER BY seq DESC LIMIT 1"


@dataclass(frozen=True)
class AuditRow:
    seq: int
    at: float
    actor: str
    role: str
    action: str
    decision: str
    detail_json: str
    prev_hash: str
    hash: str

    def to_dict(self) -> dict[str, object]:
        d = asdict(self)
        d["detail"] = json.loads(d.pop("detail_json"))
        return d


@dataclass(frozen=True)
class AuditVerification:
    ok: bool
    entries: int
    first_bad_seq: int | None = None
    problem: str = ""


def chain_hash(prev_hash: str, seq: int, at: float, actor: str, role: str, action: str,
               decision: str, detail_json: str) -> str:
    canonical = json.dumps([prev_hash, seq, repr(float(at)), actor, role, action, decision,
                            detail_json], separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode()).hexdigest()


def verify_rows(rows: list[AuditRow]) -> AuditVerification:
    """Rows in storage order; reports the first entry that breaks the chain."""
    prev = GENESIS
    for i, row in enumerate(rows):
        expected_seq = i + 1
        if row.seq != expected_seq:
            what = "missing or reordered" if row.seq > expected_seq else "reordered or duplicated"
            return AuditVerification(False, len(rows), row.seq,
                                     f"entry {row.seq} found where {expected_seq} was expected "
                                     f"(entries {what})")
        if row.prev_hash != prev:
            return AuditVerification(False, len(rows), row.seq,
                                     f"entry {row.seq} does not link to entry {row.seq - 1} "
                                     "(an earlier entry was deleted, edited or reordered)")
        h = chain_hash(row.prev_hash, row.seq, row.at, row.actor, row.role, row.action,
                       row.decision, row.detail_json)
        if h != row.hash:
            return AuditVerification(False, len(rows), row.seq,
                                     f"entry {row.seq} does not match its hash (it was edited)")
        prev = row.hash
    return AuditVerification(True, len(rows))
