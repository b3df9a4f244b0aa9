"""The host side of a job container's mounts: create, hand over, measure, remove.

A workspace is ``<state_dir>/work/<name>/`` holding ``job/`` (script and manifest,
mounted read-only at /job) and ``out/`` (mounted read-write at /out, where the script
writes its result). Its name is also the container's, so the runner can tell its own
containers from ones a crashed run left behind.

Private (whenever the daemon may mount, i.e. runs as root): the workspace is a tmpfs of
its own, which also holds ``data/``, a copy of what the job may read (mounted read-only at
/data), and ``etc/`` (the container's /etc/hosts, hostname and resolv.conf, which the
engine would otherwise bind from its own container directory). Every mount the container
has then comes from a filesystem whose root is the workspace or the output tmpfs, so its
mount list (/proc/self/mountinfo's root field is the source's path inside its filesystem)
names no host path: not the catalog root, the state directory or the engine's directory.
The copy is also why one job cannot see which catalog files another read through the page
cache: a job reads its own tmpfs pages, never the catalog's files, and every job's copy
reads the whole catalog. A catalog larger than ``SandboxLimits.data_copy_bytes`` is bound
instead of copied (its host path is then in the mount list; logged).
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
# Room in a private workspace beside the data copy: the script (at most 1 MiB), the
# manifest and /etc's three files.
JOB_BYTES = 4 << 20
PAGE = 4096
# The container's /etc/hosts, /etc/hostname and /etc/resolv.conf (it has no network).
ETC_FILES = {"hosts": "127.0.0.1\tlocalhost\n::1\tlocalhost\n127.0.1.1\tstimnet-job\n",
             "hostname": "stimnet-job\n", "resolv.conf": ""}


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
    # The host directory mounted at /data: the private copy, or the catalog itself.
    data: Path | None = None
    # Whether /etc's three files come from here (else the engine binds its own).
    own_etc: bool = False

    @property
    def name(self) -> str:
        return self.root.name

    @property
    def job(self) -> Path:
        return self.root / "job"

    @property
    def out(self) -> Path:
        return self.root / "out"

    @property
    def etc(self) -> Path:
        return self.root / "etc"

    @classmethod
    def create(cls, parent: Path, limits: SandboxLimits, out_tmpfs: bool, name: str,
               data: Path | None = None) -> Workspace:
        """`out_tmpfs`: mount tmpfs (root only), which also makes the workspace private
        (module docstring) and copies `data` (the catalog root) into it when it fits."""
        parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        root = parent / name
        root.mkdir(mode=0o700)
        if not out_tmpfs:
            return cls._plain(root, data)
        try:
            return cls._private(root, limits, data)
        except BaseException:
            _unmount_all(root)
            shutil.rmtree(root, ignore_errors=True)
            raise

    @classmethod
    def _plain(cls, root: Path, data: Path | None) -> Workspace:
        # The container sees only the mounts, never root/ itself, so 0700 on root keeps
        # other host users out without hiding anything from the sandbox user.
        (root / "job").mkdir(mode=0o755)
        out = root / "out"
        out.mkdir(mode=0o700)
        try:
            os.chown(out, SANDBOX_UID, SANDBOX_UID)
        except PermissionError:
            # A non-root daemon cannot hand the dir over; world-writable is then the only
            # way in, and root/ at 0700 still keeps other host users out.
            out.chmod(0o777)
        return cls(root, data)

    @classmethod
    def _private(cls, root: Path, limits: SandboxLimits, data: Path | None) -> Workspace:
        size, inodes = tree_size(data) if data is not None else (0, 0)
        copy = data is not None and size <= limits.data_copy_bytes
        if data is not None and not copy:
            log.warning("catalog larger than the sandbox's private copy limit: bound, so its "
                        "host path is in the job's mount list and its page cache is shared",
                        catalog=str(data), bytes=size, limit=limits.data_copy_bytes)
        mount_tmpfs(root, "stimnet-job", size=(size if copy else 0) + JOB_BYTES,
                    inodes=(inodes if copy else 0) + 64, owner=0, mode="0700")
        (root / "job").mkdir(mode=0o755)
        etc = root / "etc"
        etc.mkdir(mode=0o755)
        for fname, body in ETC_FILES.items():
            (etc / fname).write_text(body)
            (etc / fname).chmod(0o644)
        out = root / "out"
        out.mkdir(mode=0o700)
        mount_out_tmpfs(out, limits)
        if not copy:
            return cls(root, data, own_etc=True)
        assert data is not None
        # Links stay links (as a bind shows them); modes are kept, so the sandbox user
        # may read exactly what it could read through a bind.
        shutil.copytree(data, root / "data", symlinks=True)
        (root / "data").chmod(0o755)
        return cls(root, root / "data", own_etc=True)

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
        _unmount_all(self.root)
        shutil.rmtree(self.root, ignore_errors=True)
        if self.root.exists():
            log.warning("sandbox workspace not fully removed (files the container made that "
                        "this user cannot delete)", path=str(self.root))


def _unmount_all(root: Path) -> None:
    for path in (root / "out", root):
        if os.path.ismount(path):
            # Lazy: a container being torn down may still pin the mount for a moment.
            subprocess.run(["umount", "-l", str(path)], check=False, capture_output=True)


def tree_size(top: Path) -> tuple[int, int]:
    """(bytes as a tmpfs holds them: whole pages per file, entries) under `top`."""
    size, entries = 0, 1
    for dirpath, dirnames, filenames in os.walk(top):
        entries += len(dirnames) + len(filenames)
        for fname in filenames:
            try:
                st = os.lstat(os.path.join(dirpath, fname))
            except FileNotFoundError:
                continue
            size += -(-st.st_size // PAGE) * PAGE if stat.S_ISREG(st.st_mode) else PAGE
    return size + (entries * PAGE), entries


def mount_tmpfs(path: Path, source: str, *, size: int, inodes: int, owner: int,
                mode: str) -> None:
    """A size- and inode-capped noexec tmpfs at `path`, named `source` in mount lists.
    Needs root (CAP_SYS_ADMIN)."""
    options = ",".join(("noexec", "nosuid", "nodev", f"size={size}", f"nr_inodes={inodes}",
                        f"uid={owner}", f"gid={owner}", f"mode={mode}"))
    subprocess.run(["mount", "-t", "tmpfs", "-o", options, source, str(path)],
                   check=True, capture_output=True, timeout=30)


def mount_out_tmpfs(out: Path, limits: SandboxLimits) -> None:
    """Put a size- and inode-capped, noexec tmpfs on the output dir.

    The kernel then enforces the result cap exactly (ENOSPC) and the file-count cap, and
    nothing the script writes there can be executed: Docker cannot make a bind mount
    noexec, but a bind of a noexec mount stays noexec. Needs root (CAP_SYS_ADMIN).
    """
    mount_tmpfs(out, "stimnet-out", size=limits.result_bytes, inodes=limits.output_files + 1,
                owner=SANDBOX_UID, mode="0700")


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

    def create(self, name: str, limits: SandboxLimits, data: Path | None = None) -> Workspace:
        """Blocking: make the claimed workspace `name` for a job reading `data` (the
        caller releases the claim if this fails or its wait is cancelled, so a sweep then
        removes what is left)."""
        return Workspace.create(self.parent, limits, self.out_tmpfs, name, data)

    def release(self, name: str) -> None:
        self._own.discard(name)

    def sweep(self) -> None:
        """Blocking: remove every workspace under `parent` this runner has not claimed."""
        if not self.parent.is_dir():
            return
        for entry in self.parent.iterdir():
            if entry.name not in self._own:
                Workspace(entry).remove()
