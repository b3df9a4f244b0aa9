"""[compute]: where a site's heavy query work runs (in-process by default)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from stimnetd.config.reader import Reader


@dataclass(frozen=True)
class ComputeSettings:
    # "tcp://host:port" of a dask.distributed scheduler whose workers see the catalogs at
    # the same paths; None: voxel maps are computed in the daemon.
    scheduler: str | None = None


def read_compute(r: Reader, raw: dict[str, Any]) -> ComputeSettings:
    w = "[compute]"
    raw = r.table(raw, w, {"scheduler"})
    scheduler = r.get(raw, w, "scheduler", str, None)
    if scheduler is not None:
        scheme, sep, rest = scheduler.partition("://")
        if not sep or scheme not in ("tcp", "tls"):
            raise r.fail(f"{w}.scheduler", f"{scheduler!r} is not a tcp://HOST:PORT or "
                                           "tls://HOST:PORT scheduler address")
        r.address(rest, f"{w}.scheduler", allow_zero_port=False)
    return ComputeSettings(scheduler=scheduler)
