"""A hostile result of the full 8 MiB result limit is read and checked off the daemon's
event loop (an in-process daemon, real Docker): the reads and checks a result goes through
(outputs.read_outputs, result.parse_result) are recorded with the thread each ran on. How
live the loop stays meanwhile is a bench figure (bench/sandbox.py), never a bound here."""

from __future__ import annotations

import asyncio
import os
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from stimctl.client import AsyncClient, JobFailed
from stimnetd.config import load_config
from stimnetd.daemon import Daemon
from stimnetd.jobs import blocks as job_blocks
from stimnetd.jobs import scripts as job_scripts
from stimnetd.sandbox import container
from stimnetd.testing import CertFactory, free_port, write_node_config
from tests.federation.test_federated_queries import _tiny_catalog
from tests.helpers import client_config

pytestmark = pytest.mark.docker

RESULT_MIB = 8
# A result of the whole 8 MiB limit: a result.json just under its own 1 MiB limit (a
# histogram of 240,000 zeros, which the daemon must decode in full before it can tell the
# counts do not fit the declaration) and an array file of the rest.
HOSTILE = f"""
import numpy as np
json_bytes = 1024 * 1024 - 65536
n = (json_bytes - 400) // 4
np.save("/out/big.npy", np.zeros(({RESULT_MIB} * 1024 * 1024 - json_bytes - 65536) // 8))
doc = ('{{"version": 1, "aggregates": [{{"kind": "histogram", "name": "m", "n": 1, '
       '"stats": {{"counts": {{"npy": "big.npy"}}}}, "meta": {{"field": "age", "edges": [0, 100]}}}}, '
       '{{"kind": "histogram", "name": "m2", "n": 1, '
       '"stats": {{"counts": [' + ",".join(["0.0"] * n) + ']}}, '
       '"meta": {{"field": "age", "edges": [0, 100]}}}}]}}')
open("/out/result.json", "w").write(doc)
print("wrote", len(doc))
""".encode()
OUT = "SELECT clamp(avg(age), 0, 100) AS m FROM tiny"


class ThreadLog:
    """Wraps functions to record, per call, whether it ran on an event loop's thread."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, bool]] = []

    def wrap(self, name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def call(*args: Any, **kwargs: Any) -> Any:
            try:
                asyncio.get_running_loop()
                on_loop = True
            except RuntimeError:
                on_loop = False
            self.calls.append((name, on_loop or threading.current_thread() is threading.main_thread()))
            return fn(*args, **kwargs)

        return call


@pytest.mark.parametrize("dp", ["off", "required"])
async def test_a_hostile_full_size_result_is_parsed_off_the_loop(
        tmp_path: Path, pki: CertFactory, sandbox_image: str, monkeypatch: pytest.MonkeyPatch,
        dp: str) -> None:
    """dp off: the script's one run; dp required: each sample-and-aggregate block's run. The
    8 MiB result file is read and decoded, and its values checked, in worker threads only;
    the job then fails (dp off) or counts its blocks as the default (dp required)."""
    # Prepare
    threads = ThreadLog()
    monkeypatch.setattr(container, "read_outputs", threads.wrap("read", container.read_outputs))
    monkeypatch.setattr(job_scripts, "parse_result",
                        threads.wrap("parse", job_scripts.parse_result))
    monkeypatch.setattr(job_blocks, "parse_result", threads.wrap("parse", job_blocks.parse_result))
    name, port = f"sbx-hostile-{dp}-{os.getpid()}", free_port()
    cfg = write_node_config(tmp_path / "node", pki.issue(name, "node"), name, port=port,
                            catalogs=[_tiny_catalog(tmp_path / "data",
                                                    [float(20 + i) for i in range(20)])],
                            crl=pki.crl_path, gossip={"enabled": False},
                            scripts={"policy": "auto", "timeout_s": 30, "warm_containers": 0,
                                     "result_mb": RESULT_MIB, "release_slot_s": 0,
                                     "declared_outputs": "optional" if dp == "off" else "required"},
                            privacy={"dp": dp, "budget_epsilon": 100.0})
    daemon = Daemon(load_config(cfg))
    await daemon.start()
    alice = pki.issue("alice", "researcher")
    try:
        async with AsyncClient(client_config(alice, f"127.0.0.1:{port}", 120)) as c:
            # Execute
            job = await c.submit_script(HOSTILE, "tiny", outputs=None if dp == "off" else OUT,
                                        epsilon=1.0 if dp == "required" else None)
            if dp == "off":
                with pytest.raises(JobFailed) as failed:
                    await c.run_job(job)
                print("job failed:", failed.value)
            else:
                await c.run_job(job)
    finally:
        await daemon.shutdown()
    # Assert: every read was followed by its check, and none ran on the loop.
    reads = [c for c in threads.calls if c[0] == "read"]
    parses = [c for c in threads.calls if c[0] == "parse"]
    assert len(reads) == (1 if dp == "off" else 2), threads.calls
    assert len(parses) == len(reads), threads.calls
    assert [on_loop for _, on_loop in threads.calls] == [False] * len(threads.calls)
