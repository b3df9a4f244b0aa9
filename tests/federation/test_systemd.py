"""The systemd contract: the unit verifies, its exposure stays low, sd_notify is honoured,
and under a real systemd (PID 1 in a container) the installed unit starts, runs sandboxed,
reloads, is restarted by its watchdog and stops with exit 0.

The boot tests share one container per module, because installing the daemon's venv with
systemd/install.sh is the slow part; each brings the unit to the state it needs first.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import tomllib
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from stimnetd.testing import CertFactory, DaemonProcess, free_port, write_node_config

ROOT = Path(__file__).resolve().parents[2]
UNIT = ROOT / "systemd" / "stimnetd.service"


def _analyze() -> str:
    exe = shutil.which("systemd-analyze")
    if exe is None:
        if os.environ.get("CI") == "true":
            pytest.fail("systemd-analyze is missing under CI=true")
        pytest.skip("systemd-analyze not installed")
    return exe


def _local_unit(tmp_path: Path) -> Path:
    """The unit with its ExecStart pointing at this checkout's stimnetd (verify checks it exists)."""
    stimnetd = Path(sys.executable).parent / "stimnetd"
    text = UNIT.read_text().replace("/opt/stimnet/venv/bin/stimnetd", str(stimnetd))
    out = tmp_path / "stimnetd.service"
    out.write_text(text)
    return out


def test_unit_verifies(tmp_path: Path) -> None:
    """`systemd-analyze verify` accepts the unit without warnings."""
    r = subprocess.run([_analyze(), "verify", str(_local_unit(tmp_path))], capture_output=True,
                       text=True, timeout=60)
    problems = [ln for ln in (r.stdout + r.stderr).splitlines()
                if "stimnetd.service" in ln and "docker.service" not in ln]
    assert (r.returncode, problems) == (0, []), r.stdout + r.stderr


def test_unit_exposure_is_low(tmp_path: Path) -> None:
    """`systemd-analyze security` rates the unit's exposure at 2.0 or better."""
    r = subprocess.run([_analyze(), "security", "--offline=true", str(_local_unit(tmp_path))],
                       capture_output=True, text=True, timeout=60)
    m = re.search(r"Overall exposure level for stimnetd.service: ([0-9.]+)", r.stdout + r.stderr)
    assert m is not None, r.stdout + r.stderr
    assert float(m.group(1)) <= 2.0


async def test_ready_watchdog_and_stopping_are_notified(tmp_path: Path, pki: CertFactory) -> None:
    """READY=1 only once the port accepts connections; WATCHDOG=1 repeatedly; STOPPING=1 on SIGTERM."""
    sock_path = tmp_path / "notify.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(sock_path))
    sock.setblocking(False)
    port = free_port()
    cfg = write_node_config(tmp_path / "n", pki.issue("node-a", "node"), "node-a", port=port,
                            crl=pki.crl_path)
    proc = DaemonProcess(cfg, env={"NOTIFY_SOCKET": str(sock_path), "WATCHDOG_USEC": "400000"})
    messages: list[tuple[float, str]] = []
    try:
        loop = asyncio.get_running_loop()
        deadline = time.monotonic() + 30
        while not any("READY=1" in m for _, m in messages):
            assert time.monotonic() < deadline, f"no READY=1: {messages}\n{proc.log()}"
            try:
                data = await asyncio.wait_for(loop.sock_recv(sock, 4096), 1)
            except TimeoutError:
                continue
            messages.append((time.monotonic(), data.decode()))
            if "READY=1" in data.decode():
                # Listening by the time READY is sent: a connection succeeds at once.
                with socket.create_connection(("127.0.0.1", port), timeout=1):
                    pass
        t_ready = time.monotonic()
        while time.monotonic() - t_ready < 1.5:
            try:
                data = await asyncio.wait_for(loop.sock_recv(sock, 4096), 0.5)
                messages.append((time.monotonic(), data.decode()))
            except TimeoutError:
                pass
        assert sum("WATCHDOG=1" in m for _, m in messages) >= 3
        proc.proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 10
        while not any("STOPPING=1" in m for _, m in messages):
            assert time.monotonic() < deadline, messages
            try:
                data = await asyncio.wait_for(loop.sock_recv(sock, 4096), 1)
                messages.append((time.monotonic(), data.decode()))
            except TimeoutError:
                pass
        assert proc.stop() == 0
    finally:
        proc.kill()
        sock.close()


# --------------------------------------------------------------------------- the unit and
# the TLS front's memory: a fast check that needs no systemd.

_MDWE_PROBE = """
import ctypes, sys
from pathlib import Path
libc = ctypes.CDLL(None, use_errno=True)
# PR_SET_MDWE (65), PR_MDWE_REFUSE_EXEC_GAIN (1): what MemoryDenyWriteExecute=yes asks for.
if libc.prctl(65, 1, 0, 0, 0) != 0:
    print("unsupported")
    sys.exit(0)
from stimnetd.tlsfront import server_context
certs = Path(sys.argv[1])
try:
    server_context((certs / "ca.crt").read_bytes(), (certs / "node.crt").read_bytes(),
                   (certs / "node.key").read_bytes())
except MemoryError:
    print("MemoryError")
else:
    print("ok")
"""


def _unit_settings() -> dict[str, str]:
    settings: dict[str, str] = {}
    for line in UNIT.read_text().splitlines():
        if "=" in line and not line.startswith(("#", "[")):
            key, value = line.split("=", 1)
            settings[key] = value
    return settings


def test_unit_denies_write_execute_only_if_the_tls_front_survives_it(pki: CertFactory,
                                                                      tmp_path: Path) -> None:
    """The unit sets MemoryDenyWriteExecute=yes only if the TLS front builds under it."""
    node = pki.issue("node-a", "node")
    certs = tmp_path / "certs"
    certs.mkdir()
    for src, name in ((node.ca, "ca.crt"), (node.cert, "node.crt"), (node.key, "node.key")):
        shutil.copy(src, certs / name)
    r = subprocess.run([sys.executable, "-c", _MDWE_PROBE, str(certs)], capture_output=True,
                       text=True, timeout=120, check=False)
    outcome = r.stdout.strip()
    if outcome == "unsupported":
        pytest.skip("the kernel has no PR_SET_MDWE (Linux >= 6.3); the systemd boot test covers it")
    assert outcome in {"ok", "MemoryError"}, r.stdout + r.stderr
    allowed = {"yes", "no", None} if outcome == "ok" else {"no", None}
    assert _unit_settings().get("MemoryDenyWriteExecute") in allowed, (
        "pyOpenSSL's ffi.callback() needs write+execute memory: the daemon would crash-loop")


# --------------------------------------------------------------------------- under a real
# systemd: PID 1 in a container made by systemd/testimage/build-offline.sh.

IMAGE_SCRIPT = ROOT / "systemd" / "testimage" / "build-offline.sh"
CACHE = ROOT / "systemd" / "testimage" / "build"
CONTAINER_PREFIX = "stimnet-systemd-test-"
# Debian bookworm's, the image's suite: the wheels must suit them, not this host.
IMAGE_PYTHON = "3.11"
IMAGE_GLIBC = (2, 36)
NODE = "hospital-a"  # the example config's node name; its paths are used unchanged
# Generous: a loaded 2-core CI box takes minutes to install the venv, and the watchdog
# alone needs WatchdogSec + RestartSec + a start.
INSTALL_TIMEOUT_S = 1800
STATE_TIMEOUT_S = 300
_SKIP_IN_COPY = shutil.ignore_patterns(".git", ".venv", "build", "*.egg-info", "__pycache__",
                                       ".*_cache", ".hypothesis", "demo-federation")


def _docker() -> str:
    exe = shutil.which("docker")
    problem = "the docker CLI is not installed" if exe is None else ""
    if exe is not None:
        r = subprocess.run([exe, "info"], capture_output=True, text=True, timeout=60, check=False)
        problem = "" if r.returncode == 0 else f"the Docker engine is not reachable: {r.stderr[-500:]}"
    if problem:
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI=true requires Docker for the systemd boot tests: {problem}")
        pytest.skip(problem)
    assert exe is not None
    return exe


@dataclass(frozen=True)
class Host:
    """One container running systemd as PID 1, with stimnetd installed by install.sh."""

    docker: str
    name: str

    def sh(self, script: str, *, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        return subprocess.run([self.docker, "exec", self.name, "sh", "-c", script],
                              capture_output=True, text=True, timeout=timeout, check=False)

    def ok(self, script: str, *, timeout: float = 120) -> str:
        r = self.sh(script, timeout=timeout)
        assert r.returncode == 0, f"{script}: rc={r.returncode}\n{r.stdout}{r.stderr}\n{self.journal()}"
        return r.stdout

    def show(self, *props: str) -> dict[str, str]:
        out = self.ok(f"systemctl show -p {','.join(props)} stimnetd")
        return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)

    def journal(self, lines: int = 60) -> str:
        r = subprocess.run([self.docker, "exec", self.name, "journalctl", "-u", "stimnetd",
                            "--no-pager", "-o", "cat", "-n", str(lines)],
                           capture_output=True, text=True, timeout=60, check=False)
        return r.stdout

    def wait_for(self, want: dict[str, str], what: str) -> dict[str, str]:
        deadline = time.monotonic() + STATE_TIMEOUT_S
        while True:
            seen = self.show(*want, "MainPID", "NRestarts")
            if all(seen[k] == v for k, v in want.items()):
                return seen
            assert time.monotonic() < deadline, f"{what}: {seen}\n{self.journal()}"
            time.sleep(1)

    def running(self) -> dict[str, str]:
        """Start the unit unless it runs; its properties once it is up."""
        self.ok("systemctl enable --now stimnetd", timeout=STATE_TIMEOUT_S)
        return self.wait_for({"ActiveState": "active", "SubState": "running"}, "not running")


def _image() -> str:
    r = subprocess.run(["bash", str(IMAGE_SCRIPT)], capture_output=True, text=True,
                       timeout=INSTALL_TIMEOUT_S, check=False)
    assert r.returncode == 0, f"{IMAGE_SCRIPT} failed ({r.returncode}):\n{r.stderr[-4000:]}"
    return r.stdout.strip().splitlines()[-1]


def _wheelhouse() -> Path:
    """Wheels for the daemon's dependencies and build backend, fetched on this host for the
    image's Python and glibc (the container has no package index). Cached per
    pyproject.toml."""
    pyproject = (ROOT / "pyproject.toml").read_bytes()
    out = CACHE / f"wheels-{hashlib.sha256(pyproject).hexdigest()[:12]}"
    if out.is_dir():
        return out
    project = tomllib.loads(pyproject.decode())
    wanted = [*project["project"]["dependencies"], *project["build-system"]["requires"]]
    # pip takes target platforms literally: name every manylinux level the image's glibc
    # runs, down to the legacy aliases some projects still publish under.
    glibc_major, glibc_minor = IMAGE_GLIBC
    platforms = [f"manylinux_{glibc_major}_{minor}_x86_64" for minor in range(glibc_minor, 4, -1)]
    platforms += ["manylinux2014_x86_64", "manylinux2010_x86_64", "manylinux1_x86_64"]
    partial = CACHE / f"{out.name}.partial-{os.getpid()}"
    r = subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--only-binary=:all:",
                        *(f"--platform={p}" for p in platforms), f"--python-version={IMAGE_PYTHON}",
                        "--implementation=cp", f"--abi=cp{IMAGE_PYTHON.replace('.', '')}",
                        "--dest", str(partial), *wanted],
                       capture_output=True, text=True, timeout=INSTALL_TIMEOUT_S, check=False)
    assert r.returncode == 0, f"pip download failed:\n{r.stderr[-4000:]}"
    with contextlib.suppress(OSError):  # a concurrent run may have finished first
        partial.rename(out)
    shutil.rmtree(partial, ignore_errors=True)
    return out


def _cgroup_args() -> list[str]:
    """How systemd gets a cgroup tree it may write: under cgroup v1 (or hybrid) a private
    cgroup namespace, where it mounts the hierarchies itself; under cgroup v2, where Docker
    mounts the tree read-only in an unprivileged container, the host's tree read-write, in
    which systemd works below the container's own cgroup."""
    fs = subprocess.run(["stat", "-fc", "%T", "/sys/fs/cgroup"], capture_output=True, text=True,
                        timeout=30, check=False).stdout.strip()
    if fs == "cgroup2fs":
        return ["--cgroupns", "host", "-v", "/sys/fs/cgroup:/sys/fs/cgroup:rw"]
    return ["--cgroupns", "private"]


def _boot(docker: str, image: str, name: str) -> None:
    # systemd needs /run and /run/lock on tmpfs. CAP_SYS_ADMIN (not --privileged) lets it
    # mount its cgroup hierarchies and build each service's mount namespace, so the unit's
    # ProtectSystem= and the like are applied as on a server (without it systemd skips them
    # in a container, silently). SIGRTMIN+3 asks systemd to halt.
    r = subprocess.run([docker, "run", "-d", "--name", name, "--network", "none",
                        "--tmpfs", "/run", "--tmpfs", "/run/lock", *_cgroup_args(),
                        "--cap-add", "SYS_ADMIN", "--stop-signal", "SIGRTMIN+3", image],
                       capture_output=True, text=True, timeout=120, check=False)
    assert r.returncode == 0, r.stderr
    deadline = time.monotonic() + STATE_TIMEOUT_S
    while True:
        # Until systemd has made its bus socket, systemctl answers nothing at all.
        state = subprocess.run([docker, "exec", name, "systemctl", "is-system-running", "--wait"],
                               capture_output=True, text=True, timeout=STATE_TIMEOUT_S, check=False)
        if state.stdout.strip() or time.monotonic() > deadline:
            break
        time.sleep(1)
    failed = subprocess.run([docker, "exec", name, "systemctl", "--failed", "--no-legend"],
                            capture_output=True, text=True, timeout=60, check=False)
    assert (state.stdout.strip(), failed.stdout) == ("running", ""), state.stderr


def _install(host: Host, pki_dir: Path, src: Path, wheels: Path) -> None:
    for local, remote in ((src, "/src"), (wheels, "/wheels")):
        r = subprocess.run([host.docker, "cp", str(local), f"{host.name}:{remote}"],
                           capture_output=True, text=True, timeout=600, check=False)
        assert r.returncode == 0, r.stderr
    r = subprocess.run([host.docker, "exec", "-e", "PIP_NO_INDEX=1", "-e", "PIP_FIND_LINKS=/wheels",
                        host.name, "bash", "/src/systemd/install.sh"],
                       capture_output=True, text=True, timeout=INSTALL_TIMEOUT_S, check=False)
    assert r.returncode == 0, f"install.sh failed:\n{r.stdout}{r.stderr}"
    factory = CertFactory(pki_dir)
    node = factory.issue(NODE, "node", hosts=("127.0.0.1", "localhost",
                                              f"stimnet.{NODE}.example.org"))
    certs = pki_dir / "etc-certs"
    certs.mkdir()
    for local, name in ((node.cert, f"{NODE}.crt"), (node.key, f"{NODE}.key"),
                        (factory.ca_cert_path, "ca.crt"), (factory.crl_path, "crl.pem")):
        shutil.copy(local, certs / name)
    r = subprocess.run([host.docker, "cp", f"{certs}/.", f"{host.name}:/etc/stimnet/certs/"],
                       capture_output=True, text=True, timeout=120, check=False)
    assert r.returncode == 0, r.stderr
    host.ok("chown root:stimnet /etc/stimnet/certs/* && chmod 0640 /etc/stimnet/certs/*")


@pytest.fixture(scope="module")
def host(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Host]:
    """A booted systemd with the checkout installed by install.sh, the example config in
    place unchanged and certificates from the test PKI; removed afterwards (the cached
    rootfs tarball and wheelhouse stay)."""
    docker = _docker()
    image = _image()
    wheels = _wheelhouse()
    tmp = tmp_path_factory.mktemp("systemd-host")
    src = tmp / "src"
    shutil.copytree(ROOT, src, ignore=_SKIP_IN_COPY)
    h = Host(docker, f"{CONTAINER_PREFIX}{uuid.uuid4().hex[:12]}")
    try:
        _boot(docker, image, h.name)
        _install(h, tmp / "pki", src, wheels)
        yield h
    finally:
        subprocess.run([docker, "rm", "-f", h.name], capture_output=True, timeout=120, check=False)


@pytest.mark.docker
def test_installed_config_is_the_shipped_example(host: Host) -> None:
    """install.sh puts systemd/stimnetd.toml.example in place, and the boot uses it unchanged."""
    installed = host.ok("cat /etc/stimnet/stimnetd.toml")
    assert installed == (ROOT / "systemd" / "stimnetd.toml.example").read_text()


@pytest.mark.docker
def test_install_without_docker_clears_the_docker_group(host: Host) -> None:
    """With no `docker` group on the host, install.sh's drop-in clears SupplementaryGroups=."""
    # Otherwise systemd refuses to start the unit at all: status=216/GROUP.
    assert host.sh("getent group docker").returncode == 2  # 2: no such group
    assert host.show("SupplementaryGroups", "DropInPaths") == {
        "SupplementaryGroups": "",
        "DropInPaths": "/etc/systemd/system/stimnetd.service.d/no-docker.conf"}


@pytest.mark.docker
def test_unit_starts_and_reports_ready(host: Host) -> None:
    """`systemctl start` returns once READY=1 is in: the unit is active, serving, never restarted."""
    host.ok("systemctl stop stimnetd && systemctl enable --now stimnetd", timeout=STATE_TIMEOUT_S)
    assert host.ok("systemctl is-active stimnetd").strip() == "active"
    assert host.show("ActiveState", "SubState", "NRestarts", "StatusText") == {
        "ActiveState": "active", "SubState": "running", "NRestarts": "0",
        "StatusText": "serving on port 7443"}
    status = host.ok("systemctl status --no-pager stimnetd")
    assert [ln.split(" since ")[0].strip() for ln in status.splitlines() if "Active:" in ln] == [
        "Active: active (running)"]
    probe = ("import socket; socket.create_connection(('127.0.0.1', 7443), timeout=5).close(); "
             "print('connected')")
    assert host.ok(f'/opt/stimnet/venv/bin/python -c "{probe}"').strip() == "connected"


@pytest.mark.docker
def test_unit_runs_the_daemon_sandboxed(host: Host) -> None:
    """The hardening is applied, not skipped: no privileges, a seccomp filter, a read-only root."""
    pid = host.running()["MainPID"]
    status = host.ok(f"cat /proc/{pid}/status")
    fields = dict(ln.split(":\t", 1) for ln in status.splitlines() if ":\t" in ln)
    uid = host.ok("id -u stimnet").strip()
    assert {k: fields[k].strip() for k in ("Uid", "CapEff", "NoNewPrivs", "Seccomp")} == {
        "Uid": f"{uid}\t{uid}\t{uid}\t{uid}", "CapEff": "0000000000000000", "NoNewPrivs": "1",
        "Seccomp": "2"}
    mounts: dict[str, str] = {}
    for line in host.ok(f"cat /proc/{pid}/mountinfo").splitlines():
        point, options = line.split()[4:6]
        mounts[point] = options.split(",")[0]  # the last mount on a point is the one seen
    assert {p: mounts.get(p) for p in ("/", "/tmp", "/var/lib/stimnet")} == {
        "/": "ro", "/tmp": "rw", "/var/lib/stimnet": "rw"}


@pytest.mark.docker
def test_reload_keeps_the_process(host: Host) -> None:
    """`systemctl reload` (SIGHUP: certificates read again) keeps the same process running."""
    before = host.running()
    host.ok("systemctl reload stimnetd")
    after = host.show("ActiveState", "MainPID", "NRestarts")
    assert after == {"ActiveState": "active", "MainPID": before["MainPID"],
                     "NRestarts": before["NRestarts"]}


@pytest.mark.docker
def test_hung_daemon_is_restarted_by_the_watchdog(host: Host) -> None:
    """A stopped process misses its WATCHDOG=1 pings; systemd kills it and starts a new one."""
    before = host.running()
    host.ok(f"kill -STOP {before['MainPID']}")
    restarts = str(int(before["NRestarts"]) + 1)
    after = host.wait_for({"ActiveState": "active", "SubState": "running", "NRestarts": restarts},
                          "no watchdog restart")
    assert after["MainPID"] != before["MainPID"]
    events = [ln.split(" (")[0] for ln in host.journal(lines=300).splitlines()
              if "Watchdog timeout" in ln or ln.startswith(("Started stimnetd", "Starting stimnetd"))]
    assert events[-3:] == ["stimnetd.service: Watchdog timeout",
                           "Starting stimnetd.service - StimNet federated-analysis node",
                           "Started stimnetd.service - StimNet federated-analysis node"]


@pytest.mark.docker
def test_stop_exits_zero_and_leaves_the_unit_inactive(host: Host) -> None:
    """`systemctl stop` sends SIGTERM; the daemon exits 0, and the unit is inactive, not failed."""
    pid = host.running()["MainPID"]
    host.ok("systemctl stop stimnetd", timeout=STATE_TIMEOUT_S)
    assert host.show("ActiveState", "SubState", "Result", "ExecMainPID", "ExecMainCode",
                     "ExecMainStatus") == {
        "ActiveState": "inactive", "SubState": "dead", "Result": "success", "ExecMainPID": pid,
        "ExecMainCode": "1", "ExecMainStatus": "0"}  # ExecMainCode 1: CLD_EXITED, not killed
    r = host.sh("systemctl is-active stimnetd")
    assert (r.returncode, r.stdout.strip()) == (3, "inactive")


@pytest.mark.docker
def test_install_again_keeps_config_and_takes_the_docker_group(host: Host) -> None:
    """Re-running install.sh once Docker's group exists keeps the config and restores the group."""
    host.ok("groupadd --system docker && echo '# edited by the site' >> /etc/stimnet/stimnetd.toml")
    host.ok("PIP_NO_INDEX=1 PIP_FIND_LINKS=/wheels bash /src/systemd/install.sh",
            timeout=INSTALL_TIMEOUT_S)
    assert host.ok("tail -n 1 /etc/stimnet/stimnetd.toml") == "# edited by the site\n"
    assert host.ok("id -nG stimnet").split() == ["stimnet", "docker"]
    assert host.show("SupplementaryGroups", "DropInPaths") == {
        "SupplementaryGroups": "docker", "DropInPaths": ""}
    host.ok("systemctl restart stimnetd", timeout=STATE_TIMEOUT_S)
    assert host.show("ActiveState", "SubState") == {"ActiveState": "active", "SubState": "running"}
