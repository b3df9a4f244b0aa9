"""Crash safety: SIGKILL a daemon at random moments under load, many times; nothing is lost.

Bounded in CI (STIMNET_CRASH_LOOPS, default 50 kills); set it higher for a soak run.
"""

from __future__ import annotations

import asyncio
import os
import random
import signal
import sqlite3
import time
from pathlib import Path

import pytest

from stimctl.client import AsyncClient, ClientError
from stimnetd.store.audit import AuditRow, AuditVerification, verify_rows
from stimnetd.testing import CertFactory, CertPaths, DaemonProcess, free_port, write_node_config
from tests.federation.test_federated_queries import _tiny_catalog
from tests.helpers import client_config

LOOPS = int(os.environ.get("STIMNET_CRASH_LOOPS", "50"))
GOSSIP = {"gossip_interval_s": 0.1, "probe_interval_s": 0.3, "probe_timeout_s": 0.15}


async def test_crash_loop_loses_nothing_acknowledged(tmp_path: Path, pki: CertFactory) -> None:
    """Random SIGKILLs during queries, DP releases and gossip: every acknowledged job, charge
    and audit entry survives, the file passes integrity_check and the audit chain verifies."""
    # Prepare
    rng = random.Random(20261125)
    ports = [free_port(), free_port()]
    cfgs = _configs(tmp_path, pki, ports)
    alice = pki.issue("alice", "researcher")
    acknowledged: set[str] = set()         # SubmitJob returned: the job must exist
    released: dict[str, float] = {}         # a result with epsilon came back: charge must exist

    # Execute
    await _kill_under_load(cfgs, ports, alice, rng, acknowledged, released)

    # Assert
    assert len(acknowledged) >= LOOPS  # the workload really ran between the kills
    db = tmp_path / "victim" / "state" / "stimnetd.sqlite3"
    with sqlite3.connect(db) as conn:
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        jobs = {r[0]: r[1] for r in conn.execute("SELECT id, state FROM jobs")}
        charges = {r[0]: r[1] for r in conn.execute("SELECT job_id, epsilon FROM ledger")}
        submits = {r[0] for r in conn.execute(
            "SELECT json_extract(detail_json, '$.job') FROM audit WHERE action = 'submit'")}
        rows = [AuditRow(*r) for r in conn.execute(
            "SELECT seq, at, actor, role, action, decision, detail_json, prev_hash, hash "
            "FROM audit ORDER BY rowid")]
    assert sorted(acknowledged - set(jobs)) == [], "acknowledged jobs lost"
    assert sorted(acknowledged - submits) == [], "an acknowledged job's audit entry is missing"
    assert sorted(j for j in released if j not in charges) == [], "released but uncharged"
    assert {j: charges[j] for j in released} == pytest.approx(released)
    assert [j for j, s in jobs.items() if s in ("queued", "running")] == [], \
        "jobs left queued/running after the final restart"
    assert verify_rows(rows) == AuditVerification(ok=True, entries=len(rows))


def _configs(tmp_path: Path, pki: CertFactory, ports: list[int]) -> list[Path]:
    """The victim's and the steady node's configs, each the other's gossip seed."""
    cfgs = []
    for i, name in enumerate(("victim", "steady")):
        # Many small cohorts so DP releases keep charging without tripping the overlap guard.
        cat = _tiny_catalog(tmp_path / f"data-{name}", [float(a % 60) for a in range(600)])
        cfgs.append(write_node_config(
            tmp_path / name, pki.issue(name, "node"), name, port=ports[i], catalogs=[cat],
            crl=pki.crl_path, gossip=GOSSIP,
            privacy={"dp": "optional", "budget_epsilon": 1e9, "max_epsilon_per_query": 1.0,
                     "overlap_guard": False},
            federation={"seeds": [f"127.0.0.1:{ports[1 - i]}"], "subjob_timeout_s": 3.0},
            scripts={"policy": "deny"}, logging={"level": "warning"}))
    return cfgs


async def _kill_under_load(cfgs: list[Path], ports: list[int], alice: CertPaths,
                           rng: random.Random, acknowledged: set[str],
                           released: dict[str, float]) -> None:
    """LOOPS times: run queries against the victim and SIGKILL it at a random moment;
    finally restart it and stop both nodes cleanly."""
    steady = DaemonProcess(cfgs[1])
    victim = DaemonProcess(cfgs[0])
    try:
        await steady.wait_healthy(alice, f"127.0.0.1:{ports[1]}")
        for _ in range(LOOPS):
            await victim.wait_healthy(alice, f"127.0.0.1:{ports[0]}", timeout_s=60)
            stop_at = time.monotonic() + rng.uniform(0.2, 1.2)
            task = asyncio.create_task(_workload(alice, ports[0], rng, stop_at + 5,
                                                 acknowledged, released))
            await asyncio.sleep(max(0.0, stop_at - time.monotonic()))
            victim.proc.send_signal(signal.SIGKILL)
            victim.proc.wait()
            await asyncio.wait_for(task, 30)
            victim = DaemonProcess(cfgs[0])
        await victim.wait_healthy(alice, f"127.0.0.1:{ports[0]}", timeout_s=60)
    finally:
        assert victim.stop() == 0
        assert steady.stop() == 0


async def _workload(alice: CertPaths, port: int, rng: random.Random, until: float,
                    acknowledged: set[str], released: dict[str, float]) -> None:
    """Queries, some with DP and some federated, until `until` or the daemon dies."""
    async with AsyncClient(client_config(alice, f"127.0.0.1:{port}", 5)) as c:
        while time.monotonic() < until:
            lo = rng.randrange(0, 50)
            try:
                job = await c.submit_query(
                    f"SELECT count(*), avg(age) FROM tiny WHERE age >= {lo}",
                    epsilon=0.5, federated=rng.random() < 0.3)
                acknowledged.add(job.id)
                ans = await c.run_job(job)
                for p in ans.privacy:
                    if p["site"] == "victim" and p["epsilon"]:
                        released[job.id] = p["epsilon"]
            except ClientError:
                return  # the daemon died under us: expected
