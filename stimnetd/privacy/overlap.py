"""The overlap guard against differencing attacks on the k_min threshold.

Two released cohorts that differ by a handful of subjects give those subjects' values away
by subtraction ("mean age of everyone" minus "mean age of everyone except patient X"),
even though each cohort on its own is far above k_min. The guard refuses a query whose
cohort differs from an earlier released cohort (same researcher, same catalog; the caller
chooses the history) by 1..k_min-1 subjects. An identical cohort is allowed: it can only
repeat an answer already given.

Limitations, by construction:

* Only pairs are compared. Three or more queries can still difference (A - B - C with
  each pair far apart); only differential privacy bounds that, which is why DP exists.
* A refusal is itself a signal: it tells the researcher that the two filters' difference
  holds 1..k_min-1 subjects. It never says how many; DP noise, where the site enables
  it, is what bounds what such signals add up to.
* Group-by cells are cohorts too, and so is any union of a query's released cells (their
  statistics add up: "STN" plus "GPi" is "STN or GPi"). The site (`jobs/site.py`) checks
  and records each cell and their union rather than the WHERE cohort, and
  `check_union_overlap` compares unions of this query's cells with unions of an earlier
  query's: every union when a query has at most MAX_ENUMERATED_ATOMS released cells, each
  cell alone and all of them together beyond that.

The store keeps fingerprints, not subject ids: keyed HMACs under a secret that never
leaves the site, so a stolen state directory does not list who was in which cohort, and
fingerprints from different sites cannot be joined.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Iterable, Sequence

import numpy as np

from stimnetd.privacy.policy import PrivacyRefusal
from stimnetd.store.unions import unions

# 128 bits: collisions between distinct subjects are negligible at any cohort size.
FINGERPRINT_HEX_CHARS = 32


def check_overlap(
    new_cohort: frozenset[str], earlier: Iterable[frozenset[str]], k_min: int,
    what: str = "cohort",
) -> None:
    """Refuse `new_cohort` if it differs from any earlier cohort by 1..k_min-1 subjects.

    `what` names the kind of cohort in the refusal (never which one, nor by how much)."""
    for cohort in earlier:
        if 1 <= len(new_cohort ^ cohort) <= k_min - 1:
            raise PrivacyRefusal(
                "overlap", f"{what} differs from an earlier released cohort by fewer than "
                f"{k_min} subjects (k_min = {k_min})"
            )


def check_union_overlap(new_atoms: Sequence[frozenset[str]],
                        earlier: Iterable[Sequence[frozenset[str]]], k_min: int) -> None:
    """Refuse if a union of the new query's released cells (`new_atoms`, disjoint) differs
    from a union of an earlier query's released cells (each of `earlier`: that query's
    cells, or one earlier cohort) by 1..k_min-1 subjects. Exact over the unions `unions`
    enumerates: with disjoint cells, |∪S xor ∪T| = |∪S| + |∪T| - 2 Σ |G_i ∩ H_j|."""
    a = unions(len(new_atoms))
    sa = a @ np.array([len(g) for g in new_atoms], np.int64)
    for family in earlier:
        b = unions(len(family))
        sb = b @ np.array([len(h) for h in family], np.int64)
        inter = np.array([[len(g & h) for h in family] for g in new_atoms], np.int64)
        d = sa[:, None] + sb[None, :] - 2 * (a @ inter @ b.T)
        if ((d >= 1) & (d <= k_min - 1)).any():
            mine = "a union of this query's groups" if len(new_atoms) > 1 else "cohort"
            raise PrivacyRefusal(
                "overlap", f"{mine} differs from an earlier released cohort (or a union of "
                f"an earlier query's groups) by fewer than {k_min} subjects (k_min = {k_min})")


def cohort_fingerprint(ids: Iterable[str], site_secret: bytes) -> frozenset[str]:
    """The cohort as HMAC-SHA256 fingerprints of its subject ids, for `check_overlap`."""
    return frozenset(cohort_fingerprint_list(list(ids), site_secret))


def cohort_fingerprint_list(ids: list[str], site_secret: bytes) -> list[str]:
    """Fingerprints in the order of `ids` (so callers can cache them per subject)."""
    # A short secret would let anyone holding the store brute-force the id space.
    if len(site_secret) < 16:
        raise ValueError("site_secret must be at least 16 bytes")
    return [_fingerprint(i, site_secret) for i in ids]


def _fingerprint(subject_id: str, secret: bytes) -> str:
    if not isinstance(subject_id, str):
        # Mixing 1 and "1" would silently treat them as different subjects.
        raise TypeError(f"subject ids must be str, got {type(subject_id).__name__}")
    mac = hmac.new(secret, subject_id.encode("utf-8"), hashlib.sha256)
    return mac.hexdigest()[:FINGERPRINT_HEX_CHARS]
