"""Script-job latency vs a bare `docker run`, from one run on this machine.

Prints: end-to-end latency (submit → result) of a trivial script job on one daemon; the
latency of `docker run --rm --network none <same image> python3 -c pass`; their ratio
(goal ≤ 1.0: pre-created containers make beating a bare docker run possible); the
latency of a 3-site federated script job; and how live the event loop stays while a
script spins: the worst gap between 50 ms ticks of an in-process runner's loop, as a
multiple of the tick period, and a daemon's health-check latency during the spin as a
multiple of its idle latency (the sandbox tests check only the order of events); and the
cost of a sample-and-aggregate job (a noised script job: one container per block of
subjects) with B blocks, as a ratio to the same job on the same 100 subjects in one block;
and bench/sandbox_channels.py's figures: the release-time residual of noised jobs whose
blocks sleep on the data (held to a slot, against unheld), the health-check p99 during a
hostile 8 MiB result over the p99 during an honest job (goal <= 2), and the cost of a
job's private copy of its catalog.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import time
from pathlib import Path

import sandbox_channels as channels  # type: ignore[import-not-found]
from _common import workdir  # type: ignore[import-not-found]

from stimctl.client import AsyncClient
from stimnetd.sandbox import SANDBOX_VERSION
from stimnetd.testing import CertFactory, CertPaths, DaemonProcess, free_port, write_node_config
from tests.helpers import client_config

TRIVIAL = b"from stimnet_runtime import emit_count\nemit_count('n', 10)\n"
SPIN = b"while True:\n    pass\n"
TICK_S = 0.05
TRIVIAL_OUT = "SELECT count(*) AS n FROM tiny"  # declared with it, as sites require
MEAN_AGE = (b"from stimnet_runtime import load_table, emit_mean\n"
            b"df = load_table('s')\nemit_mean('m', 'age', df['age'])\n")
MEAN_OUT = "SELECT clamp(avg(age), 0, 100) AS m FROM tiny"
BLOCK_SUBJECTS = 100
IMAGE = f"stimnet-sandbox:{SANDBOX_VERSION}"


def docker_run_latency(n: int) -> list[float]:
    out = []
    for _ in range(n):
        t = time.perf_counter()
        # The image's entrypoint is our runtime; the baseline is the bare interpreter.
        subprocess.run(["docker", "run", "--rm", "--network", "none", "--entrypoint", "python3",
                        IMAGE, "-c", "pass"], check=True, capture_output=True)
        out.append(time.perf_counter() - t)
    return out


async def loop_gap_ratio(tmp: Path) -> float:
    """The worst gap between TICK_S ticks of this loop while a runner watches a spinning
    script until its wall-clock limit, divided by TICK_S (1.0: the loop never waited)."""
    import docker

    from stimnetd.sandbox import SandboxLimits, SandboxRunner, job_manifest

    runner = SandboxRunner(lambda: docker.from_env(timeout=120).api, IMAGE,
                           SandboxLimits(timeout_s=3.0), tmp / "runner",
                           node=f"bench-{os.getpid()}")
    worst = 0.0

    async def tick() -> None:
        nonlocal worst
        last = time.monotonic()
        while True:
            await asyncio.sleep(TICK_S)
            now = time.monotonic()
            worst, last = max(worst, now - last), now

    (tmp / "empty-catalog").mkdir()
    ticker = asyncio.get_running_loop().create_task(tick())
    try:
        await runner.run("spin", SPIN, tmp / "empty-catalog", job_manifest({}, "subject", {}))
    finally:
        ticker.cancel()
        await runner.shutdown()
    return worst / TICK_S


async def health_latencies(addr: str, creds: object, n: int) -> list[float]:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    out = []
    async with grpc.aio.secure_channel(addr, creds) as ch:
        stub = health_pb2_grpc.HealthStub(ch)
        for _ in range(n):
            t = time.perf_counter()
            await stub.Check(health_pb2.HealthCheckRequest(), timeout=5)
            out.append(time.perf_counter() - t)
            await asyncio.sleep(0.1)
    return out


async def health_during_spin(c: AsyncClient, addr: str, creds: object) -> float:
    """Median health-check latency while a script spins on the entry, over the idle one."""
    from stimctl.client import JobFailed

    idle = await health_latencies(addr, creds, 20)
    job = await c.submit_script(SPIN, "tiny", outputs=TRIVIAL_OUT)
    while (await c.get_job(job.id)).state != "running":
        await asyncio.sleep(0.05)
    spinning = await health_latencies(addr, creds, 20)
    try:
        await c.run_job(job)
    except JobFailed:
        pass  # the wall-clock limit ends it, as intended
    return statistics.median(spinning) / statistics.median(idle)


async def block_job_seconds(tmp: Path, pki: CertFactory, alice: CertPaths, max_blocks: int,
                            n: int) -> list[float]:
    """Submit → result of `n` noised mean(age) script jobs on one daemon whose catalog of
    BLOCK_SUBJECTS subjects is split into at most `max_blocks` blocks (10 per block)."""
    from tests.federation.test_federated_queries import _tiny_catalog

    name, port = f"blocks{max_blocks}-{os.getpid()}", free_port()
    cat = _tiny_catalog(tmp / f"data-{name}", [float(20 + i % 60) for i in range(BLOCK_SUBJECTS)])
    cfg = write_node_config(tmp / name, pki.issue(name, "node"), name, port=port,
                            catalogs=[cat], crl=pki.crl_path, logging={"level": "warning"},
                            scripts={"policy": "auto", "timeout_s": 30},
                            privacy={"dp": "required", "budget_epsilon": 1000.0,
                                     "script_max_blocks": max_blocks},
                            gossip={"enabled": False})
    proc = DaemonProcess(cfg)
    out = []
    try:
        await proc.wait_healthy(alice, f"127.0.0.1:{port}")
        async with AsyncClient(client_config(alice, f"127.0.0.1:{port}", 300)) as c:
            for _ in range(n):
                t = time.perf_counter()
                await c.run_job(await c.submit_script(MEAN_AGE, "tiny", outputs=MEAN_OUT))
                out.append(time.perf_counter() - t)
    finally:
        proc.stop()
    return out


async def main(n: int) -> None:
    from tests.federation.test_federated_queries import _tiny_catalog

    tmp = workdir()
    pki = CertFactory(tmp / "pki")
    alice = pki.issue("alice", "researcher")
    ports = [free_port() for _ in range(3)]
    procs = []
    for i, port in enumerate(ports):
        # This run's own names: a daemon reaps its name's containers at start-up, and
        # other runs may share the engine.
        name = f"site-{'abc'[i]}-{os.getpid()}"
        cat = _tiny_catalog(tmp / f"data-{name}", [float(a) for a in range(30, 60)])
        cfg = write_node_config(tmp / name, pki.issue(name, "node"), name, port=port,
                                catalogs=[cat], crl=pki.crl_path, logging={"level": "warning"},
                                scripts={"policy": "auto", "timeout_s": 10},
                                gossip={"enabled": False},
                                federation={"peers": [f"127.0.0.1:{p}" for p in ports
                                                      if p != port]})
        procs.append(DaemonProcess(cfg))
    try:
        for p, port in zip(procs, ports, strict=True):
            await p.wait_healthy(alice, f"127.0.0.1:{port}")
        await asyncio.sleep(2)  # let each site pre-create its container
        async with AsyncClient(client_config(alice, f"127.0.0.1:{ports[0]}", 120)) as c:
            async def one(federated: bool) -> float:
                t = time.perf_counter()
                await c.run_job(await c.submit_script(TRIVIAL, "tiny", federated=federated,
                                                      outputs=TRIVIAL_OUT))
                return time.perf_counter() - t

            await one(False)
            local = []
            bare = []
            for _ in range(n):  # interleaved so drift hits both sides alike
                local.append(await one(False))
                bare += await asyncio.to_thread(docker_run_latency, 1)
            fed = [await one(True) for _ in range(max(3, n // 2))]
            addr = f"127.0.0.1:{ports[0]}"
            health = await health_during_spin(c, addr, client_config(alice, addr).credentials())
        gap = await loop_gap_ratio(tmp)
    finally:
        for p in procs:
            p.stop()
    blocks = BLOCK_SUBJECTS // 10
    runs = max(2, n // 4)
    one_block = await block_job_seconds(tmp, pki, alice, 1, runs)
    b_blocks = await block_job_seconds(tmp, pki, alice, blocks, runs)
    lm, bm, fm = statistics.median(local), statistics.median(bare), statistics.median(fed)
    print(f"{n} runs each, medians")
    print(f"bare docker run --rm --network none ... python3 -c pass : {bm * 1000:7.0f} ms (baseline)")
    print(f"trivial script job, submit -> result (1 site)           : {lm * 1000:7.0f} ms")
    print(f"ratio job / bare docker run                             : {lm / bm:7.2f}   (goal <= 1.0)")
    print(f"3-site federated script job                             : {fm * 1000:7.0f} ms   "
          f"(ratio to the bare docker run {fm / bm:.2f}; three containers on this machine's "
          "cores)")
    print(f"worst loop gap, runner watching a spinning script     : {gap:7.2f}x  (the "
          f"{TICK_S * 1000:.0f} ms tick period)")
    print(f"health check while a script spins / idle (median)      : {health:7.2f}x")
    await channel_figures(tmp, pki, alice, runs)
    ob, bb = statistics.median(one_block), statistics.median(b_blocks)
    print(f"{f'noised script job, 1 block of {BLOCK_SUBJECTS} subjects':<55}: {ob * 1000:7.0f} ms"
          f"   ({runs} runs; no warm container: each block's /data is its own)")
    print(f"{f'noised script job, B = {blocks} blocks / 1 block':<55}: {bb / ob:7.2f}x  "
          f"({bb / ob / blocks:.2f}x per block; one block at a time at concurrency 1)")


async def channels_only(n: int) -> None:
    tmp = workdir()
    pki = CertFactory(tmp / "pki")
    await channel_figures(tmp, pki, pki.issue("alice", "researcher"), max(2, n // 4))


async def channel_figures(tmp: Path, pki: CertFactory, alice: CertPaths, runs: int) -> None:
    slot = 10.0
    held, unheld = await channels.release_residual(tmp, pki, alice, slot, runs)
    print(f"release time, blocks sleeping {channels.SLEEP_S:g} s on the data vs not: unheld "
          f"{unheld * 1000:.0f} ms apart, held to {slot:g} s slots {held * 1000:.0f} ms apart "
          f"(residual {held / unheld:.2f}x the unheld difference; {runs} runs each)")
    hostile, honest, samples = await channels.health_p99_ratio(tmp, pki, alice, runs)
    print(f"{'health check p99, hostile 8 MiB result / honest job':<55}: "
          f"{hostile / honest:7.2f}x  (goal <= 2; {hostile * 1000:.1f} vs "
          f"{honest * 1000:.1f} ms, >= {samples} samples each)")
    if os.geteuid() == 0:
        mib, files = 256, 64
        private, plain = await asyncio.to_thread(channels.private_copy_cost, tmp, mib, files)
        print(f"{f'private workspace over a {mib} MiB catalog / plain':<55}: "
              f"{private / plain:7.1f}x  ({private * 1000:.0f} vs {plain * 1000:.1f} ms: "
              f"{mib / private:.0f} MiB/s copied, in {files} files)")


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("-n", type=int, default=8)
    ap.add_argument("--channels-only", action="store_true",
                    help="only bench/sandbox_channels.py's figures")
    args = ap.parse_args()
    asyncio.run(channels_only(args.n) if args.channels_only else main(args.n))
