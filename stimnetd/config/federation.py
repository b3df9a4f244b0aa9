"""How the node finds and calls its peers: [federation] (static peers, sub-job limits)
and [gossip] (membership timings)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from stimnetd.config.reader import Reader


@dataclass(frozen=True)
class FederationSettings:
    peers: tuple[str, ...] = ()
    seeds: tuple[str, ...] = ()
    subjob_timeout_s: float = 30.0
    # Signed jobs older than this (or from this far in the future) are refused as stale.
    request_max_age_s: float = 300.0
    # Sub-jobs one entry node may have running here at once (all its researchers').
    max_subjobs_per_entry: int = 256


@dataclass(frozen=True)
class GossipSettings:
    enabled: bool = True
    profile: str = "lan"
    gossip_interval_s: float | None = None
    probe_interval_s: float | None = None
    probe_timeout_s: float | None = None
    suspicion_mult: int | None = None
    indirect_checks: int | None = None
    fanout: int | None = None


def read_federation(r: Reader, raw: dict[str, Any]) -> FederationSettings:
    w = "[federation]"
    raw = r.table(raw, w, {"peers", "seeds", "subjob_timeout_s", "request_max_age_s",
                           "max_subjobs_per_entry"})
    peers = r.addresses(raw, w, "peers")
    seeds = r.addresses(raw, w, "seeds")
    timeout = r.get(raw, w, "subjob_timeout_s", float, 30.0)
    age = r.get(raw, w, "request_max_age_s", float, 300.0)
    if timeout <= 0 or age <= 0:
        raise r.fail(w, "subjob_timeout_s and request_max_age_s must be positive")
    return FederationSettings(
        peers=peers, seeds=seeds, subjob_timeout_s=timeout, request_max_age_s=age,
        max_subjobs_per_entry=r.limit(raw, w, "max_subjobs_per_entry", 256))


def read_gossip(r: Reader, raw: dict[str, Any]) -> GossipSettings:
    w = "[gossip]"
    raw = r.table(raw, w, {"enabled", "profile", "gossip_interval_s", "probe_interval_s",
                           "probe_timeout_s", "suspicion_mult", "indirect_checks", "fanout"})
    values: dict[str, Any] = {}
    for key in ("gossip_interval_s", "probe_interval_s", "probe_timeout_s"):
        if key in raw:
            values[key] = r.get(raw, w, key, float)
            if values[key] <= 0:
                raise r.fail(f"{w}.{key}", "must be positive")
    for key in ("suspicion_mult", "indirect_checks", "fanout"):
        if key in raw:
            values[key] = r.get(raw, w, key, int)
            if values[key] < 1:
                raise r.fail(f"{w}.{key}", "must be at least 1")
    return GossipSettings(enabled=r.get(raw, w, "enabled", bool, True),
                          profile=r.get(raw, w, "profile", str, "lan", choices=("lan", "wan")),
                          **values)
