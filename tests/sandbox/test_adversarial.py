"""Hostile scripts against the real runner and engine: confinement.

Each attack must end failed/timeout with a reason that names what stopped it, release
nothing, leave no container behind, and never block the daemon's event loop. Probes
print what they observed (errno names) before re-raising, so the assertions pin *why*
the attack failed, not just that it did. The attacks on the output directory and the
result are in test_adversarial_outputs.py.
"""

from __future__ import annotations

import os

import pytest

from .conftest import (
    Catalog,
    assert_refused,
    dedent_script,
    logs_of,
    run_attack,
    with_limits,
)

pytestmark = pytest.mark.docker


async def test_network_connect_is_unreachable(runner, docker_client, catalog: Catalog):
    """A TCP connect to an outside address fails at once: the container has no network."""
    out = await run_attack(
        runner,
        docker_client,
        catalog,
        dedent_script("""
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
    assert "connect ENETUNREACH" in logs_of(out)
    assert out.reason == "script raised OSError at line 5"


async def test_dns_lookup_fails(runner, docker_client, catalog: Catalog):
    """Name resolution fails: no resolver is reachable without a network."""
    out = await run_attack(
        runner,
        docker_client,
        catalog,
        dedent_script("""
        import socket
        try:
            socket.getaddrinfo("example.org", 443)
        except socket.gaierror as exc:
            print("dns failed", exc.errno)
            raise
        """),
    )
    assert_refused(out)
    assert "dns failed" in logs_of(out)
    assert out.reason == "script raised gaierror at line 3"


async def test_only_loopback_interface(runner, docker_client, catalog: Catalog):
    """The container's only network interface is loopback."""
    out = await run_attack(
        runner,
        docker_client,
        catalog,
        dedent_script("""
        import socket
        print("ifaces", sorted(name for _, name in socket.if_nameindex()))
        raise SystemExit(3)
        """),
    )
    assert_refused(out)
    assert "ifaces ['lo']" in logs_of(out)
    assert out.reason == "script exited with status 3"


async def test_fork_bomb_hits_pids_limit(runner, docker_client, catalog: Catalog):
    """A fork bomb is stopped by the pids limit, and the reason names that limit."""
    out = await run_attack(
        runner,
        docker_client,
        catalog,
        dedent_script("""
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
    assert "fork refused after" in logs_of(out)


async def test_memory_bomb_is_oom_killed(runner, docker_client, catalog: Catalog):
    """Allocating twice the memory limit ends in an OOM kill reported with the limit."""
    out = await run_attack(
        runner,
        docker_client,
        catalog,
        dedent_script("""
        blob = bytearray(2 * 256 * 1024 * 1024)
        print("allocated", len(blob))
        """),
    )
    assert_refused(out)
    assert out.reason == "memory limit 256 MiB exceeded (OOM-killed)"
    assert "allocated" not in logs_of(out)


async def test_cpu_spin_times_out(runner, docker_client, catalog: Catalog):
    """A busy loop is killed at the wall-clock limit with status timeout."""
    with_limits(runner, timeout_s=3.0)
    out = await run_attack(runner, docker_client, catalog, "while True:\n    pass\n")
    assert_refused(out, "timeout")
    assert out.reason == "exceeded wall-clock limit 3 s"
    assert out.exit_code == 137  # the runner's SIGKILL ended it, not the script


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
        dedent_script(f"""
        import errno
        try:
            open({path!r}, "a").write("x")
        except OSError as exc:
            print("write", errno.errorcode.get(exc.errno, exc.errno))
            raise
        """),
    )
    assert_refused(out)
    assert "write EROFS" in logs_of(out)
    assert out.reason == "script raised OSError at line 3"
    assert (catalog.root / "subjects.csv").read_text().startswith("subject,age,target\n")
    assert (catalog.root / "new.csv").exists() is False


def _exec_from(directory: str) -> str:
    return dedent_script(f"""
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
    assert "exec EACCES" in logs_of(out)
    assert out.reason == "script raised PermissionError at line 5"


async def test_host_paths_are_not_visible(runner, docker_client, catalog: Catalog):
    """Host files, the Docker socket and the host's shadow file are out of reach."""
    out = await run_attack(
        runner,
        docker_client,
        catalog,
        dedent_script(f"""
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
    logs = logs_of(out)
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


async def test_privilege_syscalls_get_eperm(runner, docker_client, catalog: Catalog):
    """setuid(0), unshare(CLONE_NEWUSER|CLONE_NEWNS) and mount() all fail with EPERM."""
    out = await run_attack(
        runner,
        docker_client,
        catalog,
        dedent_script("""
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
        in logs_of(out)
    )
    assert out.reason == "script raised PermissionError at line 18"


async def test_exec_from_out_is_denied(runner, docker_client, catalog: Catalog):
    """A binary written to /out cannot be executed: /out is a noexec tmpfs (root daemons)."""
    if not runner.out_tmpfs:
        pytest.skip("the noexec tmpfs output mount needs a root daemon")
    out = await run_attack(runner, docker_client, catalog, _exec_from("/out"))
    assert_refused(out)
    assert "exec EACCES" in logs_of(out)


async def test_every_writable_mount_is_noexec(runner, docker_client, catalog: Catalog):
    """Each mount the sandbox user can write to is mounted noexec (no dropping binaries)."""
    out = await run_attack(
        runner,
        docker_client,
        catalog,
        dedent_script("""
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
    logs = logs_of(out)
    assert "writable ['/dev/mqueue', '/dev/shm', '/out', '/tmp']" in logs or not runner.out_tmpfs
    assert "exec-allowed []" in logs or not runner.out_tmpfs
    assert "'/data'" not in logs
    assert "'/job'" not in logs


async def test_seccomp_refuses_io_uring_vsock_memfd_and_odd_sockets(
        runner, docker_client, catalog: Catalog):
    """Our seccomp profile (Docker's default, narrowed: stimnetd/sandbox/seccomp.py) refuses
    io_uring_setup, memfd_create and every socket family but AF_UNIX, AF_INET/6 and route
    netlink, with EPERM; what a job does need (a Unix socket pair, an AF_INET socket,
    listing interfaces) still works."""
    out = await run_attack(
        runner,
        docker_client,
        catalog,
        dedent_script("""
        import ctypes, errno, os, socket
        libc = ctypes.CDLL(None, use_errno=True)
        params = ctypes.create_string_buffer(120)
        rc = libc.syscall(425, 8, params)  # io_uring_setup(entries, params)
        print("io_uring_setup", rc, errno.errorcode.get(ctypes.get_errno()))
        for name, family, proto in (("vsock", 40, 0), ("packet", 17, 0),
                                    ("netlink_audit", 16, 9), ("alg", 38, 0)):
            try:
                socket.socket(family, socket.SOCK_RAW if family == 16 else socket.SOCK_STREAM,
                              proto).close()
                print(name, "allowed")
            except OSError as exc:
                print(name, errno.errorcode.get(exc.errno))
        try:
            os.memfd_create("x")
            print("memfd allowed")
        except OSError as exc:
            print("memfd", errno.errorcode.get(exc.errno))
        a, b = socket.socketpair()
        socket.socket(socket.AF_INET, socket.SOCK_DGRAM).close()
        print("ifaces", sorted(name for _, name in socket.if_nameindex()))
        raise SystemExit(3)
        """),
    )
    assert_refused(out)
    logs = logs_of(out)
    assert "io_uring_setup -1 EPERM" in logs, logs
    for refused in ("vsock EPERM", "packet EPERM", "netlink_audit EPERM", "alg EPERM",
                    "memfd EPERM"):
        assert refused in logs, logs
    assert "ifaces ['lo']" in logs, logs
    assert out.reason == "script exited with status 3"
