"""Under dp required a script job's answer leaves the site at a multiple of `[scripts]
release_slot_s` after its start, however long its blocks ran (real daemon, real Docker).
The residual left in the release time is a bench figure (bench/sandbox.py)."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import pytest

from stimctl.client import AsyncClient
from stimnetd.testing import CertFactory, DaemonProcess, free_port, write_node_config
from tests.federation.test_federated_queries import _tiny_catalog
from tests.helpers import client_config

pytestmark = pytest.mark.docker

SLOT_S = 20.0
SLEEP_S = 4.0
AGES = [float(20 + (i * 37) % 60) for i in range(20)]  # two blocks of 10
OUT = "SELECT clamp(avg(age), 0, 100) AS m FROM tiny"
# Sleeps in every block holding a subject over 70: how long the job runs depends on the data.
SLEEPY = f"""
import time
from stimnet_runtime import load_table, emit_mean
df = load_table("s")
if (df["age"] > 70).any():
    time.sleep({SLEEP_S})
emit_mean("m", "age", df["age"])
""".encode()
QUICK = b"""
from stimnet_runtime import load_table, emit_mean
df = load_table("s")
emit_mean("m", "age", df["age"])
"""


def _holds(proc: DaemonProcess) -> dict[str, dict[str, Any]]:
    """The site's log record of each noised share's hold, by job id."""
    out = {}
    for line in proc.log().splitlines():
        if "held to its release slot" in line:
            rec = json.loads(line)
            out[rec["job_id"]] = rec
    return out


async def test_data_dependent_sleeps_are_released_in_the_same_slot(
        tmp_path: Path, pki: CertFactory, sandbox_image: str) -> None:
    """A job whose blocks sleep SLEEP_S when they hold a subject over 70, and the same job
    without the sleep: both ran less than one slot, and both were held to the first slot
    (the researcher waited at least that long for each)."""
    # Prepare
    assert any(a > 70 for a in AGES)
    name, port = f"sbx-timing-{os.getpid()}", free_port()
    cfg = write_node_config(tmp_path / "node", pki.issue(name, "node"), name, port=port,
                            catalogs=[_tiny_catalog(tmp_path / "data", AGES)],
                            crl=pki.crl_path, gossip={"enabled": False},
                            scripts={"policy": "auto", "timeout_s": 20, "warm_containers": 0,
                                     "release_slot_s": SLOT_S},
                            privacy={"dp": "required", "budget_epsilon": 100.0})
    proc = DaemonProcess(cfg)
    alice = pki.issue("alice", "researcher")
    addr = f"127.0.0.1:{port}"
    waited = {}
    try:
        await proc.wait_healthy(alice, addr)
        async with AsyncClient(client_config(alice, addr, 120)) as c:
            # Execute
            for label, script in (("sleepy", SLEEPY), ("quick", QUICK)):
                t = time.monotonic()
                job = await c.submit_script(script, "tiny", outputs=OUT, epsilon=1.0)
                await c.run_job(job)
                waited[label] = (job.id, time.monotonic() - t)
    finally:
        assert proc.stop() == 0
    # Assert
    holds = _holds(proc)
    sleepy, quick = (holds[waited[k][0]] for k in ("sleepy", "quick"))
    assert sleepy["ran_s"] >= SLEEP_S  # the sleep happened: the run time followed the data
    assert (sleepy["slots"], quick["slots"]) == (1, 1), (sleepy, quick)
    assert sleepy["slot_s"] == quick["slot_s"] == SLOT_S
    assert min(w for _, w in waited.values()) >= SLOT_S
