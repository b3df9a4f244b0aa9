"""SIGTERM under load, again and again: every stop exits 0 before its deadline, the port is
free for the restart, no acknowledged call's audit entry is lost and the chain verifies.

`STIMNET_SIGTERM_CYCLES` sets the number of stops (default 8 here; 50 on demand)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import signal
import sqlite3
from pathlib import Path

import grpc

from stimctl.client import AsyncClient, ClientError
from stimnet.v1 import node_pb2, node_pb2_grpc
from stimnetd.store.audit import AuditRow, verify_rows
from stimnetd.testing import CertFactory, DaemonProcess, free_port, write_node_config
from tests.helpers import client_config

CYCLES = int(os.environ.get("STIMNET_SIGTERM_CYCLES", "8"))
GRACE_S = 2.0
# A stop that takes longer than this is a hang: the grace period, then closing the store
# and the process's own exit (a loaded 2-core machine).
STOP_DEADLINE_S = GRACE_S + 20.0


async def _load(address: str, researcher, admin, acked: set[str], queries: list[str],  # type: ignore[no-untyped-def]
                stop: asyncio.Event, cycle: int) -> None:
    """Calls of three kinds until `stop`: allowed (group-committed audit), refused
    (durable audit) and queries (a release and its audit in one transaction). Each
    acknowledged call's request id, or query's job id, is recorded."""
    creds = client_config(researcher, address).credentials()
    n = 0

    async def info_calls() -> None:
        nonlocal n
        async with grpc.aio.secure_channel(address, creds) as ch:
            stub = node_pb2_grpc.NodeServiceStub(ch)
            while not stop.is_set():
                n += 1
                rid = f"stress-{cycle}-{n}"
                md = (("x-stimnet-request-id", rid),)
                try:
                    if n % 3:
                        await stub.GetInfo(node_pb2.GetInfoRequest(), metadata=md, timeout=5)
                        acked.add(f"allowed:{rid}")
                    else:
                        await stub.GetStatus(node_pb2.GetStatusRequest(), metadata=md,
                                             timeout=5)
                except grpc.aio.AioRpcError as exc:
                    if exc.code() == grpc.StatusCode.PERMISSION_DENIED:
                        acked.add(f"denied:{rid}")
                    else:
                        await asyncio.sleep(0.01)

    async def query_calls() -> None:
        with contextlib.suppress(ClientError):
            async with AsyncClient(client_config(researcher, address, timeout_s=5)) as c:
                while not stop.is_set():
                    try:
                        ans = await c.query("SELECT count(*) FROM dbs_outcomes")
                    except ClientError:
                        await asyncio.sleep(0.01)
                        continue
                    queries.append(ans.job_id)

    await asyncio.gather(info_calls(), info_calls(), query_calls())


async def test_repeated_sigterm_under_load(tmp_path: Path, pki: CertFactory,
                                           small_catalog: dict) -> None:
    node, alice, ops = (pki.issue("node-a", "node"), pki.issue("alice", "researcher"),
                        pki.issue("ops", "admin"))
    port = free_port()
    address = f"127.0.0.1:{port}"
    cfg = write_node_config(tmp_path / "node-a", node, "node-a", port=port,
                            catalogs=[small_catalog], crl=pki.crl_path,
                            node={"grace_s": GRACE_S}, gossip={"enabled": False})
    acked: set[str] = set()
    queries: list[str] = []
    rng = random.Random(24)
    for cycle in range(CYCLES):
        proc = DaemonProcess(cfg)
        stop = asyncio.Event()
        try:
            await proc.wait_healthy(ops, address)
            load = asyncio.ensure_future(_load(address, alice, ops, acked, queries, stop, cycle))
            await asyncio.sleep(rng.uniform(0.2, 1.0))
            proc.proc.send_signal(signal.SIGTERM)  # the load keeps calling meanwhile
            code = await asyncio.to_thread(proc.proc.wait, STOP_DEADLINE_S)
            stop.set()
            await asyncio.wait_for(load, timeout=30)
        finally:
            stop.set()
            proc.kill()
        assert code == 0, f"stop {cycle + 1} exited {code}:\n{proc.log()[-4000:]}"
        assert "Traceback" not in proc.log(), proc.log()[-4000:]

    db = tmp_path / "node-a" / "state" / "stimnetd.sqlite3"
    with sqlite3.connect(db) as conn:
        rows = [AuditRow(*r) for r in conn.execute(
            "SELECT seq, at, actor, role, action, decision, detail_json, prev_hash, hash "
            "FROM audit ORDER BY rowid")]
    verified = verify_rows(rows)
    assert verified.ok, verified.problem
    audited = {f"{r.decision}:{r.to_dict()['detail'].get('request_id')}" for r in rows}  # type: ignore[union-attr]
    allowed = {a for a in acked if a.startswith("allowed:")}
    lost = sorted(allowed - audited)
    assert not lost, f"{len(lost)} acknowledged calls not in the audit log, e.g. {lost[:5]}"
    # Refusals past the per-minute burst are audited as counts ([tls]
    # refusals_audited_per_minute): one by one or counted, each is in the log.
    denied = sum(1 for a in acked if a.startswith("denied:"))
    one_by_one = sum(1 for r in rows if r.actor == "alice" and r.decision == "denied")
    counted = sum(int(r.to_dict()["detail"]["suppressed"]) for r in rows  # type: ignore[index]
                  if r.actor == "researcher/alice" and r.decision == "denied-condensed")
    assert one_by_one + counted >= denied, (one_by_one, counted, denied)
    details = "\n".join(r.detail_json for r in rows)
    missing = [j for j in queries if j not in details]
    assert not missing, f"{len(missing)} answered queries not audited, e.g. {missing[:3]}"
    assert [r.action for r in rows].count("stop") == CYCLES
    assert len(acked) > CYCLES and queries  # the load did reach every kind of call
