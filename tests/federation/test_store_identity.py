"""Store identity: a node that has run keeps its store's identity beside it, and a missing,
empty, swapped or edited store is refused at start until `init-store --force` (audited)."""

from __future__ import annotations

import json
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from stimnetd.store.identity import IDENTITY_NAME
from stimnetd.testing import CertFactory, DaemonProcess, free_port, write_node_config


def _stimnetd(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "stimnetd", *args],
                          capture_output=True, text=True, timeout=60)


def _refused(config: Path, *wanted: str) -> None:
    """Start exits 1 with one error line naming the problem, and no traceback."""
    done = _stimnetd("--config", str(config))
    errors = [line for line in done.stderr.splitlines() if line.startswith("stimnetd: error:")]
    assert done.returncode == 1, done.stderr
    assert len(errors) == 1 and "Traceback" not in done.stderr, done.stderr
    for text in wanted:
        assert text in errors[0], errors[0]


def _rows(store: Path) -> list[tuple[int, str, str, str, str]]:
    conn = sqlite3.connect(store)
    try:
        return conn.execute("SELECT seq, action, decision, detail_json, hash FROM audit "
                            "ORDER BY seq").fetchall()
    finally:
        conn.close()


async def _run_once(config: Path, certs, port: int) -> None:  # type: ignore[no-untyped-def]
    proc = DaemonProcess(config)
    try:
        await proc.wait_healthy(certs, f"127.0.0.1:{port}")
    finally:
        assert proc.stop() == 0, proc.log()


@pytest.fixture
def node(pki: CertFactory, tmp_path: Path):  # type: ignore[no-untyped-def]
    def make(name: str) -> tuple[Path, object, int, Path]:
        certs, port = pki.issue(name, "node"), free_port()
        cfg = write_node_config(tmp_path / name, certs, name, port=port)
        return cfg, certs, port, tmp_path / name / "state"
    return make


async def test_a_replaced_or_lost_store_is_refused_until_init_store_force(node) -> None:  # type: ignore[no-untyped-def]
    cfg, certs, port, state = node("node-a")
    store = state / "stimnetd.sqlite3"
    await _run_once(cfg, certs, port)  # first run ever: starts, and records the identity
    first = _rows(store)
    identity = (state / IDENTITY_NAME).read_text().strip()
    assert first[0][1] == "start" and identity == first[0][4]
    await _run_once(cfg, certs, port)  # its own store: starts again

    shutil.copy(store, state / "kept.sqlite3")
    store.write_bytes(b"")
    _refused(cfg, "is empty", "init-store --force")
    store.unlink()
    _refused(cfg, "is missing", identity[:16])
    assert not store.exists()  # refusing did not create a new one

    cfg_b, certs_b, port_b, state_b = node("node-b")
    await _run_once(cfg_b, certs_b, port_b)
    shutil.copy(state_b / "stimnetd.sqlite3", store)  # another node's store
    _refused(cfg, "is not this node's store")

    shutil.copy(state / "kept.sqlite3", store)  # its own store back (a restore)
    await _run_once(cfg, certs, port)

    done = _stimnetd("init-store", "--config", str(cfg))
    assert done.returncode == 2 and "--force" in done.stderr, done.stderr
    done = _stimnetd("init-store", "--force", "--config", str(cfg))
    assert done.returncode == 0 and "started a new store" in done.stdout, done.stderr
    assert len(list(state.glob("stimnetd.sqlite3.replaced-*"))) == 1  # the old file is kept
    await _run_once(cfg, certs, port)
    rows = _rows(store)
    assert [r[1:3] for r in rows[:2]] == [("init-store", "forced"), ("start", "ok")]
    assert json.loads(rows[0][3])["previous_identity"] == identity
    assert (state / IDENTITY_NAME).read_text().strip() == rows[0][4] != identity


async def test_an_edit_inside_an_audit_row_is_found_at_start(node) -> None:  # type: ignore[no-untyped-def]
    """Same-length bytes changed in a row's payload leave SQLite's page structure intact
    (quick_check passes); the audit-chain check at start finds it."""
    cfg, certs, port, state = node("node-a")
    store = state / "stimnetd.sqlite3"
    await _run_once(cfg, certs, port)
    detail = _rows(store)[0][3].encode()  # the start entry's payload, as stored
    raw = bytearray(store.read_bytes())
    at = raw.find(detail)
    assert at > 0 and raw.count(detail) == 1
    edited = detail.replace(b'"port":', b'"pORt":')
    assert edited != detail and len(edited) == len(detail)
    raw[at:at + len(detail)] = edited
    store.write_bytes(bytes(raw))
    conn = sqlite3.connect(store)
    assert conn.execute("PRAGMA quick_check").fetchall() == [("ok",)]
    conn.close()
    _refused(cfg, "audit-chain check", "entry 1 does not match its hash")
