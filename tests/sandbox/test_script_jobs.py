"""Script jobs through real daemons and a real Docker engine: policy, privacy, restarts."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from stimctl.client import AsyncClient, InvalidRequest, JobFailed, Refused
from stimnetd.testing import CertFactory, DaemonProcess, free_port, write_node_config
from tests.federation.test_federated_queries import _tiny_catalog
from tests.helpers import client_config

from .conftest import mounts_under, wait_for

COUNT = b"""
from stimnet_runtime import load_table, emit_count, emit_mean
df = load_table("s")
emit_count("n", len(df))
emit_mean("mean_age", "age", df["age"])
"""
ROW_LEVEL = b"""
from stimnet_runtime import load_table, emit_count
df = load_table("s")
for sid in df["sid"]:
    emit_count(f"subject_{sid}", 1)
"""
SPIN = b"while True:\n    pass\n"
# Names of this run's own: a daemon reaps every container labelled with its node name at
# start-up, so a daemon of another test run sharing the engine must not share the name.
NODE = f"node-a-{os.getpid()}"
SITE_A, SITE_B = f"site-a-{os.getpid()}", f"site-b-{os.getpid()}"
# What each script emits, declared with it (sites require the declaration by default).
COUNT_OUT = "SELECT count(*) AS n, avg(age) AS mean_age FROM tiny"
N_OUT = "SELECT count(*) AS n FROM tiny"
# Under noise a script's outputs each need a range (sample-and-aggregate).
N_RANGED = "SELECT clamp(count(*), 0, 100) AS n FROM tiny"
SLOW = b"""
import time
time.sleep(3)
from stimnet_runtime import load_table, emit_count
emit_count("n", len(load_table("s")))
"""


def _node(tmp: Path, pki: CertFactory, *, policy: str = "auto", **scripts: Any) -> tuple[Path, int]:
    port = free_port()
    cat = _tiny_catalog(tmp / "data", [float(a) for a in range(30, 60)])
    cfg = write_node_config(tmp / "node", pki.issue(NODE, "node"), NODE, port=port,
                            catalogs=[cat], crl=pki.crl_path, gossip={"enabled": False},
                            scripts={"policy": policy, "memory_mb": 256, "timeout_s": 20,
                                     **scripts},
                            privacy={"dp": "optional", "budget_epsilon": 100.0,
                                     # One block: a noised job is one container, as these
                                     # restart tests' timings assume.
                                     "script_max_blocks": 1})
    return cfg, port


def _containers(docker_client: Any, node: str = NODE) -> list[dict]:
    return docker_client.api.containers(all=True, filters={
        "label": ["org.stimnet.managed=true", f"org.stimnet.node={node}"]})


async def test_script_job_runs_and_releases_aggregates(tmp_path: Path, pki: CertFactory,
                                                       sandbox_image: str, docker_client) -> None:
    """A script's emitted aggregates come back through the privacy layer as a result."""
    async with _node_clients(tmp_path, pki) as (c, _):
        ans = await c.run_job(await c.submit_script(COUNT, "tiny", outputs=COUNT_OUT))
    assert ans.rows == [[30, pytest.approx(44.5)]]
    assert ans.doc["kind"] == "script"
    assert _containers(docker_client) == []


@contextlib.asynccontextmanager
async def _node_clients(tmp: Path, pki: CertFactory, *, policy: str = "auto", **scripts: Any
                        ) -> AsyncIterator[tuple[AsyncClient, AsyncClient]]:
    """A node process; (alice's client, an admin's client); it must stop cleanly."""
    cfg, port = _node(tmp, pki, policy=policy, **scripts)
    proc = DaemonProcess(cfg)
    alice, ops = pki.issue("alice", "researcher"), pki.issue("ops", "admin")
    addr = f"127.0.0.1:{port}"
    try:
        await proc.wait_healthy(alice, addr)
        async with AsyncClient(client_config(alice, addr, 60)) as c, \
                AsyncClient(client_config(ops, addr, 60)) as admin:
            yield c, admin
    finally:
        assert proc.stop() == 0


async def test_review_policy_holds_until_an_admin_decides(tmp_path: Path, pki: CertFactory,
                                                          sandbox_image: str) -> None:
    """Under `review` a job waits; approve runs it (remembered per SHA-256), deny fails it."""
    async with _node_clients(tmp_path, pki, policy="review") as (c, admin):
        job = await c.submit_script(COUNT, "tiny", outputs=COUNT_OUT)
        assert job.state == "awaiting_approval"
        assert "approve" in job.detail
        await admin.approve(job.id, remember=True)
        ans = await c.run_job(job)
        assert ans.rows[0][0] == 30
        again = await c.submit_script(COUNT, "tiny", outputs=COUNT_OUT)  # same script: remembered
        assert again.state == "queued"
        await c.run_job(again)
        other = await c.submit_script(SLOW, "tiny", outputs=N_OUT)
        assert other.state == "awaiting_approval"
        await admin.deny(other.id)
        with pytest.raises(JobFailed, match="denied by site admin ops"):
            await c.run_job(other)


async def test_review_policy_holds_this_sites_share_of_a_federated_script(
        tmp_path: Path, pki: CertFactory, sandbox_image: str, docker_client) -> None:
    """The entry node's own share of a federated script is under its script policy too:
    under `review` that share answers "awaiting approval" at once, as a peer does, no
    container starts, and an admin approving the request it leaves (remembered) lets the
    resubmitted script run here."""
    async with _node_clients(tmp_path, pki, policy="review") as (c, admin):
        job = await c.submit_script(COUNT, "tiny", outputs=COUNT_OUT, federated=True)
        with pytest.raises(JobFailed, match=rf"{NODE}: refused \(awaiting approval: site "
                                             "policy 'review'"):
            await c.run_job(job)
        assert _containers(docker_client) == []
        pending = [j for j in await admin.list_jobs() if j.state == "awaiting_approval"]
        assert len(pending) == 1
        assert job.id in pending[0].detail
        await admin.approve(pending[0].id, remember=True)
        ans = await c.run_job(await c.submit_script(COUNT, "tiny", outputs=COUNT_OUT, federated=True))
    assert ans.rows[0][0] == 30


async def test_deny_policy_refuses_scripts(tmp_path: Path, pki: CertFactory) -> None:
    """A site whose policy is `deny` refuses script jobs with the policy's name."""
    cfg, port = _node(tmp_path, pki, policy="deny")
    proc = DaemonProcess(cfg)
    alice = pki.issue("alice", "researcher")
    try:
        await proc.wait_healthy(alice, f"127.0.0.1:{port}")
        async with AsyncClient(client_config(alice, f"127.0.0.1:{port}")) as c:
            with pytest.raises(Refused, match="script policy is 'deny'"):
                await c.submit_script(COUNT, "tiny", outputs=COUNT_OUT)
    finally:
        assert proc.stop() == 0


async def test_row_level_output_releases_nothing(tmp_path: Path, pki: CertFactory,
                                                 sandbox_image: str) -> None:
    """A script emitting a 'count' of 1 per subject gets every output withheld by k_min
    (at a site that runs scripts without declared outputs: with them, such names would be
    refused as undeclared)."""
    async with _node_clients(tmp_path, pki, declared_outputs="optional") as (c, _):
        with pytest.raises(JobFailed, match="suppressed.*k_min = 5"):
            await c.run_job(await c.submit_script(ROW_LEVEL, "tiny"))
    with sqlite3.connect(tmp_path / "node" / "state" / "stimnetd.sqlite3") as db:
        decisions = [r[0] for r in db.execute("SELECT decision FROM releases")]
    assert decisions == ["suppressed"]


HIST = b"""
from stimnet_runtime import load_table, emit_histogram
emit_histogram("ages", "age", load_table("s")["age"], [0, 50, 100])
"""
BY_DIAGNOSIS = b"""
from stimnet_runtime import load_table, emit_count
df = load_table("s")
for level in LEVELS:
    emit_count("n", int((df["diagnosis"] == level).sum()), group={"diagnosis": level})
"""


async def test_a_script_releases_only_exactly_what_its_job_declared(
        tmp_path: Path, pki: CertFactory, sandbox_image: str) -> None:
    """The outputs a script job declares (signed with it) are all a site releases: a job
    declaring nothing is refused at once (the default `declared_outputs = "required"`), an
    output not declared, edges other than the declared ones, or a grouped output missing
    some of its groups is refused after the run; what matches is released. The names and
    edges a script would otherwise pick at run time, and which groups it emits, could carry
    row data past k_min and DP."""
    async with _node_clients(tmp_path, pki) as (c, _):
        with pytest.raises(Refused, match="requires a script job to declare its outputs"):
            await c.submit_script(COUNT, "tiny")
        with pytest.raises(InvalidRequest, match="have no WHERE: the script chooses its rows"):
            await c.submit_script(COUNT, "tiny", outputs=COUNT_OUT + " WHERE age > 40")
        with pytest.raises(InvalidRequest, match="a script cannot emit quantiles"):
            await c.submit_script(COUNT, "tiny", outputs="SELECT median(age) FROM tiny")
        with pytest.raises(JobFailed, match="emitted an output its job did not declare"):
            await c.run_job(await c.submit_script(COUNT, "tiny", outputs=N_OUT))
        with pytest.raises(JobFailed, match=r"output 'ages': the script emitted something "
                                            r"other than the declared histogram\(age\) "
                                            r"edges \[0.0, 40.0, 100.0\]"):
            await c.run_job(await c.submit_script(
                HIST, "tiny", outputs="SELECT histogram(age, 0, 40, 100) AS ages FROM tiny"))
        grouped = "SELECT count(*) AS n FROM tiny GROUP BY diagnosis"
        with pytest.raises(JobFailed, match=r"output 'n': not every one of its 3 declared "
                                            r"group\(s\) emitted"):
            await c.run_job(await c.submit_script(b"LEVELS = ['PD']" + BY_DIAGNOSIS, "tiny",
                                                  outputs=grouped))
        every = b"LEVELS = ['PD', 'ET', 'dystonia']" + BY_DIAGNOSIS
        ans = await c.run_job(await c.submit_script(every, "tiny", outputs=grouped))
        assert {r[0]: r[1] for r in ans.rows} == {"PD": 30, "ET": None, "dystonia": None}
        await c.run_job(await c.submit_script(
            HIST, "tiny", outputs="SELECT histogram(age, 0, 50, 100) AS ages FROM tiny"))
    with sqlite3.connect(tmp_path / "node" / "state" / "stimnetd.sqlite3") as db:
        released = db.execute("SELECT COUNT(*) FROM releases").fetchone()[0]
        refused = [json.loads(d)["reason"] for (d,) in db.execute(
            "SELECT detail_json FROM audit WHERE action = 'release' AND decision = 'refused'")]
    assert released == 2  # the two that matched their declarations
    assert ["declared" in r for r in refused] == [True, True, True], refused


async def test_health_stays_prompt_while_a_script_spins(tmp_path: Path, pki: CertFactory,
                                                        sandbox_image: str, docker_client) -> None:
    """While a CPU-spinning script runs, the daemon answers every health check (all of them
    before the job ends), and the script then hits its wall-clock limit."""
    cfg, port = _node(tmp_path, pki, timeout_s=6)
    proc = DaemonProcess(cfg)
    alice = pki.issue("alice", "researcher")
    addr = f"127.0.0.1:{port}"
    try:
        await proc.wait_healthy(alice, addr)
        async with AsyncClient(client_config(alice, addr, 60)) as c:
            job = await c.submit_script(SPIN, "tiny", outputs=N_OUT)

            async def running() -> bool:
                return (await c.get_job(job.id)).state == "running"

            await wait_for(running, "the spinning job runs", tries=200, every_s=0.1)
            creds = client_config(alice, addr).credentials()
            answers = []
            async with grpc.aio.secure_channel(addr, creds) as ch:
                stub = health_pb2_grpc.HealthStub(ch)
                for _ in range(10):
                    r = await stub.Check(health_pb2.HealthCheckRequest(), timeout=5)
                    answers.append(r.status)
                    await asyncio.sleep(0.1)
            # Event order: every check was answered while the script still spun. (How long
            # a check takes meanwhile is a figure in bench/sandbox.py.)
            assert (await c.get_job(job.id)).state == "running"
            assert answers == [health_pb2.HealthCheckResponse.SERVING] * 10
            with pytest.raises(JobFailed, match="wall-clock limit"):
                await c.run_job(job)
    finally:
        assert proc.stop() == 0
    assert _containers(docker_client) == []


@pytest.mark.parametrize("on_restart", ["interrupt", "requeue"])
async def test_sigkill_during_a_script_job(tmp_path: Path, pki: CertFactory, sandbox_image: str,
                                           docker_client, on_restart: str) -> None:
    """SIGKILL mid-job: after restart the job is interrupted or re-run once; no orphan container."""
    cfg, port = _node(tmp_path, pki, on_restart=on_restart)
    alice = pki.issue("alice", "researcher")
    addr = f"127.0.0.1:{port}"
    proc = DaemonProcess(cfg)
    try:
        await proc.wait_healthy(alice, addr)
        async with AsyncClient(client_config(alice, addr, 60)) as c:
            # Epsilon 5: a noised count of 30 clears the noisy threshold (7) all but always.
            job = await c.submit_script(SLOW, "tiny", outputs=N_RANGED, epsilon=5.0)

            async def running() -> bool:
                return (await c.get_job(job.id)).state == "running"

            await wait_for(running, "the job runs", tries=200, every_s=0.1)
        await asyncio.sleep(1.0)  # the container is running the script now
        proc.proc.send_signal(signal.SIGKILL)
        proc.proc.wait()
        orphans = {c["Id"] for c in _containers(docker_client)}
        assert len(orphans) >= 1  # the crash left its container(s) behind
        proc = DaemonProcess(cfg)
        await proc.wait_healthy(alice, addr)
        async with AsyncClient(client_config(alice, addr, 60)) as c:
            if on_restart == "interrupt":
                j = await c.get_job(job.id)
                assert j.state == "interrupted"
                assert "restarted" in j.detail
            else:
                ans = await c.run_job(await c.get_job(job.id))
                assert ans.rows[0][0] is not None

        # (a fresh pre-created container for the next job may exist; the orphans may not)
        async def reaped() -> bool:
            return not orphans & {c["Id"] for c in _containers(docker_client)}

        await wait_for(reaped, "the orphaned containers are reaped", tries=75, every_s=0.2)
    finally:
        assert proc.stop() == 0
    # The killed daemon's output tmpfs outlived it; the restarted one's sweep unmounted
    # it and its own stop unmounted the rest.
    assert mounts_under(tmp_path) == [], "output tmpfs mounts left behind"
    with sqlite3.connect(tmp_path / "node" / "state" / "stimnetd.sqlite3") as db:
        charges = db.execute("SELECT COUNT(*) FROM ledger WHERE job_id = ?", (job.id,)).fetchone()[0]
        releases = db.execute("SELECT COUNT(*) FROM releases WHERE job_id = ?",
                              (job.id,)).fetchone()[0]
    assert (charges, releases) == ((0, 0) if on_restart == "interrupt" else (1, 1))


async def test_sigkill_around_result_release_never_double_charges(
        tmp_path: Path, pki: CertFactory, sandbox_image: str, docker_client) -> None:
    """Kills at several moments up to and across the release: each job ends released exactly
    once (one ledger charge, one release audit entry), and no orphan container remains."""
    cfg, port = _node(tmp_path, pki, on_restart="requeue")
    alice = pki.issue("alice", "researcher")
    addr = f"127.0.0.1:{port}"
    proc = DaemonProcess(cfg)
    jobs = []
    try:
        for delay in (0.3, 2.8, 3.3, 3.8):
            await proc.wait_healthy(alice, addr)
            async with AsyncClient(client_config(alice, addr, 60)) as c:
                job = await c.submit_script(SLOW, "tiny", outputs=N_RANGED, epsilon=5.0)
                jobs.append(job.id)
                while (await c.get_job(job.id)).state not in ("running", "succeeded"):
                    await asyncio.sleep(0.05)
            await asyncio.sleep(delay)
            proc.proc.send_signal(signal.SIGKILL)
            proc.proc.wait()
            proc = DaemonProcess(cfg)
        await proc.wait_healthy(alice, addr)
        async with AsyncClient(client_config(alice, addr, 60)) as c:
            for jid in jobs:
                async def ended(jid: str = jid) -> bool:
                    return (await c.get_job(jid)).state in ("succeeded", "failed")

                await wait_for(ended, f"job {jid} ends", tries=300, every_s=0.2)
                j = await c.get_job(jid)
                assert j.state == "succeeded", j.detail
    finally:
        assert proc.stop() == 0
    with sqlite3.connect(tmp_path / "node" / "state" / "stimnetd.sqlite3") as db:
        for jid in jobs:
            charges = db.execute("SELECT COUNT(*) FROM ledger WHERE job_id = ?", (jid,)).fetchone()[0]
            audits = db.execute("SELECT COUNT(*) FROM audit WHERE action = 'release' AND "
                                "json_extract(detail_json, '$.job') = ?", (jid,)).fetchone()[0]
            assert (charges, audits) == (1, 1), jid
    assert _containers(docker_client) == []


@contextlib.asynccontextmanager
async def _two_sites(tmp: Path, pki: CertFactory, scripts: dict[str, dict[str, Any]]
                     ) -> AsyncIterator[AsyncClient]:
    """SITE_A (the entry) and SITE_B as processes, each with its `scripts` section;
    alice's client of SITE_A. Both must stop cleanly."""
    ports = [free_port() for _ in range(2)]
    procs = []
    for i, name in enumerate((SITE_A, SITE_B)):
        cat = _tiny_catalog(tmp / f"data-{name}", [float(a) for a in range(30, 60)])
        cfg = write_node_config(
            tmp / name, pki.issue(name, "node"), name, port=ports[i], catalogs=[cat],
            crl=pki.crl_path, gossip={"enabled": False},
            federation={"peers": [f"127.0.0.1:{ports[1 - i]}"], "subjob_timeout_s": 60},
            scripts={"policy": "auto", "memory_mb": 256, "timeout_s": 30, "warm_containers": 0,
                     **scripts[name]})
        procs.append(DaemonProcess(cfg))
    alice = pki.issue("alice", "researcher")
    try:
        for p, port in zip(procs, ports, strict=True):
            await p.wait_healthy(alice, f"127.0.0.1:{port}")
        async with AsyncClient(client_config(alice, f"127.0.0.1:{ports[0]}", 90)) as c:
            yield c
    finally:
        for p in procs:
            assert p.stop() == 0


async def test_a_sites_sandbox_concurrency_covers_its_peers_sub_jobs(
        tmp_path: Path, pki: CertFactory, sandbox_image: str, docker_client) -> None:
    """`[scripts] concurrency` is the site's number of containers at once, whoever asks:
    two federated scripts arriving at a peer together run there one after the other, not
    each in a container started the moment its sub-job arrives."""
    # The entry runs both jobs at once; the peer has one sandbox slot.
    async with _two_sites(tmp_path, pki, {SITE_A: {"concurrency": 2},
                                          SITE_B: {"concurrency": 1}}) as c:
        jobs = [await c.submit_script(SLOW, "tiny", outputs=N_OUT, federated=True,
                                      min_sites=2) for _ in range(2)]
        runs = asyncio.gather(*[c.run_job(j) for j in jobs])
        most = 0
        while not runs.done():
            running = [x for x in _containers(docker_client, SITE_B)
                       if x.get("State") == "running"]
            most = max(most, len(running))
            await asyncio.sleep(0.1)
        answers = await runs
    assert [a.rows[0][0] for a in answers] == [60, 60]
    assert most == 1, most


async def test_a_peers_script_failure_reaches_the_researcher_with_its_log(
        tmp_path: Path, pki: CertFactory, sandbox_image: str, docker_client) -> None:
    """A peer's log lines (what its log_policy lets out) travel as log lines, not as a
    site state the entry would refuse: the entry reports the peer's failure with its
    reason, and under log_policy 'full' a script that prints still succeeds."""
    crash = b"print('hello from the script')\nraise ValueError('boom')\n"
    async with _two_sites(tmp_path, pki, {SITE_A: {"log_policy": "full"},
                                          SITE_B: {"log_policy": "full"}}) as c:
        lines: list[str] = []
        job = await c.submit_script(crash, "tiny", outputs=N_OUT, federated=True)
        with pytest.raises(JobFailed) as failed:
            await c.run_job(job, lambda kind, v: lines.append(v) if kind == "log" else None)
        printing = b"print('hello')\n" + SLOW.replace(b"time.sleep(3)", b"")
        ans = await c.run_job(await c.submit_script(printing, "tiny", outputs=N_OUT,
                                                    federated=True, min_sites=2))
    detail = str(failed.value)
    assert "unknown state" not in detail, detail
    assert f"{SITE_B}: refused (script failed: script raised ValueError" in detail, detail
    assert f"{SITE_B}: hello from the script" in lines, lines
    assert ans.rows[0][0] == 60


async def test_failures_read_the_same_whatever_the_script_chose(
        tmp_path: Path, pki: CertFactory, sandbox_image: str) -> None:
    """With log_policy 'none', scripts that fail in different ways at different lines (an
    exception type and line, an exit status each could encode data) are told the same
    fixed reason and no log line: what a failing script chooses never leaves the site."""
    failing = [
        b"x = 1 / 0\n",
        b"import sys\n\n\n\n\nsys.exit(7)\n",
        b"import os\n" + b"\n" * 40 + b"raise KeyError(os.environ.get('HOME', 's00'))\n",
        b"class Age71(Exception):\n    pass\n\n\nraise Age71('71')\n",
    ]
    async with _node_clients(tmp_path, pki, log_policy="none", timeout_s=4) as (c, _):
        told: list[str] = []
        lines: list[str] = []
        for script in failing:
            job = await c.submit_script(script, "tiny", outputs=N_OUT)
            with pytest.raises(JobFailed) as failed:
                await c.run_job(job, lambda kind, v: lines.append(v) if kind == "log" else None)
            told.append(str(failed.value).replace(job.id, "JOB"))
        with pytest.raises(JobFailed, match=r"timed out \(wall-clock limit 4 s\)"):
            await c.run_job(await c.submit_script(SPIN, "tiny", outputs=N_OUT))
    assert len(set(told)) == 1, told
    assert "crashed" in told[0], told
    for leak in ("ZeroDivision", "KeyError", "Age71", "line", "status", " 7", "s00"):
        assert leak not in told[0], told
    assert lines == []


async def test_one_researchers_backlog_delays_anothers_job_by_one_job_at_most(
        tmp_path: Path, pki: CertFactory, sandbox_image: str) -> None:
    """With one sandbox slot, alice queues 16 sleeping jobs; bob's trivial job, submitted
    after them, gets the next slot (jobs/fair.py): when it has succeeded, at most the one
    job of alice's that held the slot has run (a FIFO would run all 16 first)."""
    sleepy = SLOW.replace(b"time.sleep(3)", b"time.sleep(2)")
    async with _node_clients(tmp_path, pki, concurrency=1) as (alice, _):
        bob_id = pki.issue("bob", "researcher")
        async with AsyncClient(client_config(bob_id, alice.config.address, 60)) as bob:
            backlog = [await alice.submit_script(sleepy, "tiny", outputs=N_OUT)
                       for _ in range(16)]
            ans = await bob.run_job(await bob.submit_script(COUNT, "tiny", outputs=COUNT_OUT))
            states = [(await alice.get_job(j.id)).state for j in backlog]
            for j in backlog:
                with contextlib.suppress(Exception):
                    await alice.cancel(j.id)
    assert ans.rows[0][0] == 30
    done = [s for s in states if s == "succeeded"]
    assert len(done) <= 1, states
    assert states.count("queued") >= 14, states
