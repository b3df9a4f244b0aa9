"""`stimctl audit verify` against a daemon serving a tampered copy of a store."""

from __future__ import annotations

import asyncio
import shutil
import sqlite3
from pathlib import Path

import pytest
import tomli_w

from stimctl.cli import main as stimctl
from stimnetd.config import load_config
from stimnetd.daemon import Daemon
from stimnetd.testing import CertFactory, write_node_config

TAMPER = {
    "edit": ("UPDATE audit SET decision = 'allowed' WHERE seq = 3",
             "BROKEN at entry 3: entry 3 does not match its hash"),
    "delete": ("DELETE FROM audit WHERE seq = 3",
               "BROKEN at entry 4: entry 4 found where 3 was expected"),
    "reorder": ("UPDATE audit SET seq = -1 WHERE seq = 3; UPDATE audit SET seq = 3 WHERE seq = 4;"
                " UPDATE audit SET seq = 4 WHERE seq = -1",
                "BROKEN at entry 3: entry 3 does not link to entry 2"),
}


@pytest.mark.parametrize("kind", sorted(TAMPER))
async def test_audit_verify_reports_tampering(tmp_path: Path, pki: CertFactory, kind: str,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    """Edited, deleted and reordered audit rows are each reported by `stimctl audit verify`."""
    ops = pki.issue("ops", "admin")
    cfg = write_node_config(tmp_path / "n", pki.issue("node-a", "node"), "node-a",
                            crl=pki.crl_path, gossip={"enabled": False})
    d = Daemon(load_config(cfg))
    await d.start()
    for i in range(5):
        await d.store.audit("alice", "researcher", f"act{i}", "denied", {"i": i})
    await d.shutdown()
    copy_dir = tmp_path / "copy"
    shutil.copytree(tmp_path / "n" / "state", copy_dir)
    cfg2 = write_node_config(tmp_path / "n2", pki.issue("node-b", "node"), "node-b",
                             crl=pki.crl_path, gossip={"enabled": False},
                             node={"state_dir": str(copy_dir)})
    d2 = Daemon(load_config(cfg2))
    await d2.start()
    try:
        # Tampered while it runs: at start the whole chain is verified, and a broken one
        # refused (tests/federation/test_store_identity.py).
        with sqlite3.connect(copy_dir / "stimnetd.sqlite3") as conn:
            conn.executescript(TAMPER[kind][0])
        client = tmp_path / "client.toml"
        client.write_text(tomli_w.dumps({"address": f"127.0.0.1:{d2.port}", "ca": str(ops.ca),
                                         "cert": str(ops.cert), "key": str(ops.key)}))
        code = await asyncio.to_thread(stimctl, ["--config", str(client), "audit", "verify"])
    finally:
        await d2.shutdown()
    out = capsys.readouterr().out
    assert code == 1
    assert TAMPER[kind][1] in out, out
