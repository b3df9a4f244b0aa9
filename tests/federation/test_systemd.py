"""The systemd contract: the unit verifies, its exposure stays low, sd_notify is honoured."""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
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
