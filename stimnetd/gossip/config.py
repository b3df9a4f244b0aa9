"""Gossip timings and limits: memberlist's LAN profile by default, `GossipConfig.wan()`
for its WAN profile."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from stimnetd.gossip.membership import MemberLimits


@dataclass(frozen=True)
class GossipConfig:
    """Timings default to memberlist's LAN profile; `wan()` gives its WAN profile."""

    gossip_interval: float = 0.2
    fanout: int = 3
    probe_interval: float = 1.0
    probe_timeout: float = 0.5
    indirect_checks: int = 3
    suspicion_mult: int = 4
    retransmit_mult: int = 4
    # Bounds the probe path: a ping or ack carries at most this many updates, whatever N.
    max_piggyback: int = 8
    push_pull_timeout: float = 2.0
    # Like serf's reconnect: without it two sides of a healed partition that declared
    # each other dead would never talk again.
    reconnect_interval: float = 30.0
    join_backoff_max: float = 30.0
    persist_interval: float = 1.0
    limits: MemberLimits = field(default_factory=MemberLimits)

    def __post_init__(self) -> None:
        for name in ("gossip_interval", "probe_interval", "probe_timeout", "push_pull_timeout",
                     "reconnect_interval", "join_backoff_max", "persist_interval"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be positive")
        if self.probe_timeout >= self.probe_interval:
            raise ValueError("probe_timeout must be shorter than probe_interval, "
                             "leaving time for indirect probes")
        for name in ("fanout", "suspicion_mult", "retransmit_mult", "max_piggyback"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1")
        if self.indirect_checks < 0:
            raise ValueError("indirect_checks must not be negative")

    @classmethod
    def wan(cls, **overrides: object) -> GossipConfig:
        settings: dict[str, object] = {
            "gossip_interval": 0.5, "probe_interval": 5.0, "probe_timeout": 3.0,
            "suspicion_mult": 6, "push_pull_timeout": 10.0,
        }
        settings.update(overrides)
        return cls(**settings)  # type: ignore[arg-type]

    def suspicion_timeout(self, n: int) -> float:
        """memberlist's formula: grows with log10 of the cluster so that gossip has time
        to reach the suspect, which can then refute."""
        return self.suspicion_mult * math.log10(max(n, 10)) * self.probe_interval

    def retransmit_limit(self, n: int) -> int:
        return self.retransmit_mult * math.ceil(math.log10(n + 1))
