"""A slow or dead peer never holds the answer beyond its deadline; the manifest names it."""

from __future__ import annotations

import asyncio
import signal
from pathlib import Path

from stimctl.client import AsyncClient
from stimnetd.testing import CertFactory, DaemonProcess, free_port, write_node_config
from tests.federation.test_federated_queries import _tiny_catalog
from tests.helpers import client_config


async def _three_sites(tmp_path: Path, pki: CertFactory, timeout_s: float):  # type: ignore[no-untyped-def]
    ports = [free_port() for _ in range(3)]
    procs = []
    for i, port in enumerate(ports):
        name = f"site-{'abc'[i]}"
        certs = pki.issue(name, "node")
        cat = _tiny_catalog(tmp_path / f"data-{name}", [float(a) for a in range(30, 50)])
        cfg = write_node_config(
            tmp_path / name, certs, name, port=port, catalogs=[cat], crl=pki.crl_path,
            federation={"peers": [f"127.0.0.1:{p}" for p in ports if p != port],
                        "subjob_timeout_s": timeout_s},
            gossip={"enabled": False})
        procs.append(DaemonProcess(cfg))
    ops = pki.issue("ops", "admin")
    for proc, port in zip(procs, ports, strict=True):
        await proc.wait_healthy(ops, f"127.0.0.1:{port}")
    return procs, ports


async def test_stopped_peer_times_out_and_is_named(tmp_path: Path, pki: CertFactory) -> None:
    """A peer frozen mid-query (SIGSTOP) is reported timed_out; the others' answer arrives."""
    procs, ports = await _three_sites(tmp_path, pki, timeout_s=2.0)
    alice = pki.issue("alice", "researcher")
    try:
        procs[2].proc.send_signal(signal.SIGSTOP)
        async with AsyncClient(client_config(alice, f"127.0.0.1:{ports[0]}", 20)) as c:
            ans = await c.query("SELECT count(*) FROM tiny", federated=True, min_sites=2)
        states = {m["site"]: m["state"] for m in ans.manifest}
        assert ans.rows[0][0] == 40
        # The frozen peer never showed its certificate, so the manifest names its address.
        frozen = f"127.0.0.1:{ports[2]}"
        assert states == {"site-a": "done", "site-b": "done", frozen: "timed_out"}
        assert {m["site"]: m["n"] for m in ans.manifest} == {"site-a": 20, "site-b": 20, frozen: 0}
        # The entry's own 2 s site deadline ended the frozen peer's share (not the client's):
        # as the sub-job's deadline, or as the identity probe's cap, which is that deadline.
        timed_out = [m["detail"] for m in ans.manifest if m["state"] == "timed_out"]
        assert timed_out in (["no answer within the 2s site deadline"],
                             [f"{frozen} completed no TLS handshake within 2s"]), ans.manifest
    finally:
        procs[2].proc.send_signal(signal.SIGCONT)
        for p in procs:
            p.kill()


async def test_peer_killed_mid_query_is_named_failed(tmp_path: Path, pki: CertFactory) -> None:
    """A peer SIGKILLed while the query is in flight is named in the manifest; others answer."""
    procs, ports = await _three_sites(tmp_path, pki, timeout_s=5.0)
    alice = pki.issue("alice", "researcher")
    try:
        procs[1].proc.send_signal(signal.SIGSTOP)
        async with AsyncClient(client_config(alice, f"127.0.0.1:{ports[0]}", 20)) as c:
            job = await c.submit_query("SELECT count(*) FROM tiny", federated=True, min_sites=2)
            await asyncio.sleep(0.5)  # the sub-job is now in flight to the frozen peer
            procs[1].proc.send_signal(signal.SIGKILL)
            ans = await c.run_job(job)
        bad = [m for m in ans.manifest if m["state"] not in ("done",)]
        assert ans.rows[0][0] == 40
        # Named by its certificate if it showed it before it froze, else by its address.
        assert [(m["site"] in ("site-b", f"127.0.0.1:{ports[1]}"), m["state"] in ("failed", "timed_out"))
                for m in bad] == [(True, True)], bad
        assert bad[0]["detail"].strip() != ""
    finally:
        for p in procs:
            p.kill()


async def test_request_id_follows_a_federated_job_across_sites(tmp_path: Path,
                                                               pki: CertFactory) -> None:
    """The request id of the researcher's call appears in every site's JSON log for that job."""
    import json

    procs, ports = await _three_sites(tmp_path, pki, timeout_s=5.0)
    alice = pki.issue("alice", "researcher")
    try:
        async with AsyncClient(client_config(alice, f"127.0.0.1:{ports[0]}", 20)) as c:
            await c.query("SELECT count(*) FROM tiny", federated=True, min_sites=3)
    finally:
        for p in procs:
            p.stop()

    def records(p: DaemonProcess) -> list[dict]:
        return [json.loads(line) for line in p.log().splitlines() if line.startswith("{")]

    entry = [r for r in records(procs[0]) if r.get("method") == "/stimnet.v1.JobService/RunJob"
             and r.get("event") == "rpc"]
    assert len(entry) == 1 and entry[0]["status"] == "OK"
    rid = entry[0]["request_id"]
    for p in procs[1:]:
        sub = [r for r in records(p) if r.get("method") == "/stimnet.v1.FederationService/RunSubJob"]
        assert {r["request_id"] for r in sub} == {rid}, sub
