"""`on_restart = "requeue"` on real daemons and a real Docker engine: a script job whose
node is SIGKILLed mid-run is re-run once, and a client that was following it reconnects
and gets its answer; a job interrupted again is not re-run a third time; a federated
job's entry restarting re-runs it at every site, charging each site once."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sqlite3
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from stimctl.client import AsyncClient, ConnectionFailed, JobFailed
from stimnetd.jobs.recovery import INTERRUPTED_TWICE
from stimnetd.testing import CertFactory, DaemonProcess, free_port, write_node_config
from tests.federation.test_federated_queries import _tiny_catalog
from tests.helpers import client_config

from .conftest import mounts_under, node_containers, wait_for

# A script that runs long enough to be killed mid-run (the container is up by 1 s).
SLOW = b"""
import time
time.sleep(3)
from stimnet_runtime import load_table, emit_count
emit_count("n", len(load_table("s")))
"""
# Under noise a script's outputs each need a range (sample-and-aggregate).
N_OUT = "SELECT clamp(count(*), 0, 100) AS n FROM tiny"
# Names of this run's own: a daemon reaps the containers labelled with its node name.
ENTRY, PEER = f"requeue-a-{os.getpid()}", f"requeue-b-{os.getpid()}"


@dataclass
class Site:
    """One node process, restartable on its config (same port, same store)."""

    name: str
    cfg: Path
    port: int
    proc: DaemonProcess | None = None
    killed: list[int] = field(default_factory=list)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def db(self) -> Path:
        return self.cfg.parent / "state" / "stimnetd.sqlite3"

    async def start(self, certs: Any) -> None:
        self.proc = DaemonProcess(self.cfg)
        await self.proc.wait_healthy(certs, self.address)

    def sigkill(self) -> None:
        assert self.proc is not None
        self.proc.proc.send_signal(signal.SIGKILL)
        self.killed.append(self.proc.proc.wait())
        self.proc.kill()  # closes its log

    def stop(self) -> int:
        return self.proc.stop() if self.proc is not None else 0


def _site(tmp: Path, pki: CertFactory, name: str, peers: list[int] | None = None,
          port: int | None = None) -> Site:
    port = port or free_port()
    cat = _tiny_catalog(tmp / f"data-{name}", [float(a) for a in range(30, 60)])
    cfg = write_node_config(
        tmp / name, pki.issue(name, "node"), name, port=port, catalogs=[cat],
        crl=pki.crl_path, gossip={"enabled": False},
        federation={"peers": [f"127.0.0.1:{p}" for p in peers or []], "subjob_timeout_s": 60},
        scripts={"policy": "auto", "memory_mb": 256, "timeout_s": 30, "warm_containers": 0,
                 "on_restart": "requeue"},
        privacy={"dp": "optional", "budget_epsilon": 100.0,
                 # One block: a noised job is one container, as the kills' timing assumes.
                 "script_max_blocks": 1})
    return Site(name, cfg, port)


@contextlib.asynccontextmanager
async def _sites(tmp: Path, pki: CertFactory, n: int
                 ) -> AsyncIterator[tuple[list[Site], Any]]:
    """`n` sites (the first is the entry; each knows the others), started, and alice's
    certificate; each must stop cleanly, leaving no mount behind."""
    ports = [free_port() for _ in range(n)]
    names = [ENTRY, PEER][:n]
    sites = [_site(tmp, pki, name, [p for p in ports if p != port], port)
             for name, port in zip(names, ports, strict=True)]
    alice = pki.issue("alice", "researcher")
    try:
        for s in sites:
            await s.start(alice)
        yield sites, alice
    finally:
        codes = [s.stop() for s in sites]
        assert codes == [0] * n, codes
    assert mounts_under(tmp) == [], "output tmpfs mounts left behind"


def _counts(site: Site, job_id: str) -> tuple[int, int]:
    """(ledger charges, release audit entries) of `job_id` in the site's store."""
    with sqlite3.connect(site.db) as db:
        charges = db.execute("SELECT COUNT(*) FROM ledger WHERE job_id = ?", (job_id,)).fetchone()
        audits = db.execute("SELECT COUNT(*) FROM audit WHERE action = 'release' AND "
                            "json_extract(detail_json, '$.job') = ?", (job_id,)).fetchone()
    return charges[0], audits[0]


async def _follow(c: AsyncClient, job_id: str) -> list[tuple[str, Any]]:
    """Every event a client following the job gets, until the job ends."""
    return [ev async for ev in c.watch(job_id)]


async def _running_at(c: AsyncClient, job_id: str, sites: list[str]) -> None:
    """Until each of `sites` reports the job's share running (its container is up)."""
    async def running() -> bool:
        try:
            return (await c.get_job(job_id)).state == "running"
        except ConnectionFailed:  # the channel has not reconnected to a restarted node yet
            return False

    await wait_for(running, f"job {job_id} runs", tries=200, every_s=0.1)
    # The entry reports every site's step as it hears it; the row holds them only at the
    # end, so the watchers' events are read: one short watch per look.
    seen: set[str] = set()

    async def all_running() -> bool:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(0.5):
                async for kind, value in c.watch(job_id, follow_restarts=False):
                    if kind == "site" and value.state == "running":
                        seen.add(value.site)
        return seen >= set(sites)

    await wait_for(all_running, f"job {job_id} runs at {sites}", tries=60, every_s=0.1)
    await asyncio.sleep(0.5)  # the script is under way in each container


async def test_a_requeued_job_is_rerun_once_and_its_follower_gets_the_answer(
        tmp_path: Path, pki: CertFactory, sandbox_image: str, docker_client) -> None:
    """SIGKILL mid-run: the restarted node re-runs the job once; a client that was
    watching it reconnects by itself, sees it re-queued after the restart, then gets its
    answer; one charge, one release, no orphan container."""
    async with _sites(tmp_path, pki, 1) as ([entry], alice):
        async with AsyncClient(client_config(alice, entry.address, 60)) as c:
            job = await c.submit_script(SLOW, "tiny", outputs=N_OUT, epsilon=5.0)
            follower = asyncio.create_task(_follow(c, job.id))
            await _running_at(c, job.id, [entry.name])
            entry.sigkill()
            await entry.start(alice)
            events = await asyncio.wait_for(follower, 120)
            again = await c.get_job(job.id)
        assert entry.killed == [-signal.SIGKILL]
        kinds = [k for k, _ in events]
        assert "reconnecting" in kinds
        lost = kinds.index("reconnecting")
        before = [v for k, v in events[:lost] if k == "state"]
        after = [v for k, v in events[lost:] if k == "state"]
        assert [s.requeues for s in before] == [0] * len(before)
        assert after and [s.requeues for s in after] == [1] * len(after)
        assert after[-1].state == "succeeded", after[-1].detail
        answers = [v for k, v in events if k == "result"]
        assert len(answers) == 1 and answers[0].rows[0][0] is not None
        assert (again.state, again.requeues) == ("succeeded", 1)
        assert _counts(entry, job.id) == (1, 1)

        async def reaped() -> bool:
            return not [x for x in node_containers(docker_client, entry.name)
                        if x.get("State") == "running"]

        await wait_for(reaped, "no container of the job is left running", tries=75, every_s=0.2)


async def test_a_job_interrupted_again_during_its_rerun_is_not_run_a_third_time(
        tmp_path: Path, pki: CertFactory, sandbox_image: str, docker_client) -> None:
    """The job's node dies during its run and again during its re-run (as a job that
    itself brought the node down would): after the second restart it is interrupted for
    good, saying why, and its follower gets that as the job's end; nothing was charged."""
    async with _sites(tmp_path, pki, 1) as ([entry], alice):
        async with AsyncClient(client_config(alice, entry.address, 60)) as c:
            job = await c.submit_script(SLOW, "tiny", outputs=N_OUT, epsilon=5.0)
            follower = asyncio.create_task(c.run_job(job))
            for _ in range(2):
                await _running_at(c, job.id, [entry.name])
                entry.sigkill()
                await entry.start(alice)
            with pytest.raises(JobFailed, match="interrupted twice") as failed:
                await asyncio.wait_for(follower, 120)
            final = await c.get_job(job.id)
            await asyncio.sleep(1.0)  # a third run would have its state "running" by now
            still = await c.get_job(job.id)
        assert failed.value.job is not None and failed.value.job.state == "interrupted"
        assert (final.state, final.detail, final.requeues) == ("interrupted", INTERRUPTED_TWICE, 1)
        assert (still.state, still.updated_at) == ("interrupted", final.updated_at)
        assert _counts(entry, job.id) == (0, 0)
        assert [x for x in node_containers(docker_client, entry.name)
                if x.get("State") == "running"] == []


async def test_a_federated_job_is_rerun_at_every_site_after_its_entry_restarts(
        tmp_path: Path, pki: CertFactory, sandbox_image: str, docker_client) -> None:
    """The entry is SIGKILLed while both sites run their shares: restarted, it re-runs the
    job once, the peer resumes its share (audited as such), the follower gets the pooled
    answer of both sites, and each site charged the job once."""
    async with _sites(tmp_path, pki, 2) as ([entry, peer], alice):
        async with AsyncClient(client_config(alice, entry.address, 90)) as c:
            job = await c.submit_script(SLOW, "tiny", outputs=N_OUT, epsilon=5.0,
                                        federated=True, min_sites=2)
            follower = asyncio.create_task(c.run_job(job))
            await _running_at(c, job.id, [entry.name, peer.name])
            entry.sigkill()
            await entry.start(alice)
            answer = await asyncio.wait_for(follower, 180)
            final = await c.get_job(job.id)
        assert (final.state, final.requeues) == ("succeeded", 1)
        assert sorted(s.site for s in final.sites if s.state == "done") == sorted(
            [entry.name, peer.name])
        assert answer.rows[0][0] is not None
        assert _counts(entry, job.id) == (1, 1)
        assert _counts(peer, job.id) == (1, 1)
        with sqlite3.connect(peer.db) as db:
            resumed = db.execute("SELECT COUNT(*) FROM audit WHERE action = 'subjob' AND "
                                 "decision = 'resumed' AND json_extract(detail_json, '$.job')"
                                 " = ?", (job.id,)).fetchone()[0]
        assert resumed == 1
