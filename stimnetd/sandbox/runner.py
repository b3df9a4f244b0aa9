"""Runs one researcher script per job in a fresh, locked-down Docker container.

The container gets no network, a read-only root and catalog, no capabilities, no new
privileges, a non-root user, and hard limits on memory, pids, CPU, wall-clock time,
output size and log size. The daemon decides the image, user, working directory,
command and environment; the researcher supplies only the script bytes.

Every docker-py call blocks, so each goes through ``asyncio.to_thread``; the runner
polls container state instead of parking a thread in ``wait()``, so a burst of long jobs
cannot exhaust the default executor the rest of the daemon shares.

A pre-started "zygote" container per catalog (`prewarm`) has already imported numpy,
pandas, nibabel and the runtime when a job arrives; the job is handed to it by writing
files into its read-only /job mount (see sandbox/runtime/entrypoint.py), and the
wall-clock limit counts from that hand-over. It still serves exactly one job.

The result is read only after the container has stopped (no process can race the
checks), through ``O_NOFOLLOW`` opens relative to the output directory's fd, and only
if it is a regular, singly linked file within the size cap.
"""

from __future__ import annotations

import asyncio
import builtins
import contextlib
import errno
import io
import json
import math
import os
import re
import secrets
import shutil
import stat
import subprocess
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import docker.errors
import numpy as np
import structlog
from docker.types import LogConfig, Mount, Ulimit

from stimnet.query.fields import FieldMeta
from stimnetd.sandbox.image import BUILD_HINT, SandboxImageError

log = structlog.get_logger("stimnetd.sandbox")

KiB = 1024
MiB = 1024 * KiB

LABEL_MANAGED = "org.stimnet.managed"
LABEL_NODE = "org.stimnet.node"
LABEL_JOB = "org.stimnet.job"
RESULT_NAME = "result.json"
ENTRYPOINT = ("python3", "-I", "-B", "/opt/stimnet/entrypoint.py")
SANDBOX_UID = 65534
# The only line of container output the runner interprets; see sandbox/runtime/entrypoint.py.
MARKER_RE = re.compile(r"stimnet-runtime: ([A-Za-z_][A-Za-z0-9_]{0,63}) at line (\d{1,7})\Z")
NPY_NAME_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,63}\.npy\Z")
MAX_LOG_LINES = 2000
MAX_LOG_LINE_CHARS = 2000
POLL_FIRST_S = 0.01
# Caps how far past result_bytes a fast writer gets before the kill (plus RLIMIT_FSIZE
# per file, which the kernel enforces exactly).
POLL_MAX_S = 0.1
SHUTDOWN_GRACE_S = 10.0
# An idle zygote is replaced after this long (the replacement also picks up a rebuilt
# image); it exits by itself ZYGOTE_SELF_EXIT_GRACE_S later in case its daemon is gone.
WARM_MAX_IDLE_S = 600.0
# Two per catalog: a zygote needs ~1 s (start + imports) to get ready, so with one, a
# job arriving soon after another would wait for the refill's imports.
WARM_PER_CATALOG = 2
# A refill (a container start plus about a CPU-second of imports) waits until no job of
# this runner has run for REFILL_QUIET_S, so it does not slow running jobs down; under a
# steady stream of jobs it waits at most REFILL_WAIT_MAX_S.
REFILL_QUIET_S = 0.2
REFILL_WAIT_MAX_S = 5.0
ZYGOTE_SELF_EXIT_GRACE_S = 60.0
GO_NAME = "go"

STATUSES = ("succeeded", "failed", "timeout", "cancelled")
_KNOWN_EXCEPTIONS = frozenset(
    name
    for name, value in vars(builtins).items()
    if isinstance(value, type) and issubclass(value, BaseException)
) | {"gaierror", "herror", "JSONDecodeError", "ParserError", "EmptyDataError", "LinAlgError"}


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
    number come from inside the container).
    """

    status: str
    reason: str
    result: dict[str, Any] | None
    arrays: dict[str, np.ndarray]
    log_lines: list[str]
    duration_s: float
    exit_code: int | None = None
    prewarmed: bool = False


class ResultRefused(Exception):
    """The output directory held something the runner will not read."""


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


def _fmt_bytes(n: int) -> str:
    for unit, size in (("GiB", 1 << 30), ("MiB", MiB), ("KiB", KiB)):
        if n >= size and n % size == 0:
            return f"{n // size} {unit}"
    return f"{n} bytes"


def _fmt_seconds(s: float) -> str:
    return f"{s:g}"


@dataclass
class _Workspace:
    """A per-container host dir: job/ (script + manifest, mounted ro) and out/ (rw)."""

    root: Path

    @property
    def job(self) -> Path:
        return self.root / "job"

    @property
    def out(self) -> Path:
        return self.root / "out"

    @classmethod
    def create(
        cls, parent: Path, limits: SandboxLimits, out_tmpfs: bool, name: str
    ) -> _Workspace:
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
                _mount_out_tmpfs(out, limits)
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

    def remove(self) -> None:
        if os.path.ismount(self.out):
            # Lazy: a container being torn down may still pin the mount for a moment.
            subprocess.run(["umount", "-l", str(self.out)], check=False, capture_output=True)
        shutil.rmtree(self.root, ignore_errors=True)
        if self.root.exists():
            log.warning("sandbox workspace not fully removed (files the container made that "
                        "this user cannot delete)", path=str(self.root))


def _mount_out_tmpfs(out: Path, limits: SandboxLimits) -> None:
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


@dataclass
class _WarmSlot:
    """A started zygote waiting for a job, and the timer that recycles it when idle."""

    container_id: str
    workspace: _Workspace
    expiry: asyncio.TimerHandle | None = None


class _ZygoteLost(Exception):
    """The warm container was gone or dead before the job was handed to it."""


@dataclass
class _Watch:
    """What watching one container found: its final state and why it was stopped."""

    container_id: str
    state: dict[str, Any] = field(default_factory=dict)
    # "cancelled" | "timeout" | "output"; None when the container exited by itself.
    verdict: str | None = None
    overflow: str = ""
    pids_limit_hit: bool = False


@dataclass
class _Job:
    job_id: str
    cancel: asyncio.Event = field(default_factory=asyncio.Event)
    done: asyncio.Event = field(default_factory=asyncio.Event)
    container_id: str | None = None


def _load_npy(data: bytes) -> np.ndarray:
    """A .npy file whose header matches its size: np.load allocates what the header
    claims before reading a byte (a 129-byte file claiming 728 TiB raised MemoryError),
    and would also open a .npz archive or a pickle-bearing object array."""
    fh = io.BytesIO(data)
    try:
        version = np.lib.format.read_magic(fh)
        if version == (1, 0):
            shape, _, dtype = np.lib.format.read_array_header_1_0(fh)
        elif version == (2, 0):
            shape, _, dtype = np.lib.format.read_array_header_2_0(fh)
        else:
            raise ValueError("unsupported .npy version")
    except (ValueError, OSError, EOFError):
        raise ResultRefused("an array file is not a valid .npy file") from None
    if dtype.hasobject or math.prod(shape) * dtype.itemsize != len(data) - fh.tell():
        raise ResultRefused("an array file's header does not match its contents")
    try:
        return np.load(io.BytesIO(data), allow_pickle=False)
    except (ValueError, OSError, EOFError, MemoryError):
        raise ResultRefused("an array file is not a valid .npy file") from None


def _out_usage(out: Path, limit_files: int) -> tuple[int, int, str]:
    """(bytes, entries, problem) of out/, stopping early once entries pass the limit.

    Results are files at the top of out/ (the runtime writes nothing else), so a
    subdirectory is a problem in itself: one the script made unreadable would hide what
    it holds from this count, and from the clean-up when the daemon is not root. Entries
    that vanish while they are counted (a script creating and deleting files) are skipped.
    """
    total = 0
    entries = 0
    try:
        it = os.scandir(out)
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
                return total, entries, "a subdirectory in the output directory (results are files)"
            # Allocated blocks, not apparent size: sparse files cost nothing, a
            # preallocated one costs its blocks.
            total += max(st.st_size if stat.S_ISREG(st.st_mode) else 0, st.st_blocks * 512)
    return total, entries, ""


def _overflow(lim: SandboxLimits, used: int, files: int, *, at_cap: bool) -> str:
    """Which output limit `used`/`files` break, or "".

    `at_cap` (after exit): reaching a limit counts, because the tmpfs (ENOSPC, inode
    count) and RLIMIT_FSIZE stop writes exactly at it, so being there means a write
    was refused.
    """
    over_bytes = used >= lim.result_bytes if at_cap else used > lim.result_bytes
    over_files = files >= lim.output_files if at_cap else files > lim.output_files
    if over_bytes:
        return f"output exceeded result limit {_fmt_bytes(lim.result_bytes)}"
    if over_files:
        return f"output exceeded {lim.output_files} files"
    return ""


def _cgroup_pids_events(container_id: str) -> Path | None:
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


def _pids_limit_hits(path: Path | None) -> int:
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


def _read_capped(dir_fd: int, name: str, what: str, budget: int) -> bytes:
    st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    if stat.S_ISLNK(st.st_mode):
        raise ResultRefused(f"{what} is a symlink: refused")
    if not stat.S_ISREG(st.st_mode):
        raise ResultRefused(f"{what} is not a regular file: refused")
    try:
        # O_NONBLOCK: a FIFO planted under the expected name must not hang the daemon.
        fd = os.open(
            name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=dir_fd
        )
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise ResultRefused(f"{what} is a symlink: refused") from None
        code = errno.errorcode.get(exc.errno or -1, exc.strerror or type(exc).__name__)
        raise ResultRefused(f"{what} cannot be opened ({code})") from None
    try:
        # The checks that count are on the opened file, not on the name looked up above.
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise ResultRefused(f"{what} is not a regular file: refused")
        if st.st_nlink != 1:
            raise ResultRefused(f"{what} has more than one hard link: refused")
        if st.st_size > budget:
            raise ResultRefused(f"{what} is over the result limit: refused")
        with os.fdopen(fd, "rb", closefd=False) as fh:
            data = fh.read(budget + 1)
    finally:
        os.close(fd)
    if len(data) > budget:
        raise ResultRefused(f"{what} is over the result limit")
    return data


def _reject_constant(name: str) -> Any:
    raise ValueError(f"non-finite number {name}")


def _read_outputs(out: Path, cap: int) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    dir_fd = os.open(out, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        try:
            raw = _read_capped(dir_fd, RESULT_NAME, "result file", cap)
        except FileNotFoundError:
            raise ResultRefused("script emitted no aggregates (no result file)") from None
        try:
            doc = json.loads(raw, parse_constant=_reject_constant)
        except (ValueError, RecursionError) as exc:
            raise ResultRefused(f"result file is not valid JSON ({type(exc).__name__})") from None
        if not isinstance(doc, dict):
            raise ResultRefused("result file is not a JSON object")
        budget = cap - len(raw)
        arrays: dict[str, np.ndarray] = {}
        for name in _npy_refs(doc):
            if name in arrays:
                continue
            if not NPY_NAME_RE.match(name):
                raise ResultRefused("an array file name is not a plain *.npy name: refused")
            try:
                # Never the file's name in a reason: the script chose it.
                data = _read_capped(dir_fd, name, "an array file", budget)
            except FileNotFoundError:
                raise ResultRefused("an array file the result refers to is missing") from None
            budget -= len(data)
            arrays[name] = _load_npy(data)
        return doc, arrays
    finally:
        os.close(dir_fd)


def _npy_refs(doc: dict[str, Any]) -> list[str]:
    refs: list[str] = []
    aggregates = doc.get("aggregates")
    if not isinstance(aggregates, list):
        return refs
    for agg in aggregates:
        stats = agg.get("stats") if isinstance(agg, dict) else None
        if not isinstance(stats, dict):
            continue
        for value in stats.values():
            if isinstance(value, dict) and isinstance(value.get("npy"), str):
                refs.append(value["npy"])
    return refs


def _marker(stderr_tail: bytes) -> tuple[str, str] | None:
    """(exception type, line) from the entrypoint's last marker line, if any.

    The reason goes back to the researcher and the script can print anything to stderr,
    so only the strict marker form counts, and an exception class the script could have
    named after a data value (``class Age71(Exception)``) is reported generically.
    """
    for line in reversed(stderr_tail.decode("utf-8", "replace").splitlines()):
        m = MARKER_RE.match(line.strip())
        if m:
            kind = m.group(1) if m.group(1) in _KNOWN_EXCEPTIONS else "an exception"
            return kind, m.group(2)
    return None


_DOCKER_TIME_RE = re.compile(r"(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d)(?:\.(\d+))?Z\Z")


def _finished_before(state: Mapping[str, Any], when: float) -> bool:
    """Whether the engine's FinishedAt (UTC, ns precision) is before `when` (epoch s)."""
    m = _DOCKER_TIME_RE.match(str(state.get("FinishedAt", "")))
    if m is None or m.group(1).startswith("0001-"):
        return False
    whole = datetime.strptime(m.group(1), "%Y-%m-%dT%H:%M:%S").replace(tzinfo=UTC)
    finished = whole.timestamp() + float(f"0.{m.group(2) or 0}")
    return finished < when


def _log_lines(raw: bytes, log_bytes: int) -> list[str]:
    text = raw[-log_bytes:].decode("utf-8", "replace")
    lines = text.splitlines()[-MAX_LOG_LINES:]
    return [line[:MAX_LOG_LINE_CHARS] for line in lines]


class SandboxRunner:
    """Runs job scripts in per-job containers and returns a `SandboxOutcome`.

    `docker_client_factory` returns a ``docker.DockerClient`` (called once, off the loop).
    `node` names this daemon in container labels so `reap_orphans` only touches its own
    containers when several nodes share an engine. `warm_per_catalog`: how many zygotes
    `prewarm` keeps ready per catalog; `warm_max_idle_s`: how long one may wait for a job
    before it is replaced by a fresh one.
    """

    def __init__(
        self,
        docker_client_factory: Callable[[], Any],
        image: str,
        limits: SandboxLimits,
        state_dir: Path,
        *,
        node: str,
        verbose_errors: bool = False,
        out_tmpfs: bool | None = None,
        warm_per_catalog: int = WARM_PER_CATALOG,
        warm_max_idle_s: float = WARM_MAX_IDLE_S,
    ) -> None:
        if not (warm_max_idle_s > 0 and warm_per_catalog >= 1):
            raise ValueError("warm_max_idle_s must be positive and warm_per_catalog at least 1")
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,62}", node):
            raise ValueError(f"node name {node!r} cannot be used in container names")
        self._factory = docker_client_factory
        self._image = image
        self._limits = limits
        self._work = Path(state_dir) / "work"
        self._node = node
        self._verbose_errors = verbose_errors
        self._warm_max_idle_s = warm_max_idle_s
        self._warm_per_catalog = warm_per_catalog
        # None: a tmpfs output mount whenever this process may mount (root); otherwise a
        # plain directory whose size the monitor polls.
        self._out_tmpfs = os.geteuid() == 0 if out_tmpfs is None else out_tmpfs
        self._client: Any = None
        self._client_lock = asyncio.Lock()
        self._jobs: dict[str, _Job] = {}
        # Oldest first: the one most likely to have finished its imports.
        self._warm: dict[Path, list[_WarmSlot]] = {}
        self._warming: dict[Path, int] = {}
        self._keep_warm: set[Path] = set()
        # Names of the workspaces (and so of the containers) this runner made and has not
        # removed yet; `reap_orphans` leaves those alone.
        self._own_workspaces: set[str] = set()
        self._last_job_end = 0.0
        self._tasks: set[asyncio.Task[None]] = set()
        self._closed = False

    # -- public API --------------------------------------------------------------------

    @property
    def node(self) -> str:
        return self._node

    @property
    def out_tmpfs(self) -> bool:
        """Whether job output goes to a capped noexec tmpfs (else a polled directory)."""
        return self._out_tmpfs

    async def run(
        self, job_id: str, script: bytes, catalog_root: Path, manifest: Mapping[str, Any]
    ) -> SandboxOutcome:
        """Run `script` against the catalog at `catalog_root`; never raises for job faults."""
        if self._closed:
            raise RuntimeError("sandbox runner is shut down")
        if job_id in self._jobs:
            raise ValueError(f"job {job_id!r} is already running")
        job = _Job(job_id)
        self._jobs[job_id] = job
        started = time.monotonic()
        workspace: _Workspace | None = None
        root = await asyncio.to_thread(Path(catalog_root).resolve)
        try:
            api = (await self._docker()).api
            while (slot := self._take_warm(root)) is not None:
                workspace, job.container_id = slot.workspace, slot.container_id
                try:
                    return await self._run_in_zygote(api, job, workspace, script, manifest, started)
                except _ZygoteLost:
                    # Died while idle (OOM, an operator's kill or prune, its own idle
                    # exit): nothing of the job ran there; try the next, else a fresh one.
                    log.warning(
                        "warm container lost; using a fresh one", container=slot.container_id
                    )
                    cid, ws = job.container_id, workspace
                    job.container_id = workspace = None
                    await self._dispose_shielded(cid, ws)
            workspace = await self._new_workspace()
            job.container_id = await asyncio.to_thread(self._create, api, workspace, root, job_id)
            await asyncio.to_thread(workspace.write_job, script, manifest)
            if job.cancel.is_set():
                return self._outcome("cancelled", "cancelled before start", started, False)
            await asyncio.to_thread(api.start, job.container_id)
            try:
                return await self._supervise(api, job, workspace, started, False)
            except docker.errors.NotFound:
                return self._outcome(
                    "failed", "sandbox container was removed outside the runner", started, False
                )
        finally:
            self._jobs.pop(job_id, None)
            job.done.set()
            await self._dispose_shielded(job.container_id, workspace)
            self._last_job_end = time.monotonic()

    async def _run_in_zygote(
        self,
        api: Any,
        job: _Job,
        ws: _Workspace,
        script: bytes,
        manifest: Mapping[str, Any],
        started: float,
    ) -> SandboxOutcome:
        """Hand the job to a waiting zygote; raise `_ZygoteLost` if it was not alive."""
        assert job.container_id is not None
        try:
            state = (await asyncio.to_thread(api.inspect_container, job.container_id))["State"]
        except docker.errors.NotFound:
            raise _ZygoteLost from None
        if not state.get("Running"):
            raise _ZygoteLost
        await asyncio.to_thread(ws.write_job, script, manifest)
        if job.cancel.is_set():
            return self._outcome("cancelled", "cancelled before start", started, True)
        handed_at = time.time()
        await asyncio.to_thread(ws.hand_over)
        try:
            return await self._supervise(api, job, ws, started, True, handed_at=handed_at)
        except docker.errors.NotFound:
            return self._outcome(
                "failed", "sandbox container was removed outside the runner", started, True
            )

    def _take_warm(self, root: Path) -> _WarmSlot | None:
        slots = self._warm.get(root)
        if not slots:
            return None
        slot = slots.pop(0)
        if not slots:
            del self._warm[root]
        if slot.expiry is not None:
            slot.expiry.cancel()
        if root in self._keep_warm:
            self._spawn(self._refill(root, wait_quiet=True))
        return slot

    async def cancel(self, job_id: str) -> bool:
        """Stop a running job; its `run` returns status "cancelled". False if unknown."""
        job = self._jobs.get(job_id)
        if job is None:
            return False
        job.cancel.set()
        if job.container_id is not None and self._client is not None:
            await asyncio.to_thread(self._kill, self._client.api, job.container_id)
        return True

    async def prewarm(self, catalog_root: Path) -> None:
        """Create and start zygotes for `catalog_root` (`warm_per_catalog` of them), so the
        next job there skips the container start and the numpy/pandas/nibabel imports.

        Bind mounts are fixed at create time, so the container is created over a fresh,
        empty workspace; the job's script and manifest are written into that workspace
        when the job arrives, then handed over. The slot is refilled after each use, and
        a zygote idle for `warm_max_idle_s` is replaced. Nothing watches an idle zygote's
        clock: the job's wall-clock limit starts at the hand-over. Its memory (the
        imported libraries, ~70 MB) counts against its own container's limit.
        """
        root = await asyncio.to_thread(Path(catalog_root).resolve)
        self._keep_warm.add(root)
        while not self._closed and (
            len(self._warm.get(root, ())) + self._warming.get(root, 0) < self._warm_per_catalog
        ):
            self._warming[root] = self._warming.get(root, 0) + 1
            try:
                slot = await self._start_zygote_shielded(root)
            finally:
                self._warming[root] -= 1
                if not self._warming[root]:
                    del self._warming[root]
            if slot is None:
                return
            self._warm.setdefault(root, []).append(slot)

    async def _start_zygote_shielded(self, root: Path) -> _WarmSlot | None:
        # Cancelling a to_thread call does not stop the thread: a container created after
        # the cancel would never be removed. Let the start finish, then undo it.
        task = asyncio.get_running_loop().create_task(self._start_zygote(root))
        try:
            return await asyncio.shield(task)
        except asyncio.CancelledError:
            await asyncio.wait([task])
            if not task.cancelled() and task.exception() is None and task.result() is not None:
                slot = task.result()
                assert slot is not None
                if slot.expiry is not None:
                    slot.expiry.cancel()
                await self._dispose_shielded(slot.container_id, slot.workspace)
            raise

    async def _start_zygote(self, root: Path) -> _WarmSlot | None:
        api = (await self._docker()).api
        workspace = await self._new_workspace()
        cid: str | None = None
        try:
            cid = await asyncio.to_thread(self._create, api, workspace, root, "", zygote=True)
            await asyncio.to_thread(api.start, cid)
        except BaseException:
            await self._dispose_shielded(cid, workspace)
            raise
        if self._closed:
            await self._dispose_shielded(cid, workspace)
            return None
        slot = _WarmSlot(cid, workspace)
        slot.expiry = asyncio.get_running_loop().call_later(
            self._warm_max_idle_s, self._expire, root, slot
        )
        return slot

    def _expire(self, root: Path, slot: _WarmSlot) -> None:
        slots = self._warm.get(root, [])
        if self._closed or slot not in slots:
            return
        slots.remove(slot)
        if not slots:
            del self._warm[root]
        self._spawn(self._recycle(root, slot))

    async def _recycle(self, root: Path, slot: _WarmSlot) -> None:
        """Replace a zygote that waited too long: start the new one, then drop the old."""
        try:
            if root in self._keep_warm:
                await self._refill(root)
        finally:
            await self._dispose_shielded(slot.container_id, slot.workspace)

    async def _refill(self, root: Path, wait_quiet: bool = False) -> None:
        if wait_quiet:
            give_up = time.monotonic() + REFILL_WAIT_MAX_S
            while time.monotonic() < give_up and (
                self._jobs or time.monotonic() - self._last_job_end < REFILL_QUIET_S
            ):
                await asyncio.sleep(0.05)
        try:
            await self.prewarm(root)
        except Exception:  # noqa: BLE001 - a failed refill only costs the next job latency
            log.warning("prewarm refill failed", exc_info=True)

    async def reap_orphans(self) -> int:
        """Remove every container this node left behind (crash, kill -9); return how many.

        Call once at startup, before `prewarm`. A job (e.g. one re-queued after the crash)
        may already be running: containers this runner made are told apart by name, as a
        re-queued job's old and new containers carry the same job label.
        """
        client = await self._docker()
        filters = {"label": [f"{LABEL_MANAGED}=true", f"{LABEL_NODE}={self._node}"]}
        containers = await asyncio.to_thread(client.api.containers, all=True, filters=filters)
        removed = 0
        for c in containers:
            # Checked per container, after the listing: a job may create one meanwhile,
            # and its name is known here before the engine is even asked to create it.
            mine = {f"/stimnet-{self._node}-{name}" for name in self._own_workspaces}
            if set(c.get("Names") or ()) & mine:
                continue
            await asyncio.to_thread(self._remove, client.api, c["Id"])
            removed += 1
        await asyncio.to_thread(self._sweep_workspaces)
        return removed

    async def shutdown(self) -> None:
        """Cancel running jobs, remove warm containers. Idempotent."""
        self._closed = True
        self._keep_warm.clear()
        for task in list(self._tasks):
            task.cancel()
        for job_id in list(self._jobs):
            await self.cancel(job_id)
        waiting = [j.done.wait() for j in self._jobs.values()]
        if waiting:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.gather(*waiting), SHUTDOWN_GRACE_S)
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        while self._warm:
            _, slots = self._warm.popitem()
            for slot in slots:
                if slot.expiry is not None:
                    slot.expiry.cancel()
                await self._dispose_shielded(slot.container_id, slot.workspace)
        if self._client is not None:
            client, self._client = self._client, None
            await asyncio.to_thread(client.close)

    # -- internals ---------------------------------------------------------------------

    async def _docker(self) -> Any:
        async with self._client_lock:
            if self._client is None:
                self._client = await asyncio.to_thread(self._factory)
            return self._client

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _create(
        self, api: Any, ws: _Workspace, catalog_root: Path, job_id: str, *, zygote: bool = False
    ) -> str:
        try:
            return self._create_container(api, ws, catalog_root, job_id, zygote)
        except docker.errors.ImageNotFound:
            msg = f"sandbox image {self._image} not found; {BUILD_HINT}"
            raise SandboxImageError(msg) from None

    def _create_container(
        self, api: Any, ws: _Workspace, catalog_root: Path, job_id: str, zygote: bool
    ) -> str:

        lim = self._limits
        threads = str(max(1, math.ceil(lim.cpus)))
        env = {
            "LANG": "C.UTF-8",
            "HOME": "/tmp",
            # BLAS sizes its pool from the host's core count, not the CPU quota; more
            # threads than quota only adds contention (and pids).
            "OPENBLAS_NUM_THREADS": threads,
            "OMP_NUM_THREADS": threads,
            "MPLCONFIGDIR": "/tmp",
        }
        if self._verbose_errors:
            env["STIMNET_VERBOSE_ERRORS"] = "1"
        if zygote:
            env["STIMNET_ZYGOTE"] = "1"
            env["STIMNET_ZYGOTE_IDLE_S"] = str(self._warm_max_idle_s + ZYGOTE_SELF_EXIT_GRACE_S)
        host_config = api.create_host_config(
            network_mode="none",
            read_only=True,
            tmpfs={"/tmp": f"rw,noexec,nosuid,nodev,size={lim.tmpfs_bytes}"},
            cap_drop=["ALL"],
            security_opt=["no-new-privileges"],
            pids_limit=lim.pids,
            mem_limit=lim.memory_bytes,
            memswap_limit=lim.memory_bytes,
            nano_cpus=int(lim.cpus * 1e9),
            shm_size=lim.tmpfs_bytes,
            ipc_mode="private",
            init=True,
            oom_score_adj=1000,
            ulimits=[
                Ulimit(name="core", soft=0, hard=0),
                # Kernel-enforced per-file cap; the monitor's total-size check polls.
                Ulimit(name="fsize", soft=lim.result_bytes, hard=lim.result_bytes),
                Ulimit(name="nofile", soft=1024, hard=1024),
            ],
            mounts=[
                Mount("/data", str(catalog_root), type="bind", read_only=True),
                Mount("/job", str(ws.job), type="bind", read_only=True),
                Mount("/out", str(ws.out), type="bind", read_only=False),
            ],
            log_config=LogConfig(
                type="json-file",
                config={"max-size": f"{max(1, lim.log_bytes // KiB)}k", "max-file": "1"},
            ),
            auto_remove=False,
            privileged=False,
        )
        container = api.create_container(
            image=self._image,
            entrypoint=list(ENTRYPOINT),
            command=[],
            user=f"{SANDBOX_UID}:{SANDBOX_UID}",
            working_dir="/job",
            environment=env,
            hostname="stimnet-job",
            network_disabled=True,
            labels={LABEL_MANAGED: "true", LABEL_NODE: self._node, LABEL_JOB: job_id},
            name=f"stimnet-{self._node}-{ws.root.name}",
            host_config=host_config,
        )
        return str(container["Id"])

    async def _supervise(
        self,
        api: Any,
        job: _Job,
        ws: _Workspace,
        started: float,
        prewarmed: bool,
        *,
        handed_at: float | None = None,
    ) -> SandboxOutcome:
        watch = await self._watch(api, job, ws)
        if (
            handed_at is not None
            and watch.verdict is None
            and _finished_before(watch.state, handed_at)
        ):
            # A zygote that died in the moment between its liveness check and the
            # hand-over never saw the job.
            raise _ZygoteLost
        raw_logs = await asyncio.to_thread(self._logs, api, watch.container_id)
        log_lines = _log_lines(raw_logs, self._limits.log_bytes)
        status, reason, result, arrays = await self._judge(api, ws, watch)
        return self._outcome(
            status,
            reason,
            started,
            prewarmed,
            result=result,
            arrays=arrays,
            log_lines=log_lines,
            exit_code=watch.state.get("ExitCode"),
        )

    async def _watch(self, api: Any, job: _Job, ws: _Workspace) -> _Watch:
        """Poll until the container stops, killing it when a limit is crossed."""
        lim = self._limits
        assert job.container_id is not None
        watch = _Watch(job.container_id)
        deadline = time.monotonic() + lim.timeout_s
        interval = POLL_FIRST_S
        pids_path = await asyncio.to_thread(_cgroup_pids_events, watch.container_id)
        while True:
            info = await asyncio.to_thread(api.inspect_container, watch.container_id)
            watch.state = info["State"]
            if not watch.state.get("Running") and watch.state.get("Status") != "created":
                if job.cancel.is_set():
                    # cancel() kills directly, so the exit may be the cancel's SIGKILL.
                    watch.verdict = "cancelled"
                return watch
            hits = await asyncio.to_thread(_pids_limit_hits, pids_path)
            watch.pids_limit_hit = watch.pids_limit_hit or hits > 0
            if job.cancel.is_set():
                watch.verdict = "cancelled"
            elif time.monotonic() >= deadline:
                watch.verdict = "timeout"
            else:
                used, files, problem = await asyncio.to_thread(_out_usage, ws.out,
                                                               lim.output_files)
                watch.overflow = problem or _overflow(lim, used, files, at_cap=False)
                if watch.overflow:
                    watch.verdict = "output"
            if watch.verdict is not None:
                await asyncio.to_thread(self._kill, api, watch.container_id)
                watch.state = await self._stopped_state(api, watch.container_id)
                return watch
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(
                    job.cancel.wait(), max(0.0, min(interval, deadline - time.monotonic()))
                )
            interval = min(interval * 1.5, POLL_MAX_S)

    async def _judge(
        self, api: Any, ws: _Workspace, watch: _Watch
    ) -> tuple[str, str, dict[str, Any] | None, dict[str, np.ndarray] | None]:
        """(status, reason, result, arrays) for a stopped container. Reasons name the
        limit; nothing in them is taken from the container except via `_marker`."""
        lim = self._limits
        pids_note = f"process limit {lim.pids} reached" if watch.pids_limit_hit else ""
        if watch.verdict == "cancelled":
            return "cancelled", "cancelled", None, None
        if watch.verdict == "timeout":
            note = f" ({pids_note})" if pids_note else ""
            wall = f"exceeded wall-clock limit {_fmt_seconds(lim.timeout_s)} s{note}"
            return "timeout", wall, None, None
        if watch.verdict == "output":
            return "failed", f"{watch.overflow} (killed)", None, None
        if watch.state.get("OOMKilled"):
            memory = _fmt_bytes(lim.memory_bytes)
            return "failed", f"memory limit {memory} exceeded (OOM-killed)", None, None
        used, files, problem = await asyncio.to_thread(_out_usage, ws.out, lim.output_files)
        if problem:
            return "failed", problem, None, None
        overflow = _overflow(lim, used, files, at_cap=True)
        if overflow:
            return "failed", f"{overflow} (write refused)", None, None
        exit_code = watch.state.get("ExitCode")
        if exit_code != 0:
            marker = _marker(await asyncio.to_thread(self._stderr_tail, api, watch.container_id))
            if marker:
                what = f"script raised {marker[0]} at line {marker[1]}"
            elif exit_code == 137:
                # cgroup v1 can SIGKILL for memory without setting OOMKilled.
                memory = _fmt_bytes(lim.memory_bytes)
                what = f"script was killed (SIGKILL; memory limit {memory}?)"
            else:
                what = f"script exited with status {exit_code}"
            if not pids_note and marker and marker[0] == "BlockingIOError":
                # A bomb that dies fast takes its cgroup (and the pids.events counter the
                # monitor reads) with it; in a container with no network and no
                # RLIMIT_NPROC, EAGAIN almost always means fork/clone hit pids.max.
                pids_note = f"process limit {lim.pids} likely reached (fork refused)"
            return "failed", f"{pids_note}; {what}" if pids_note else what, None, None
        try:
            doc, arrays = await asyncio.to_thread(_read_outputs, ws.out, lim.result_bytes)
        except ResultRefused as exc:
            return "failed", str(exc), None, None
        return "succeeded", "ok", doc, arrays

    async def _stopped_state(self, api: Any, cid: str) -> dict[str, Any]:
        # SIGKILL is asynchronous; the state (and OOMKilled) settles a moment later.
        for _ in range(200):
            state = (await asyncio.to_thread(api.inspect_container, cid))["State"]
            if not state.get("Running"):
                return dict(state)
            await asyncio.sleep(0.025)
        return dict(state)

    def _outcome(
        self,
        status: str,
        reason: str,
        started: float,
        prewarmed: bool,
        *,
        result: dict[str, Any] | None = None,
        arrays: dict[str, np.ndarray] | None = None,
        log_lines: list[str] | None = None,
        exit_code: int | None = None,
    ) -> SandboxOutcome:
        return SandboxOutcome(
            status=status,
            reason=reason,
            result=result,
            arrays=arrays or {},
            log_lines=log_lines or [],
            duration_s=time.monotonic() - started,
            exit_code=exit_code,
            prewarmed=prewarmed,
        )

    def _logs(self, api: Any, cid: str) -> bytes:
        # json-file's max-size bounds what the engine keeps, so this read is bounded too.
        try:
            return bytes(api.logs(cid, stdout=True, stderr=True, stream=False))
        except docker.errors.APIError:
            return b""

    def _stderr_tail(self, api: Any, cid: str) -> bytes:
        try:
            return bytes(api.logs(cid, stdout=False, stderr=True, stream=False, tail=20))
        except docker.errors.APIError:
            return b""

    @staticmethod
    def _kill(api: Any, cid: str) -> None:
        with contextlib.suppress(docker.errors.NotFound, docker.errors.APIError):
            api.kill(cid)

    @staticmethod
    def _remove(api: Any, cid: str) -> None:
        with contextlib.suppress(docker.errors.NotFound):
            api.remove_container(cid, force=True, v=True)

    async def _new_workspace(self) -> _Workspace:
        # Claimed before the directory exists, so a concurrent sweep never takes it.
        name = secrets.token_hex(8)
        self._own_workspaces.add(name)
        try:
            return await asyncio.to_thread(
                _Workspace.create, self._work, self._limits, self._out_tmpfs, name
            )
        except BaseException:
            self._own_workspaces.discard(name)
            raise

    async def _dispose_shielded(self, cid: str | None, ws: _Workspace | None) -> None:
        async def dispose() -> None:
            if cid is not None and self._client is not None:
                await asyncio.to_thread(self._remove, self._client.api, cid)
            if ws is not None:
                await asyncio.to_thread(ws.remove)
                self._own_workspaces.discard(ws.root.name)

        # A cancelled job task must still remove its container: finish the removal even
        # if the awaiting task is cancelled again while it runs.
        task = asyncio.get_running_loop().create_task(dispose())
        try:
            await asyncio.shield(task)
        except asyncio.CancelledError:
            await asyncio.wait([task])
            raise

    def _sweep_workspaces(self) -> None:
        if not self._work.is_dir():
            return
        for entry in self._work.iterdir():
            # A re-queued job may be running already; its workspace is one of ours.
            if entry.name not in self._own_workspaces:
                _Workspace(entry).remove()
