"""The host side of a job container's two mounts: create, hand over, measure, remove.

A workspace is ``<state_dir>/work/<name>/`` holding ``job/`` (script and manifest,
mounted read-only at /job) and ``out/`` (mounted read-write at /out, where the script
writes its result). Its name is also the container's, so the runner can tell its own
containers from ones a crashed run left behind.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import stat
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog

from stimnet.query.fields import FieldMeta
from stimnetd.sandbox.limits import SandboxLimits

log = structlog.get_logger("stimnetd.sandbox")

# The user the job runs as inside the container (nobody:nogroup in the image).
SANDBOX_UID = 65534
# A waiting zygote starts the script when this file appears in /job.
GO_NAME = "go"


def job_manifest(
    tables: Mapping[str, str],
    subject_key: str,
    fields: Mapping[str, FieldMeta],
) -> dict[str, Any]:
    """The /job/manifest.json a script sees: table files, image fields, declared metadata.

    Bounds go in so the runtime can clamp like the query engine does; the daemon checks
    them again in `parse_result` and never relies on the runtime having done so.
    """
    return {
        "tables": dict(tables),
        "subject_key": subject_key,
        "image_fields": sorted(f.name for f in fields.values() if f.type == "image"),
        "fields": {
            f.name: {
                "table": f.table,
                "type": f.type,
                "bounds": list(f.bounds) if f.bounds is not None else None,
                "levels": list(f.levels) if f.levels is not None else None,
            }
            for f in fields.values()
        },
    }


@dataclass
class Workspace:
    """A per-container host dir: job/ (script + manifest, mounted ro) and out/ (rw)."""

    root: Path

    @property
    def name(self) -> str:
        return self.root.name

    @property
    def job(self) -> Path:
        return self.root / "job"

    @property
    def out(self) -> Path:
        return self.root / "out"

    @classmethod
    def create(cls, parent: Path, limits: SandboxLimits, out_tmpfs: bool, name: str) -> Workspace:
        parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        root = parent / name
        root.mkdir(mode=0o700)
        # The container sees only the two mounts, never root/ itself, so 0700 on root
        # keeps other host users out without hiding anything from the sandbox user.
        (root / "job").mkdir(mode=0o755)
        out = root / "out"
        out.mkdir(mode=0o700)
        if out_tmpfs:
            try:
                mount_out_tmpfs(out, limits)
            except BaseException:
                shutil.rmtree(root, ignore_errors=True)
                raise
            return cls(root)
        try:
            os.chown(out, SANDBOX_UID, SANDBOX_UID)
        except PermissionError:
            # A non-root daemon cannot hand the dir over; world-writable is then the only
            # way in, and root/ at 0700 still keeps other host users out.
            out.chmod(0o777)
        return cls(root)

    def write_job(self, script: bytes, manifest: Mapping[str, Any]) -> None:
        body = json.dumps(manifest, allow_nan=False).encode()
        for name, data in (("script.py", script), ("manifest.json", body)):
            self._put(name, data)

    def hand_over(self) -> None:
        """Tell a waiting zygote to run the job: `go` appears atomically, after the rest."""
        self._put(GO_NAME, b"")

    def _put(self, name: str, data: bytes) -> None:
        tmp = self.job / f".{name}.tmp"
        tmp.write_bytes(data)
        tmp.chmod(0o644)
        os.replace(tmp, self.job / name)

    def usage(self, limit_files: int) -> tuple[int, int, str]:
        """(bytes, entries, problem) of out/, stopping early once entries pass the limit.

        Results are files at the top of out/ (the runtime writes nothing else), so a
        subdirectory is a problem in itself: one the script made unreadable would hide
        what it holds from this count, and from the clean-up when the daemon is not root.
        Entries that vanish while they are counted (a script creating and deleting files)
        are skipped.
        """
        total = 0
        entries = 0
        try:
            it = os.scandir(self.out)
        except OSError:
            return 0, 0, "the output directory cannot be read"
        with it:
            for entry in it:
                entries += 1
                if entries > limit_files:
                    return total, entries, ""
                try:
                    st = entry.stat(follow_symlinks=False)
                except FileNotFoundError:
                    continue
                except OSError:
                    return total, entries, "an output file cannot be read"
                if stat.S_ISDIR(st.st_mode):
                    return total, entries, ("a subdirectory in the output directory "
                                            "(results are files)")
                # Allocated blocks, not apparent size: sparse files cost nothing, a
                # preallocated one costs its blocks.
                total += max(st.st_size if stat.S_ISREG(st.st_mode) else 0, st.st_blocks * 512)
        return total, entries, ""

    def remove(self) -> None:
        if os.path.ismount(self.out):
            # Lazy: a container being torn down may still pin the mount for a moment.
            subprocess.run(["umount", "-l", str(self.out)], check=False, capture_output=True)
        shutil.rmtree(self.root, ignore_errors=True)
        if self.root.exists():
            log.warning("sandbox workspace not fully removed (files the container made that "
                        "this user cannot delete)", path=str(self.root))


def mount_out_tmpfs(out: Path, limits: SandboxLimits) -> None:
    """Put a size- and inode-capped, noexec tmpfs on the output dir.

    The kernel then enforces the result cap exactly (ENOSPC) and the file-count cap, and
    nothing the script writes there can be executed: Docker cannot make a bind mount
    noexec, but a bind of a noexec mount stays noexec. Needs root (CAP_SYS_ADMIN).
    """
    options = ",".join(
        (
            "noexec",
            "nosuid",
            "nodev",
            f"size={limits.result_bytes}",
            f"nr_inodes={limits.output_files + 1}",
            f"uid={SANDBOX_UID}",
            f"gid={SANDBOX_UID}",
            "mode=0700",
        )
    )
    subprocess.run(
        ["mount", "-t", "tmpfs", "-o", options, "stimnet-out", str(out)],
        check=True,
        capture_output=True,
        timeout=30,
    )


class Workspaces:
    """One runner's ``work/`` directory, and which of the workspaces in it are its own.

    A re-queued job may be running while the start-up sweep runs, so the sweep (and
    `reap_orphans`, by container name) spare every workspace this runner has claimed and
    not yet released. Blocking methods are called off the event loop.
    """

    def __init__(self, parent: Path, *, out_tmpfs: bool) -> None:
        self.parent = parent
        self.out_tmpfs = out_tmpfs
        self._own: set[str] = set()

    @property
    def own_names(self) -> frozenset[str]:
        return frozenset(self._own)

    def claim(self) -> str:
        """A fresh name, claimed before its directory exists so no sweep takes it."""
        name = secrets.token_hex(8)
        self._own.add(name)
        return name

    def create(self, name: str, limits: SandboxLimits) -> Workspace:
        """Blocking: make the claimed workspace `name` (the caller releases the claim if
        this fails or its wait is cancelled, so a sweep then removes what is left)."""
        return Workspace.create(self.parent, limits, self.out_tmpfs, name)

    def release(self, name: str) -> None:
        self._own.discard(name)

    def sweep(self) -> None:
        """Blocking: remove every workspace under `parent` this runner has not claimed."""
        if not self.parent.is_dir():
            return
        for entry in self.parent.iterdir():
            if entry.name not in self._own:
                Workspace(entry).remove()
