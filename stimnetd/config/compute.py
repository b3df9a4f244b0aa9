"""[compute]: where a site's heavy query work runs (in-process by default)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from stimnetd.config.reader import Reader


def cores() -> int:
    """The cores this process may run on (its CPU affinity, not the machine's count)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


@dataclass(frozen=True)
class ComputeSettings:
    # "tcp://host:port" of a dask.distributed scheduler whose workers see the catalogs at
    # the same paths; None: voxel maps are computed in the daemon.
    scheduler: str | None = None
    # Processes decoding images for voxel maps (0: on the query's thread, no pool);
    # None: one per core.
    workers: int | None = None
    # The decoded-image cache (sparse: the non-zero voxels only): in memory, and on disk
    # under the state directory (0: not on disk).
    image_cache_mb: int = 512
    image_cache_disk_mb: int = 2048

    def worker_count(self) -> int:
        return cores() if self.workers is None else self.workers


def read_compute(r: Reader, raw: dict[str, Any]) -> ComputeSettings:
    w = "[compute]"
    raw = r.table(raw, w, {"scheduler", "workers", "image_cache_mb", "image_cache_disk_mb"})
    scheduler = r.get(raw, w, "scheduler", str, None)
    if scheduler is not None:
        scheme, sep, rest = scheduler.partition("://")
        if not sep or scheme not in ("tcp", "tls"):
            raise r.fail(f"{w}.scheduler", f"{scheduler!r} is not a tcp://HOST:PORT or "
                                           "tls://HOST:PORT scheduler address")
        r.address(rest, f"{w}.scheduler", allow_zero_port=False)
    workers = r.get(raw, w, "workers", int, None)
    if workers is not None and not 0 <= workers <= 256:
        raise r.fail(f"{w}.workers", f"must be between 0 and 256, got {workers}")
    sizes = {}
    for key, default in (("image_cache_mb", 512), ("image_cache_disk_mb", 2048)):
        sizes[key] = r.get(raw, w, key, int, default)
        if not 0 <= sizes[key] <= 1_048_576:
            raise r.fail(f"{w}.{key}", f"must be between 0 and 1048576 (MB), got {sizes[key]}")
    return ComputeSettings(scheduler=scheduler, workers=workers, **sizes)
