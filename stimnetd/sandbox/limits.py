"""What a job container may use, and how its job ended: values only, no I/O."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

KiB = 1024
MiB = 1024 * KiB

SandboxStatus = Literal["succeeded", "failed", "timeout", "cancelled"]
STATUSES: tuple[SandboxStatus, ...] = ("succeeded", "failed", "timeout", "cancelled")


@dataclass(frozen=True)
class SandboxLimits:
    """Hard limits for one job container."""

    memory_bytes: int = 512 * MiB
    pids: int = 64
    cpus: float = 1.0
    timeout_s: float = 60.0
    result_bytes: int = 8 * MiB
    log_bytes: int = 256 * KiB
    tmpfs_bytes: int = 64 * MiB
    # Many tiny files cost the monitor a directory walk per poll; nobody needs more.
    output_files: int = 256
    # A catalog up to this size is copied into the job's private tmpfs (host memory, for
    # the job's life); a larger one is bound (workspace.py says what that costs).
    data_copy_bytes: int = 1024 * MiB

    def __post_init__(self) -> None:
        # Docker rejects memory below 6 MiB and silently treats pids_limit <= 0 as
        # unlimited; refuse such settings here rather than run an unbounded sandbox.
        floors = {
            "memory_bytes": 16 * MiB,
            "pids": 8,
            "result_bytes": 4 * KiB,
            "log_bytes": 1 * KiB,
            "tmpfs_bytes": 1 * MiB,
            "output_files": 1,
        }
        for name, floor in floors.items():
            if getattr(self, name) < floor:
                raise ValueError(f"SandboxLimits.{name} must be at least {floor}")
        if not (self.cpus > 0 and self.timeout_s > 0):
            raise ValueError("SandboxLimits.cpus and timeout_s must be positive")


@dataclass(frozen=True)
class SandboxOutcome:
    """How a job ended. `result`/`arrays` are set only when status is "succeeded".

    `log_lines` is the script's own stdout/stderr: researcher-controlled and possibly
    containing row-level data, so it is for the site operator unless policy says
    otherwise. `reason` is written by the runner (at most an exception type and a line
    number come from inside the container) for the site's log; the researcher is told
    `kind` in the words of stimnetd.sandbox.failure unless log_policy is "full".
    """

    status: SandboxStatus
    reason: str
    result: dict[str, Any] | None
    arrays: dict[str, np.ndarray]
    log_lines: list[str]
    duration_s: float
    exit_code: int | None = None
    prewarmed: bool = False
    # Which of stimnetd.sandbox.failure.KINDS a failure was ("" when it succeeded, or
    # when the runner did not say: the researcher is then told "crashed").
    kind: str = ""


def fmt_bytes(n: int) -> str:
    """`n` as a limit reads in a reason: "1 MiB", "256 KiB", "5000 bytes"."""
    for unit, size in (("GiB", 1 << 30), ("MiB", MiB), ("KiB", KiB)):
        if n >= size and n % size == 0:
            return f"{n // size} {unit}"
    return f"{n} bytes"


def fmt_seconds(s: float) -> str:
    return f"{s:g}"


def output_overflow(lim: SandboxLimits, used: int, files: int, *, at_cap: bool) -> str:
    """Which output limit `used` bytes in `files` files break, or "".

    `at_cap` (after exit): reaching a limit counts, because the tmpfs (ENOSPC, inode
    count) and RLIMIT_FSIZE stop writes exactly at it, so being there means a write
    was refused.
    """
    over_bytes = used >= lim.result_bytes if at_cap else used > lim.result_bytes
    over_files = files >= lim.output_files if at_cap else files > lim.output_files
    if over_bytes:
        return f"output exceeded result limit {fmt_bytes(lim.result_bytes)}"
    if over_files:
        return f"output exceeded {lim.output_files} files"
    return ""
