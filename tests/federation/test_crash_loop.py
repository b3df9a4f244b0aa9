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
from stimnetd.store.audit import AuditRow, verify_rows
from stimnetd.testing import CertFactory, DaemonProcess, free_port, write_node_config
from tests.federation.test_federated_queries import _tiny_catalog
from tests.helpers import client_config

LOOPS = int(os.environ.get("STIMNET_CRASH_LOOPS", "50"))
GOSSIP = {"gossip_interval_s": 0.1, "probe_interval_s": 0.3, "probe_timeout_s": 0.15}


async def test_crash_loop_loses_nothing_acknowledged(tmp_path: Path, pki: CertFactory) -> None:
    """Random SIGKILLs during queries, DP releases and gossip: every acknowledged job, charge
    and audit entry survives, the file passes integrity_check and the audit chain verifies."""
    rng = random.Random(20261125)
    ports = [free_port(), free_port()]
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
    alice = pki.issue("alice", "researcher")
    steady = DaemonProcess(cfgs[1])
    victim = DaemonProcess(cfgs[0])
    acknowledged: set[str] = set()         # SubmitJob returned: the job must exist
    released: dict[str, float] = {}         # a result with epsilon came back: charge must exist
    try:
        await steady.wait_healthy(alice, f"127.0.0.1:{ports[1]}")
        for _ in range(LOOPS):
            await victim.wait_healthy(alice, f"127.0.0.1:{ports[0]}", timeout_s=60)
            stop_at = time.monotonic() + rng.uniform(0.2, 1.2)

            async def workload(stop_at: float = stop_at) -> None:
                async with AsyncClient(client_config(alice, f"127.0.0.1:{ports[0]}", 5)) as c:
                    while time.monotonic() < stop_at + 5:
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

            task = asyncio.create_task(workload())
            await asyncio.sleep(max(0.0, stop_at - time.monotonic()))
            victim.proc.send_signal(signal.SIGKILL)
            victim.proc.wait()
            await asyncio.wait_for(task, 30)
            victim = DaemonProcess(cfgs[0])
        await victim.wait_healthy(alice, f"127.0.0.1:{ports[0]}", timeout_s=60)
    finally:
        assert victim.stop() == 0
        assert steady.stop() == 0

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
    missing = acknowledged - set(jobs)
    assert not missing, f"acknowledged jobs lost: {sorted(missing)[:5]}"
    assert acknowledged <= submits, "an acknowledged job's audit entry is missing"
    lost = {j for j in released if j not in charges}
    assert not lost, f"released but uncharged: {sorted(lost)[:5]}"
    assert all(charges[j] == pytest.approx(e) for j, e in released.items())
    assert not [j for j, s in jobs.items() if s in ("queued", "running")], \
        "jobs left queued/running after the final restart"
    v = verify_rows(rows)
    assert v.ok, v.problem
