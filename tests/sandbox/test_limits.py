"""SandboxLimits validation (no Docker)."""

from __future__ import annotations

import pytest

from stimnetd.sandbox import SandboxLimits


@pytest.mark.parametrize(
    "change",
    [{"pids": 0}, {"memory_bytes": 1024}, {"timeout_s": 0}, {"cpus": -1}, {"output_files": 0}],
)
def test_limits_refuse_unbounded_settings(change):
    """Limits that Docker would treat as 'unlimited' (or reject) are refused up front."""
    with pytest.raises(ValueError, match="SandboxLimits"):
        SandboxLimits(**change)


def test_default_limits_match_the_design():
    """The defaults are the documented ones: 512 MiB, 64 pids, 1 CPU, 60 s, 8 MiB out."""
    lim = SandboxLimits()
    assert (lim.memory_bytes, lim.pids, lim.cpus, lim.timeout_s) == (512 << 20, 64, 1.0, 60.0)
    assert (lim.result_bytes, lim.log_bytes, lim.tmpfs_bytes) == (8 << 20, 256 << 10, 64 << 20)
