"""bench/sandbox.py's figures for issue 21's channels, each against a baseline measured in
the same run: the release-time residual of a noised script job whose blocks sleep on the
data (held to `[scripts] release_slot_s`) against the same jobs unheld; a daemon's
health-check p99 while it reads a hostile 8 MiB result against its p99 during an honest
job; and the private per-job copy of a catalog (workspace.py) against a plain workspace."""

from __future__ import annotations

import asyncio
import os
import shutil
import statistics
import time
from pathlib import Path

from stimctl.client import AsyncClient, JobFailed
from stimnetd.testing import CertFactory, CertPaths, DaemonProcess, free_port, write_node_config
from tests.helpers import client_config

SLEEP_S = 3.0
# Blocks holding a subject over 70 sleep: the job's run time follows the data.
SLEEPY = (b"import time\nfrom stimnet_runtime import load_table, emit_mean\n"
          b"df = load_table('s')\nif (df['age'] > 70).any():\n"
          b"    time.sleep(" + str(SLEEP_S).encode() + b")\n"
          b"emit_mean('m', 'age', df['age'])\n")
QUICK = b"from stimnet_runtime import load_table, emit_mean\ndf = load_table('s')\n" \
        b"emit_mean('m', 'age', df['age'])\n"
MEAN_OUT = "SELECT clamp(avg(age), 0, 100) AS m FROM tiny"
# The whole 8 MiB result limit: a result.json just under its own 1 MiB limit, made to be
# slow to decode (240,000 numbers), and an array file of the rest.
HOSTILE = (b"import numpy as np\njson_bytes = 1024 * 1024 - 65536\n"
           b"n = (json_bytes - 400) // 4\n"
           b"np.save('/out/big.npy', np.zeros((8 * 1024 * 1024 - json_bytes - 65536) // 8))\n"
           b"doc = ('{\"version\": 1, \"aggregates\": [{\"kind\": \"histogram\", \"name\": \"m\", "
           b"\"n\": 1, \"stats\": {\"counts\": {\"npy\": \"big.npy\"}}, "
           b"\"meta\": {\"field\": \"age\", \"edges\": [0, 100]}}, "
           b"{\"kind\": \"histogram\", \"name\": \"m2\", "
           b"\"n\": 1, \"stats\": {\"counts\": [' + ','.join(['0.0'] * n) + ']}, "
           b"\"meta\": {\"field\": \"age\", \"edges\": [0, 100]}}]}')\n"
           b"open('/out/result.json', 'w').write(doc)\n")
HONEST = b"from stimnet_runtime import emit_count\nemit_count('n', 10)\n"


def _daemon(tmp: Path, pki: CertFactory, name: str, ages: list[float], *,
            scripts: dict, privacy: dict) -> tuple[DaemonProcess, str]:
    from tests.federation.test_federated_queries import _tiny_catalog

    port = free_port()
    cat = _tiny_catalog(tmp / f"data-{name}", ages)
    cfg = write_node_config(tmp / name, pki.issue(name, "node"), name, port=port,
                            catalogs=[cat], crl=pki.crl_path, logging={"level": "warning"},
                            scripts={"policy": "auto", "timeout_s": 30, **scripts},
                            privacy=privacy, gossip={"enabled": False})
    return DaemonProcess(cfg), f"127.0.0.1:{port}"


async def release_residual(tmp: Path, pki: CertFactory, alice: CertPaths, slot_s: float,
                           runs: int) -> tuple[float, float]:
    """(|median sleepy − median quick| submit → answer, held to `slot_s`; the same unheld)."""
    ages = [float(20 + (i * 37) % 60) for i in range(20)]  # two blocks, both over 70
    out = []
    for slot in (slot_s, 0.0):
        name = f"sbx-bench-slot{int(slot)}-{os.getpid()}"
        proc, addr = _daemon(tmp, pki, name, ages, scripts={"release_slot_s": slot,
                                                            "warm_containers": 0},
                             privacy={"dp": "required", "budget_epsilon": 1000.0})
        took: dict[bytes, list[float]] = {SLEEPY: [], QUICK: []}
        try:
            await proc.wait_healthy(alice, addr)
            async with AsyncClient(client_config(alice, addr, 300)) as c:
                for _ in range(runs):
                    for script in (SLEEPY, QUICK):
                        t = time.perf_counter()
                        await c.run_job(await c.submit_script(script, "tiny", outputs=MEAN_OUT,
                                                              epsilon=1.0))
                        took[script].append(time.perf_counter() - t)
        finally:
            proc.stop()
        out.append(abs(statistics.median(took[SLEEPY]) - statistics.median(took[QUICK])))
    return out[0], out[1]


def _p99(xs: list[float]) -> float:
    return statistics.quantiles(xs, n=100)[98] if len(xs) >= 2 else xs[0]


async def health_p99_ratio(tmp: Path, pki: CertFactory, alice: CertPaths,
                           runs: int) -> tuple[float, float, int]:
    """(p99 of health-check latency during hostile 8 MiB result jobs, during honest jobs,
    samples of each), on one daemon, the jobs interleaved."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    name = f"sbx-bench-health-{os.getpid()}"
    proc, addr = _daemon(tmp, pki, name, [float(a) for a in range(30, 60)],
                         scripts={"declared_outputs": "optional", "result_mb": 8},
                         privacy={"dp": "off"})
    samples: dict[bytes, list[float]] = {HOSTILE: [], HONEST: []}
    try:
        await proc.wait_healthy(alice, addr)
        creds = client_config(alice, addr).credentials()
        async with AsyncClient(client_config(alice, addr, 120)) as c, \
                grpc.aio.secure_channel(addr, creds) as ch:
            stub = health_pb2_grpc.HealthStub(ch)
            await asyncio.sleep(2)  # let the site pre-create its containers
            for _ in range(runs):
                for script in (HOSTILE, HONEST):
                    job = await c.submit_script(script, "tiny")
                    done = asyncio.get_running_loop().create_task(c.run_job(job))
                    while not done.done():
                        t = time.perf_counter()
                        await stub.Check(health_pb2.HealthCheckRequest(), timeout=10)
                        samples[script].append(time.perf_counter() - t)
                        await asyncio.sleep(0.01)
                    try:
                        await done
                    except JobFailed:
                        assert script is HOSTILE  # its result is refused, as intended
    finally:
        proc.stop()
    n = min(len(v) for v in samples.values())
    return _p99(samples[HOSTILE]), _p99(samples[HONEST]), n


def private_copy_cost(tmp: Path, mib: int, files: int) -> tuple[float, float]:
    """(seconds to make a private workspace over a catalog of `mib` MiB in `files` files,
    seconds for a plain one over the same catalog); needs root (tmpfs)."""
    from stimnetd.sandbox import SandboxLimits
    from stimnetd.sandbox.workspace import Workspace

    cat = tmp / "copy-catalog"
    cat.mkdir()
    chunk = os.urandom(1 << 20)
    for i in range(files):
        with open(cat / f"img{i:03d}.nii", "wb") as fh:
            for _ in range(mib // files):
                fh.write(chunk)
    limits = SandboxLimits()
    timings = []
    for private in (True, False):
        best = float("inf")
        for k in range(3):
            t = time.perf_counter()
            ws = Workspace.create(tmp / "copy-work", limits, private, f"w{int(private)}{k}", cat)
            best = min(best, time.perf_counter() - t)
            ws.remove()
        timings.append(best)
    shutil.rmtree(cat)
    return timings[0], timings[1]
