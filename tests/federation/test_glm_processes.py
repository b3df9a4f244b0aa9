"""A GLM's fit when a real daemon process dies mid-fit: a site (the job ends, naming it),
or the entry (the job is interrupted and can be resubmitted)."""

from __future__ import annotations

from pathlib import Path

import pytest

from stimctl.client import AsyncClient
from stimnet.errors import JobFailed, StimnetError
from stimnetd.testing import CertFactory, DaemonProcess, free_port, write_node_config
from tests.federation.test_glm_jobs import glm_catalog
from tests.helpers import client_config

SQL = "SELECT glm('DIS_DIAB ~ PM_BMI_CONTINUOUS + LAB_TSC', 'binomial') FROM cnsim"


async def _three_sites(tmp: Path, pki: CertFactory) -> tuple[list[DaemonProcess], list[Path],
                                                             list[int]]:
    ports = [free_port() for _ in range(3)]
    procs, cfgs = [], []
    for i, port in enumerate(ports):
        name = f"site-{'abc'[i]}"
        cfg = write_node_config(
            tmp / name, pki.issue(name, "node"), name, port=port, crl=pki.crl_path,
            catalogs=[glm_catalog(tmp, i + 1)], privacy={"dp": "off"},
            gossip={"enabled": False},
            federation={"peers": [f"127.0.0.1:{p}" for p in ports if p != port],
                        "subjob_timeout_s": 5.0})
        cfgs.append(cfg)
        procs.append(DaemonProcess(cfg))
    ops = pki.issue("ops", "admin")
    for p, port in zip(procs, ports, strict=True):
        await p.wait_healthy(ops, f"127.0.0.1:{port}")
    return procs, cfgs, ports


def _kill_at_first_iteration(victim: DaemonProcess, seen: list[str]):  # type: ignore[no-untyped-def]
    def on_event(kind: str, value: object) -> None:
        if kind == "state" and getattr(value, "id", ""):
            seen.append(f"job {value.id}")  # type: ignore[attr-defined]
        if kind == "log" and "iteration 1:" in str(value) and victim.proc.poll() is None:
            victim.proc.kill()  # SIGKILL, at once: the fit has more rounds to go
            seen.append("killed")
    return on_event


async def test_a_site_killed_mid_fit_ends_the_job_naming_it(tmp_path: Path,
                                                           pki: CertFactory) -> None:
    procs, _, ports = await _three_sites(tmp_path, pki)
    alice = pki.issue("alice", "researcher")
    seen: list[str] = []
    try:
        async with AsyncClient(client_config(alice, f"127.0.0.1:{ports[0]}", 30)) as c:
            with pytest.raises(JobFailed) as failed:
                await c.query(SQL, federated=True, min_sites=3,
                              on_event=_kill_at_first_iteration(procs[2], seen))
            job_id = next(s for s in seen if s.startswith("job ")).split()[1]
            job = await c.get_job(job_id)
    finally:
        for p in procs:
            p.kill()
    assert "killed" in seen
    assert "dropped out at round" in str(failed.value) and "site-c" in str(failed.value)
    assert "not finished over fewer sites" in str(failed.value)
    rows = {s.site: s.state for s in job.sites}
    assert rows["site-c"] in ("failed", "timed_out") and job.state == "failed", job


async def test_an_entry_restarted_mid_fit_marks_the_job_interrupted_and_it_can_be_resubmitted(
        tmp_path: Path, pki: CertFactory) -> None:
    procs, cfgs, ports = await _three_sites(tmp_path, pki)
    alice = pki.issue("alice", "researcher")
    ops = pki.issue("ops2", "admin")
    seen: list[str] = []
    address = f"127.0.0.1:{ports[0]}"
    try:
        async with AsyncClient(client_config(alice, address, 30)) as c:
            with pytest.raises(StimnetError):
                await c.query(SQL, federated=True, min_sites=3,
                              on_event=_kill_at_first_iteration(procs[0], seen))
        assert "killed" in seen
        job_id = next(s for s in seen if s.startswith("job ")).split()[1]
        procs[0] = DaemonProcess(cfgs[0])
        await procs[0].wait_healthy(ops, address)
        async with AsyncClient(client_config(alice, address, 30)) as c:
            job = await c.get_job(job_id)
            assert (job.state, job.detail) == (
                "interrupted", "the node restarted while this job ran; resubmit")
            again = await c.query(SQL, federated=True, min_sites=3)
    finally:
        for p in procs:
            p.kill()
    assert again.result["glm"]["outcome"] == "converged"
    assert [m["site"] for m in again.manifest] == ["site-a", "site-b", "site-c"]
