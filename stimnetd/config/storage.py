"""[storage]: how much of the state volume the node's answers may take, and when it stops."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from stimnetd.config.reader import Reader


@dataclass(frozen=True)
class StorageSettings:
    # Stored answer bytes (released partials kept for re-delivery, and answers kept with
    # jobs, both compressed) one researcher may hold at this node; a job that would add to
    # them beyond it is refused, naming the limit. They shrink as job retention deletes.
    max_stored_mb_per_researcher: float = 1024.0
    # Below this much free space on the state volume no new job is accepted here, so the
    # disk does not fill with answers and the audit chain and ledger keep room to commit.
    min_free_mb: float = 256.0
    # The largest answer one query may plan (its maps as dense float64 grids, per group, as
    # a site computes and the entry combines them: query/plan.py); a query over it is
    # refused before any image is read, naming this limit.
    max_answer_mb: float = 1024.0


def read_storage(r: Reader, raw: dict[str, Any]) -> StorageSettings:
    w = "[storage]"
    raw = r.table(raw, w, {"max_stored_mb_per_researcher", "min_free_mb", "max_answer_mb"})
    values = {}
    for key, default in (("max_stored_mb_per_researcher", 1024.0), ("min_free_mb", 256.0),
                         ("max_answer_mb", 1024.0)):
        value = float(r.get(raw, w, key, float, default))
        if not 0 <= value <= 1e9 or (key != "min_free_mb" and value == 0):
            raise r.fail(f"{w}.{key}", f"must be a positive number of MiB, got {value:g}")
        values[key] = value
    return StorageSettings(**values)
