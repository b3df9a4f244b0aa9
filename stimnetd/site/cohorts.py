"""Cohort fingerprints: the HMAC'd subject ids the overlap guard and the ledger compare.

The site's secret keys the HMAC, so a fingerprint says nothing outside this site. Each
subject's HMAC is computed once per catalog and the last cohorts are remembered whole:
researchers re-ask about the same cohort, and per-subject hashing is most of a small
query's release.
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict
from collections.abc import Awaitable, Callable

from stimnetd.catalog import Catalog
from stimnetd.privacy.overlap import cohort_fingerprint_list
from stimnetd.store.records import cohort_digest

# Whole cohorts remembered (least recently used dropped first).
REMEMBERED_COHORTS = 64


class CohortFingerprints:
    def __init__(self, secret: Callable[[], Awaitable[bytes]]) -> None:
        # Read once, when first needed: the store holds it and may not be open yet.
        self._read_secret = secret
        self._secret: bytes | None = None
        self._subjects: dict[str, dict[str, str]] = {}
        self._cohorts: OrderedDict[tuple[str, frozenset[str]], tuple[frozenset[str], str]] = \
            OrderedDict()

    async def of(self, catalog: Catalog, cohort: frozenset[str]) -> tuple[frozenset[str], str]:
        """The cohort's fingerprints and their digest."""
        key = (catalog.name, cohort)
        hit = self._cohorts.get(key)
        if hit is not None:
            self._cohorts.move_to_end(key)
            return hit
        if self._secret is None:
            self._secret = await self._read_secret()
        table = self._subjects.get(catalog.name)
        if table is None:
            ids = catalog.frame()[catalog.subject_key].astype(str).tolist()
            hashed = await asyncio.to_thread(cohort_fingerprint_list, ids, self._secret)
            table = self._subjects[catalog.name] = dict(zip(ids, hashed, strict=True))
        missing = [i for i in cohort if i not in table]
        if missing:
            table.update(zip(missing, cohort_fingerprint_list(missing, self._secret), strict=True))
        fps = frozenset(table[i] for i in cohort)
        result = self._cohorts[key] = (fps, cohort_digest(fps))
        if len(self._cohorts) > REMEMBERED_COHORTS:
            self._cohorts.popitem(last=False)
        return result
