"""GossipConfig: memberlist's LAN and WAN timings, the formulas derived from them, and the
combinations it refuses."""

from __future__ import annotations

import pytest

from stimnetd.gossip.config import GossipConfig
from stimnetd.gossip.membership import MemberLimits


def test_default_config_is_memberlist_lan() -> None:
    """Defaults match memberlist's LAN profile as the issue specifies."""
    c = GossipConfig()
    assert (c.gossip_interval, c.fanout, c.probe_interval, c.probe_timeout, c.indirect_checks,
            c.suspicion_mult, c.retransmit_mult) == (0.2, 3, 1.0, 0.5, 3, 4, 4)


def test_wan_preset_overrides_timings_only() -> None:
    """wan() slows gossip, probing and suspicion but keeps fanout and limits."""
    c = GossipConfig.wan()
    assert (c.gossip_interval, c.probe_interval, c.probe_timeout, c.suspicion_mult) == (
        0.5, 5.0, 3.0, 6)
    assert c.fanout == 3 and c.limits == MemberLimits()


@pytest.mark.parametrize(("n", "seconds"), [(3, 4.0), (10, 4.0), (100, 8.0), (1000, 12.0)])
def test_suspicion_timeout_follows_memberlist(n: int, seconds: float) -> None:
    """Suspicion lasts suspicion_mult × log10(max(N, 10)) × probe_interval."""
    assert GossipConfig().suspicion_timeout(n) == pytest.approx(seconds)


def test_retransmit_limit_grows_with_log_n() -> None:
    """Each update is retransmitted retransmit_mult × ceil(log10(N + 1)) times."""
    c = GossipConfig()
    assert [c.retransmit_limit(n) for n in (1, 9, 10, 128)] == [4, 4, 8, 12]


def test_config_refuses_probe_timeout_without_room_for_indirect_probes() -> None:
    """A probe timeout not shorter than the probe interval is a configuration error."""
    with pytest.raises(ValueError, match="probe_timeout"):
        GossipConfig(probe_timeout=1.0, probe_interval=1.0)
