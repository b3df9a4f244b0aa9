"""Whether a container's fork/clone hit its pids limit, read from the host's cgroup files.

The engine reports no such event, so the kernel's ``pids.events`` counter is the only
witness. Its path depends on the cgroup version and driver; a host where none of the
known paths exists simply reports no hits. Blocking; called off the event loop.
"""

from __future__ import annotations

import os
from pathlib import Path


def pids_events_path(container_id: str) -> Path | None:
    """The container's ``pids.events`` file (cgroup v1 or v2, cgroupfs or systemd driver)."""
    candidates = (
        f"/sys/fs/cgroup/pids/docker/{container_id}/pids.events",
        f"/sys/fs/cgroup/pids/system.slice/docker-{container_id}.scope/pids.events",
        f"/sys/fs/cgroup/system.slice/docker-{container_id}.scope/pids.events",
        f"/sys/fs/cgroup/docker/{container_id}/pids.events",
    )
    for path in candidates:
        if os.path.exists(path):
            return Path(path)
    return None


def pids_limit_hits(path: Path | None) -> int:
    """How often the pids limit refused a fork so far (0 when unknown)."""
    if path is None:
        return 0
    try:
        text = path.read_text()
    except OSError:
        return 0
    for line in text.splitlines():
        key, _, value = line.partition(" ")
        if key == "max" and value.strip().isdigit():
            return int(value)
    return 0
