"""Two installations on one Docker engine with the same node name keep apart: containers
carry the store's installation id, and a daemon's start-up reaping spares the other's."""

from __future__ import annotations

import os
import sqlite3
from pathlib import Path
from typing import Any

from stimctl.client import AsyncClient
from stimnetd.testing import CertFactory, DaemonProcess, free_port, write_node_config
from tests.federation.test_federated_queries import _tiny_catalog
from tests.helpers import client_config

from .conftest import wait_for

TWIN = f"twin-{os.getpid()}"
SLEEPY = b"""
import time
time.sleep(8)
from stimnet_runtime import load_table, emit_count
emit_count("n", len(load_table("s")))
"""


def _install(tmp: Path, pki: CertFactory, cert: Any) -> tuple[DaemonProcess, str]:
    port = free_port()
    cat = _tiny_catalog(tmp / "data", [float(a) for a in range(30, 60)])
    cfg = write_node_config(tmp / "node", cert, TWIN, port=port,
                            catalogs=[cat], crl=pki.crl_path, gossip={"enabled": False},
                            scripts={"policy": "auto", "memory_mb": 256, "timeout_s": 30},
                            privacy={"dp": "optional", "budget_epsilon": 100.0,
                                     "script_max_blocks": 1})
    return DaemonProcess(cfg), f"127.0.0.1:{port}"


def _installation_id(tmp: Path) -> str:
    with sqlite3.connect(tmp / "node" / "state" / "stimnetd.sqlite3") as db:
        row = db.execute("SELECT value FROM meta WHERE key = 'installation_id'").fetchone()
    return bytes(row[0]).decode()


def _twins(docker_client: Any, installation: str | None = None) -> list[dict]:
    labels = ["org.stimnet.managed=true", f"org.stimnet.node={TWIN}"]
    if installation is not None:
        labels.append(f"org.stimnet.installation={installation}")
    return docker_client.api.containers(all=True, filters={"label": labels})


async def test_a_second_installation_spares_the_first_ones_running_job(
        tmp_path: Path, pki: CertFactory, sandbox_image: str, docker_client) -> None:
    """Same node name, different state dirs: starting the second daemon (which reaps at
    start-up) leaves the first's running job container alone, and that job completes."""
    alice, twin = pki.issue("alice", "researcher"), pki.issue(TWIN, "node")
    first, addr_a = _install(tmp_path / "a", pki, twin)
    second = None
    try:
        await first.wait_healthy(alice, addr_a)
        async with AsyncClient(client_config(alice, addr_a, 60)) as c:
            job = await c.submit_script(SLEEPY, "tiny", outputs="SELECT clamp(count(*), 0, 100) AS n FROM tiny",
                                        epsilon=5.0)

            async def running() -> bool:
                return (await c.get_job(job.id)).state == "running"

            await wait_for(running, "the first installation's job runs", tries=200, every_s=0.1)
            ins_a = _installation_id(tmp_path / "a")

            # "running" is recorded before the container is created: wait for it.
            async def a_container() -> bool:
                return bool(_twins(docker_client, ins_a))

            await wait_for(a_container, "the first installation's container", tries=300,
                           every_s=0.1)
            before = {x["Id"] for x in _twins(docker_client, ins_a)}
            assert before  # the job's container (and any zygotes) carry A's id
            second, addr_b = _install(tmp_path / "b", pki, twin)
            await second.wait_healthy(alice, addr_b)
            ins_b = _installation_id(tmp_path / "b")
            assert ins_a != ins_b

            # B reaps before it prewarms: once B's zygote exists, its reaping is over.
            async def b_warm() -> bool:
                return bool(_twins(docker_client, ins_b))

            await wait_for(b_warm, "the second installation's zygote", tries=300, every_s=0.1)
            assert before <= {x["Id"] for x in _twins(docker_client, ins_a)}
            assert (await c.get_job(job.id)).state == "running"
            ans = await c.run_job(await c.get_job(job.id))
            assert ans.rows[0][0] is not None
    finally:
        if second is not None:
            assert second.stop() == 0
        assert first.stop() == 0
    assert _twins(docker_client) == []
