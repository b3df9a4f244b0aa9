"""One stimnetd per state directory, and a start that fails exits at once."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from stimnetd.testing import CertFactory, write_node_config


def _stimnetd(config: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "stimnetd", "--config", str(config)],
                          capture_output=True, text=True, timeout=60)


async def test_a_second_daemon_on_a_state_directory_exits_1_naming_the_holder(
        start_node, pki: CertFactory, tmp_path: Path) -> None:
    """While a node runs, a second stimnetd on its config (port 0: it would bind another
    port) exits 1 at once with one line naming the running one's PID; the first keeps
    serving."""
    import os

    async with start_node("node-a") as d:
        done = _stimnetd(d.config.source)
        assert done.returncode == 1, done.stderr
        assert f"in use by another stimnetd (pid {os.getpid()})" in done.stderr
        assert "Traceback" not in done.stderr
        assert d.store.out_of_space is False and (await d.store.verify_audit()).ok


async def test_a_taken_port_exits_1_at_once(start_node, pki: CertFactory, tmp_path: Path) -> None:
    """A node whose port is taken exits 1 with "cannot listen" (it used to hang after it)."""
    async with start_node("node-a") as d:
        certs = pki.issue("node-b", "node")
        cfg = write_node_config(tmp_path / "node-b", certs, "node-b", port=d.port)
        done = _stimnetd(cfg)
    assert done.returncode == 1, done.stderr
    assert "cannot listen on" in done.stderr and "Traceback" not in done.stderr
    # The front's private directory of the start that failed is gone with it (the marker
    # still names it: a test deleting tmp_path would leave it in /tmp for good).
    named = Path((tmp_path / "node-b" / "state" / "front-socket-dir").read_text().strip())
    assert named.name.startswith("stimnetd-") and not named.exists()


async def test_a_killed_daemon_leaves_no_front_directory_and_a_running_one_keeps_its_own(
        pki: CertFactory, tmp_path: Path) -> None:
    """DaemonProcess removes the TLS front's private /tmp directory of a node it killed
    (a test deleting its tmp_path would leave it for good), but not the one of a node
    still running on the same state directory when a second instance there exits."""
    from stimnetd.listening import MARKER
    from stimnetd.testing import DaemonProcess, free_port

    certs = pki.issue("node-a", "node")
    port = free_port()
    cfg = write_node_config(tmp_path / "node-a", certs, "node-a", port=port)
    first = DaemonProcess(cfg)
    try:
        await first.wait_healthy(certs, f"127.0.0.1:{port}")
        front_dir = Path((tmp_path / "node-a" / "state" / MARKER).read_text().strip())
        assert front_dir.is_dir()
        second = DaemonProcess(cfg)
        assert second.proc.wait(timeout=60) == 1  # the state directory is taken
        second.stop()
        assert front_dir.is_dir() and first.proc.poll() is None
    finally:
        first.kill()
    assert not front_dir.exists()
