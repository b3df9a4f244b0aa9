"""Script-job latency vs a bare `docker run`, from one run on this machine.

Prints: end-to-end latency (submit → result) of a trivial script job on one daemon; the
latency of `docker run --rm --network none <same image> python3 -c pass`; their ratio
(goal ≤ 1.0: pre-created containers make beating a bare docker run possible); and the
latency of a 3-site federated script job.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import subprocess
import time

from _common import workdir  # type: ignore[import-not-found]

from stimctl.client import AsyncClient
from stimnetd.sandbox import SANDBOX_VERSION
from stimnetd.testing import CertFactory, DaemonProcess, free_port, write_node_config
from tests.helpers import client_config

TRIVIAL = b"from stimnet_runtime import emit_count\nemit_count('n', 10)\n"
TRIVIAL_OUT = "SELECT count(*) AS n FROM tiny"  # declared with it, as sites require
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


async def main(n: int) -> None:
    from tests.federation.test_federated_queries import _tiny_catalog

    tmp = workdir()
    pki = CertFactory(tmp / "pki")
    alice = pki.issue("alice", "researcher")
    ports = [free_port() for _ in range(3)]
    procs = []
    for i, port in enumerate(ports):
        name = f"site-{'abc'[i]}"
        cat = _tiny_catalog(tmp / f"data-{name}", [float(a) for a in range(30, 60)])
        cfg = write_node_config(tmp / name, pki.issue(name, "node"), name, port=port,
                                catalogs=[cat], crl=pki.crl_path, logging={"level": "warning"},
                                scripts={"policy": "auto"}, gossip={"enabled": False},
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
    finally:
        for p in procs:
            p.stop()
    lm, bm, fm = statistics.median(local), statistics.median(bare), statistics.median(fed)
    print(f"{n} runs each, medians")
    print(f"bare docker run --rm --network none ... python3 -c pass : {bm * 1000:7.0f} ms (baseline)")
    print(f"trivial script job, submit -> result (1 site)           : {lm * 1000:7.0f} ms")
    print(f"ratio job / bare docker run                             : {lm / bm:7.2f}   (goal <= 1.0)")
    print(f"3-site federated script job                             : {fm * 1000:7.0f} ms   "
          f"(ratio to the bare docker run {fm / bm:.2f}; three containers on this machine's "
          "cores)")


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("-n", type=int, default=8)
    asyncio.run(main(ap.parse_args().n))
