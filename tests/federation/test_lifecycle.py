"""A real stimnetd process: graceful SIGTERM with a stream open, consistent store afterwards."""

from __future__ import annotations

import asyncio
import signal
import sqlite3
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from stimctl.client import AsyncClient
from stimnetd.testing import CertFactory, DaemonProcess, free_port, write_node_config
from tests.helpers import client_config


async def test_sigterm_during_stream_exits_zero_and_store_is_consistent(
        tmp_path: Path, pki: CertFactory, small_catalog: dict) -> None:
    """SIGTERM while a server stream is open: the node ends the stream itself and exits 0;
    restart is clean."""
    node = pki.issue("node-a", "node")
    ops = pki.issue("ops", "admin")
    port = free_port()
    address = f"127.0.0.1:{port}"
    cfg = write_node_config(tmp_path / "node-a", node, "node-a", port=port,
                            catalogs=[small_catalog], crl=pki.crl_path,
                            node={"grace_s": 3.0})
    proc = DaemonProcess(cfg)
    try:
        await proc.wait_healthy(ops, address)
        creds = client_config(ops, address).credentials()
        async with grpc.aio.secure_channel(address, creds) as ch:
            watch = health_pb2_grpc.HealthStub(ch).Watch(health_pb2.HealthCheckRequest(), timeout=30)
            first = await watch.read()
            assert first.status == health_pb2.HealthCheckResponse.SERVING
            proc.proc.send_signal(signal.SIGTERM)
            # The stream sees the graceful-shutdown transition or is closed by the server.
            statuses = []
            ended = "EOF"
            try:
                while (msg := await watch.read()) is not grpc.aio.EOF:
                    statuses.append(msg.status)
            except grpc.aio.AioRpcError as exc:
                ended = exc.code().name
            code = await asyncio.to_thread(proc.proc.wait, 15)
        assert code == 0, proc.log()
        # The node ended the open stream itself (closing it, or cancelling it at the end of
        # its grace period) before the stream's own 30 s deadline could.
        assert ended in ("EOF", "UNAVAILABLE", "CANCELLED"), proc.log()
        assert health_pb2.HealthCheckResponse.SERVING not in statuses
    finally:
        proc.kill()

    db = tmp_path / "node-a" / "state" / "stimnetd.sqlite3"
    with sqlite3.connect(db) as conn:
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        actions = [r[0] for r in conn.execute("SELECT action FROM audit ORDER BY seq")]
    assert actions[0] == "start" and actions[-1] == "stop"

    again = DaemonProcess(cfg)
    try:
        await again.wait_healthy(ops, address)
        async with AsyncClient(client_config(ops, address)) as c:
            verified = await c.audit_verify()
        assert (verified.ok, verified.first_bad_seq, verified.problem) == (True, 0, "")
    finally:
        assert again.stop() == 0


async def test_backup_of_a_running_node(tmp_path: Path, pki: CertFactory) -> None:
    """`stimnetd backup` copies a serving node's store consistently and never overwrites."""
    import subprocess
    import sys

    from stimnetd.store import Store

    ops = pki.issue("ops", "admin")
    port = free_port()
    cfg = write_node_config(tmp_path / "n", pki.issue("node-a", "node"), "node-a", port=port,
                            crl=pki.crl_path)
    proc = DaemonProcess(cfg)
    dest = tmp_path / "backup.sqlite3"
    try:
        await proc.wait_healthy(ops, f"127.0.0.1:{port}")
        async with AsyncClient(client_config(ops, f"127.0.0.1:{port}")) as c:
            await c.audit_verify()
        cmd = [sys.executable, "-m", "stimnetd", "backup", "--config", str(cfg), str(dest)]
        first = await asyncio.to_thread(subprocess.run, cmd, capture_output=True, text=True,
                                        timeout=60)
        assert first.returncode == 0, first.stderr
        second = await asyncio.to_thread(subprocess.run, cmd, capture_output=True, text=True,
                                         timeout=60)
        assert second.returncode == 1
        assert second.stderr.strip().splitlines() == [
            f"stimnetd: error: backup destination {dest} already exists; refusing to overwrite"]
    finally:
        assert proc.stop() == 0
    copy = Store(dest)
    await copy.open()
    try:
        verified = await copy.verify_audit()
    finally:
        await copy.close()
    assert (verified.ok, verified.first_bad_seq, verified.problem) == (True, None, "")
    assert verified.entries >= 1
