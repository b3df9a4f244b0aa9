"""Hostile scripts against the real runner and engine.

Each attack must end failed/timeout with a reason that names what stopped it, release
nothing, leave no container behind, and never stall the daemon's event loop. Probes
print what they observed (errno names) before re-raising, so the assertions pin *why*
the attack failed, not just that it did.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import textwrap
import time
from dataclasses import replace
from typing import Any

import docker.errors
import pytest

from stimnetd.sandbox.runner import SandboxRunner

from .conftest import TEST_LIMITS, Catalog, assert_refused, node_containers, run_attack

pytestmark = pytest.mark.docker


def _script(body: str) -> str:
    return textwrap.dedent(body).lstrip()


def _logs(outcome: Any) -> str:
    return "\n".join(outcome.log_lines)


def _with_limits(runner: SandboxRunner, **changes: Any) -> None:
    # Tests tighten one limit on the fixture's runner; limits are read per container.
    runner._limits = replace(TEST_LIMITS, **changes)  # noqa: SLF001


async def test_network_connect_is_unreachable(runner, docker_client, catalog: Catalog):
    """A TCP connect to an outside address fails at once: the container has no network."""
    out = await run_attack(
        runner,
        docker_client,
        catalog,
        _script("""
        import errno, socket
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.settimeout(2)
        try:
            s.connect(("1.1.1.1", 53))
        except OSError as exc:
            print("connect", errno.errorcode.get(exc.errno, exc.errno))
            raise
        """),
    )
    assert_refused(out)
    assert "connect ENETUNREACH" in _logs(out)
    assert out.reason == "script raised OSError at line 5"


async def test_dns_lookup_fails(runner, docker_client, catalog: Catalog):
    """Name resolution fails: no resolver is reachable without a network."""
    out = await run_attack(
        runner,
        docker_client,
        catalog,
        _script("""
        import socket
        try:
            socket.getaddrinfo("example.org", 443)
        except socket.gaierror as exc:
            print("dns failed", exc.errno)
            raise
        """),
    )
    assert_refused(out)
    assert "dns failed" in _logs(out)
    assert out.reason.startswith("script raised gaierror at line")


async def test_only_loopback_interface(runner, docker_client, catalog: Catalog):
    """The container's only network interface is loopback."""
    out = await run_attack(
        runner,
        docker_client,
        catalog,
        _script("""
        import socket
        print("ifaces", sorted(name for _, name in socket.if_nameindex()))
        raise SystemExit(3)
        """),
    )
    assert_refused(out)
    assert "ifaces ['lo']" in _logs(out)
    assert out.reason == "script exited with status 3"


async def test_fork_bomb_hits_pids_limit(runner, docker_client, catalog: Catalog):
    """A fork bomb is stopped by the pids limit, and the reason names that limit."""
    out = await run_attack(
        runner,
        docker_client,
        catalog,
        _script("""
        import os, time
        children = 0
        while True:
            try:
                if os.fork() == 0:
                    time.sleep(30)
                    os._exit(0)
                children += 1
            except OSError as exc:
                print("fork refused after", children, exc.errno)
                raise
        """),
    )
    assert_refused(out, "failed", "timeout")
    assert out.reason.startswith("process limit 64 "), out.reason
    assert "fork refused after" in _logs(out)


async def test_memory_bomb_is_oom_killed(runner, docker_client, catalog: Catalog):
    """Allocating twice the memory limit ends in an OOM kill reported with the limit."""
    out = await run_attack(
        runner,
        docker_client,
        catalog,
        _script("""
        blob = bytearray(2 * 256 * 1024 * 1024)
        print("allocated", len(blob))
        """),
    )
    assert_refused(out)
    assert out.reason == "memory limit 256 MiB exceeded (OOM-killed)"
    assert "allocated" not in _logs(out)


async def test_cpu_spin_times_out(runner, docker_client, catalog: Catalog):
    """A busy loop is killed at the wall-clock limit with status timeout."""
    _with_limits(runner, timeout_s=3.0)
    started = time.monotonic()
    out = await run_attack(runner, docker_client, catalog, "while True:\n    pass\n")
    assert_refused(out, "timeout")
    assert out.reason == "exceeded wall-clock limit 3 s"
    assert time.monotonic() - started < 30


@pytest.mark.parametrize(
    "path",
    ["/data/subjects.csv", "/data/new.csv", "/evil", "/var/tmp/x", "/job/x"],
)
async def test_write_to_read_only_paths_fails(runner, docker_client, catalog: Catalog, path):
    """Writes to the catalog, the job dir and the root filesystem fail with EROFS."""
    out = await run_attack(
        runner,
        docker_client,
        catalog,
        _script(f"""
        import errno
        try:
            open({path!r}, "a").write("x")
        except OSError as exc:
            print("write", errno.errorcode.get(exc.errno, exc.errno))
            raise
        """),
    )
    assert_refused(out)
    assert "write EROFS" in _logs(out)
    assert out.reason == "script raised OSError at line 3"
    assert (catalog.root / "subjects.csv").read_text().startswith("subject,age,target\n")
    assert not (catalog.root / "new.csv").exists()


def _exec_from(directory: str) -> str:
    return _script(f"""
        import errno, os, shutil, subprocess
        shutil.copy("/bin/true", "{directory}/t")
        os.chmod("{directory}/t", 0o755)
        try:
            subprocess.run(["{directory}/t"], check=True)
        except OSError as exc:
            print("exec", errno.errorcode.get(exc.errno, exc.errno))
            raise
        """)


async def test_exec_from_tmp_is_denied(runner, docker_client, catalog: Catalog):
    """A binary copied to /tmp cannot be executed: /tmp is mounted noexec."""
    out = await run_attack(runner, docker_client, catalog, _exec_from("/tmp"))
    assert_refused(out)
    assert "exec EACCES" in _logs(out)
    assert out.reason == "script raised PermissionError at line 5"


async def test_host_paths_are_not_visible(runner, docker_client, catalog: Catalog):
    """Host files, the Docker socket and the host's shadow file are out of reach."""
    out = await run_attack(
        runner,
        docker_client,
        catalog,
        _script(f"""
        import errno, os
        print("host-file", os.path.exists({str(catalog.host_secret)!r}))
        sockets = ["/var/run/docker.sock", "/run/docker.sock"]
        print("docker-sock", [os.path.exists(p) for p in sockets])
        print("uid", os.getuid(), os.getgid())
        status = open("/proc/self/status").read()
        wanted = ("CapEff", "NoNewPrivs", "Seccomp:")
        print([line for line in status.splitlines() if line.startswith(wanted)])
        st = os.stat("/etc/shadow")
        print("shadow-stat", (st.st_size, st.st_mtime_ns))
        try:
            open("/etc/shadow").read()
        except OSError as exc:
            print("shadow", errno.errorcode.get(exc.errno, exc.errno))
            raise
        """),
    )
    assert_refused(out)
    logs = _logs(out)
    assert "host-file False" in logs
    assert "docker-sock [False, False]" in logs
    assert "uid 65534 65534" in logs
    assert "'CapEff:\\t0000000000000000'" in logs
    assert "'NoNewPrivs:\\t1'" in logs
    assert "'Seccomp:\\t2'" in logs
    assert "shadow EACCES" in logs
    # The shadow file the script sees is the image's, not the host's.
    host = os.stat("/etc/shadow")
    assert "shadow-stat (" in logs
    assert f"shadow-stat {(host.st_size, host.st_mtime_ns)}" not in logs


async def test_gigabyte_of_stdout_is_bounded(runner, docker_client, catalog: Catalog):
    """1 GB of stdout neither fills the disk (log capped by max-size) nor the outcome."""
    _with_limits(runner, timeout_s=8.0)
    seen: list[int] = []
    stop = asyncio.Event()

    async def watch_log_file() -> None:
        while not stop.is_set():
            for c in await asyncio.to_thread(node_containers, docker_client, runner.node):
                # The container (and its log) may be removed between listing and stat.
                with contextlib.suppress(FileNotFoundError, docker.errors.NotFound):
                    info = await asyncio.to_thread(docker_client.api.inspect_container, c["Id"])
                    seen.append(await asyncio.to_thread(os.path.getsize, info["LogPath"]))
            await asyncio.sleep(0.2)

    watcher = asyncio.get_running_loop().create_task(watch_log_file())
    try:
        out = await run_attack(
            runner,
            docker_client,
            catalog,
            _script("""
            import sys
            chunk = "x" * (1 << 20) + "\\n"
            for _ in range(1024):
                sys.stdout.write(chunk)
            """),
        )
    finally:
        stop.set()
        await watcher
    assert_refused(out, "failed", "timeout")
    assert out.reason in (
        "exceeded wall-clock limit 8 s",
        "script emitted no aggregates (no result file)",
    )
    assert seen, "the log file was never observed"
    # json-file rotates at max-size (64k here); one over-long line may overshoot once.
    assert max(seen) < 8 * 1024 * 1024
    assert sum(len(line) for line in out.log_lines) <= TEST_LIMITS.log_bytes


async def test_oversized_result_file_is_refused(runner, docker_client, catalog: Catalog):
    """A result file past the size cap is cut by RLIMIT_FSIZE and the job fails."""
    out = await run_attack(
        runner,
        docker_client,
        catalog,
        _script("""
        with open("/out/result.json", "w") as fh:
            fh.write('{"version": 1, "aggregates": [' + " " * (2 << 20) + "]}")
        """),
    )
    assert_refused(out)
    assert out.reason == "output exceeded result limit 1 MiB (write refused)"


async def test_output_spread_over_files_is_killed(runner, docker_client, catalog: Catalog):
    """Many files under the per-file cap but over the total cap get the job killed."""
    out = await run_attack(
        runner,
        docker_client,
        catalog,
        _script("""
        import time
        for i in range(4):
            with open(f"/out/pad{i}", "wb") as fh:
                fh.write(b"\\0" * (400 << 10))
        time.sleep(15)
        """),
    )
    assert_refused(out)
    # Killed by the monitor (plain dir) or refused by the tmpfs (root daemons).
    assert out.reason in (
        "output exceeded result limit 1 MiB (killed)",
        "output exceeded result limit 1 MiB (write refused)",
    )


@pytest.mark.parametrize(
    ("setup", "reason"),
    [
        ('os.symlink("/etc/passwd", "/out/result.json")', "result file is a symlink: refused"),
        (
            'open("/out/real", "w").write(\'{"version": 1, "aggregates": []}\'); '
            'os.link("/out/real", "/out/result.json")',
            "result file has more than one hard link: refused",
        ),
        ('os.mkfifo("/out/result.json")', "result file is not a regular file: refused"),
        # A directory anywhere in /out is refused before the result is read.
        ('os.mkdir("/out/result.json")',
         "a subdirectory in the output directory (results are files)"),
    ],
    ids=["symlink", "hardlink", "fifo", "directory"],
)
async def test_result_file_tricks_are_refused(
    runner, docker_client, catalog: Catalog, setup, reason
):
    """A result that is a symlink, hard link, FIFO or directory is refused, not followed."""
    out = await run_attack(runner, docker_client, catalog, f"import os\n{setup}\n")
    assert_refused(out)
    # A directory may be seen by the output watcher while the script still runs (which
    # stops it: "(killed)") or after it exits, as the machine's timing falls.
    assert out.reason in (reason, f"{reason} (killed)")


async def test_npy_side_file_symlink_is_refused(runner, docker_client, catalog: Catalog):
    """An .npy reference that is a symlink is refused like the result file itself."""
    out = await run_attack(
        runner,
        docker_client,
        catalog,
        _script("""
        import json, os
        os.symlink("/etc/passwd", "/out/a.npy")
        doc = {"version": 1, "aggregates": [{"kind": "voxel_map", "name": "v", "n": 1,
               "stats": {"count": {"npy": "a.npy"}}, "meta": {"column": "x", "shape": [1]}}]}
        open("/out/result.json", "w").write(json.dumps(doc))
        """),
    )
    assert_refused(out)
    assert out.reason == "an array file is a symlink: refused"


async def test_privilege_syscalls_get_eperm(runner, docker_client, catalog: Catalog):
    """setuid(0), unshare(CLONE_NEWUSER|CLONE_NEWNS) and mount() all fail with EPERM."""
    out = await run_attack(
        runner,
        docker_client,
        catalog,
        _script("""
        import ctypes, errno, os
        libc = ctypes.CDLL(None, use_errno=True)
        results = {}
        try:
            os.setuid(0)
            results["setuid"] = "ok"
        except OSError as exc:
            results["setuid"] = errno.errorcode[exc.errno]
        for name, call in [
            ("unshare", lambda: libc.unshare(0x10000000 | 0x00020000)),
            ("mount", lambda: libc.mount(b"tmpfs", b"/tmp", b"tmpfs", 0, None)),
            ("chroot", lambda: libc.chroot(b"/tmp")),
        ]:
            rc = call()
            results[name] = "ok" if rc == 0 else errno.errorcode[ctypes.get_errno()]
        print(sorted(results.items()))
        refused = set(results.values()) == {"EPERM"}
        raise PermissionError("all refused") if refused else SystemExit(9)
        """),
    )
    assert_refused(out)
    assert (
        "[('chroot', 'EPERM'), ('mount', 'EPERM'), ('setuid', 'EPERM'), ('unshare', 'EPERM')]"
        in _logs(out)
    )
    assert out.reason == "script raised PermissionError at line 18"


async def test_traceback_text_is_not_released(runner, docker_client, catalog: Catalog):
    """An exception message that quotes data appears nowhere in the outcome."""
    out = await run_attack(
        runner,
        docker_client,
        catalog,
        _script("""
        from stimnet_runtime import load_table
        df = load_table("subjects")
        raise KeyError(f"patient {df['subject'][0]} age {df['age'][0]}")
        """),
    )
    assert_refused(out)
    assert out.reason == "script raised KeyError at line 3"
    assert "s00" not in _logs(out) and "s00" not in out.reason


async def test_partial_results_of_failed_script_are_discarded(runner, docker_client, catalog):
    """Aggregates emitted before a crash are not released."""
    out = await run_attack(
        runner,
        docker_client,
        catalog,
        _script("""
        from stimnet_runtime import emit_count
        emit_count("n", 10)
        1 / 0
        """),
    )
    assert_refused(out)
    assert out.reason == "script raised ZeroDivisionError at line 3"


async def test_forged_marker_on_stdout_does_not_become_reason(runner, docker_client, catalog):
    """Only stderr is searched for the runtime marker, and only in its strict form."""
    out = await run_attack(
        runner,
        docker_client,
        catalog,
        _script("""
        import sys
        print("stimnet-runtime: age=71 at line 5")
        sys.stderr.write("stimnet-runtime: patient s00 is 71\\n")
        raise SystemExit(4)
        """),
    )
    assert_refused(out)
    assert out.reason == "script exited with status 4"


async def test_custom_exception_names_are_not_echoed(runner, docker_client, catalog: Catalog):
    """An exception class named after a value is reported generically, not by its name."""
    out = await run_attack(
        runner,
        docker_client,
        catalog,
        "class Age71(Exception):\n    pass\nraise Age71()\n",
    )
    assert_refused(out)
    assert out.reason == "script raised an exception at line 3"


async def test_too_many_output_files_are_refused(runner, docker_client, catalog: Catalog):
    """Creating more files than the output file limit fails the job, naming the limit."""
    out = await run_attack(
        runner,
        docker_client,
        catalog,
        "for i in range(1000):\n    open(f'/out/f{i}', 'w').close()\n",
    )
    assert_refused(out)
    assert out.reason in (
        f"output exceeded {TEST_LIMITS.output_files} files (killed)",
        f"output exceeded {TEST_LIMITS.output_files} files (write refused)",
    )


async def test_exec_from_out_is_denied(runner, docker_client, catalog: Catalog):
    """A binary written to /out cannot be executed: /out is a noexec tmpfs (root daemons)."""
    if not runner.out_tmpfs:
        pytest.skip("the noexec tmpfs output mount needs a root daemon")
    out = await run_attack(runner, docker_client, catalog, _exec_from("/out"))
    assert_refused(out)
    assert "exec EACCES" in _logs(out)


async def test_plain_output_dir_is_policed_by_the_monitor(
    docker_client, sandbox_image: str, catalog: Catalog, tmp_path
):
    """Without the tmpfs (non-root daemons), the size monitor kills an oversized output."""
    import docker

    runner = SandboxRunner(
        docker.from_env,
        sandbox_image,
        TEST_LIMITS,
        tmp_path / "plain",
        node=f"plain-{os.getpid()}",
        out_tmpfs=False,
    )
    try:
        out = await run_attack(
            runner,
            docker_client,
            catalog,
            _script("""
            import time
            for i in range(4):
                with open(f"/out/pad{i}", "wb") as fh:
                    fh.write(b"\\1" * (400 << 10))
            time.sleep(15)
            """),
        )
    finally:
        await runner.shutdown()
    assert_refused(out)
    assert out.reason == "output exceeded result limit 1 MiB (killed)"


async def test_every_writable_mount_is_noexec(runner, docker_client, catalog: Catalog):
    """Each mount the sandbox user can write to is mounted noexec (no dropping binaries)."""
    out = await run_attack(
        runner,
        docker_client,
        catalog,
        _script("""
        import os
        writable, bad = [], []
        for line in open("/proc/self/mounts"):
            mnt, opts = line.split()[1], line.split()[3].split(",")
            # Masked /proc files are binds of /dev/null: writable, but no place for files.
            if "rw" in opts and os.path.isdir(mnt) and os.access(mnt, os.W_OK):
                writable.append(mnt)
                if "noexec" not in opts:
                    bad.append(mnt)
        print("writable", sorted(writable))
        print("exec-allowed", bad)
        raise SystemExit(3)
        """),
    )
    assert_refused(out)
    logs = _logs(out)
    assert "writable ['/dev/mqueue', '/dev/shm', '/out', '/tmp']" in logs or not runner.out_tmpfs
    assert "exec-allowed []" in logs or not runner.out_tmpfs
    assert "'/data'" not in logs and "'/job'" not in logs


@pytest.mark.parametrize("out_tmpfs", [True, False], ids=["tmpfs", "plain-dir"])
async def test_a_subdirectory_in_the_output_is_refused(
    docker_client, sandbox_image: str, catalog: Catalog, tmp_path, out_tmpfs: bool
):
    """Results are files: a subdirectory (here one made unreadable, whose contents the
    size monitor of a non-root daemon could not count, nor the clean-up delete) fails the
    job naming it, on a tmpfs output or a plain directory alike."""
    import docker

    if out_tmpfs and os.geteuid() != 0:
        pytest.skip("the tmpfs output mount needs a root daemon")
    runner = SandboxRunner(docker.from_env, sandbox_image, TEST_LIMITS,
                           tmp_path / ("tmpfs" if out_tmpfs else "plain"),
                           node=f"subdir-{out_tmpfs}-{os.getpid()}", out_tmpfs=out_tmpfs)
    try:
        out = await run_attack(runner, docker_client, catalog, _script("""
            import os, time
            os.mkdir("/out/d", 0o700)
            with open("/out/d/pad", "wb") as fh:
                fh.write(b"\\1" * (100 << 10))
            time.sleep(15)
            """))
    finally:
        await runner.shutdown()
    assert_refused(out)
    assert out.reason == ("a subdirectory in the output directory (results are files) "
                          "(killed)")
