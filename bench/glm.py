"""Federated logistic regression on CNSIM over three loopback daemons, against its floor.

From one run, on loopback, three stimnetd daemons serving CNSIM1-3 (DP off):
1. the wall time of `glm('DIS_DIAB ~ PM_BMI_CONTINUOUS + LAB_TSC', 'binomial')`, federated;
2. the same number of sequential federated `count(*)` queries as the fit took rounds
   (the round-trip floor: each round is one fan-out);
3. a pooled statsmodels fit of the same model on the three files concatenated (in this
   process, no network);
measured in alternating turns so that a busy spell of the shared machine weighs on all
alike. Prints the medians and the ratios fit / floor and fit / pooled.
Goal: the federated fit costs at most 1.5x its rounds' floor.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from pathlib import Path

from _common import ROOT, workdir  # type: ignore[import-not-found]

from stimctl.client import AsyncClient
from stimnetd.testing import CertFactory, CertPaths, DaemonProcess, free_port, write_node_config
from tests.helpers import client_config

sys.path.insert(0, str(ROOT))
from tests.federation.test_glm_jobs import glm_catalog, pooled  # noqa: E402

GLM = "SELECT glm('DIS_DIAB ~ PM_BMI_CONTINUOUS + LAB_TSC', 'binomial') FROM cnsim"
COUNT = "SELECT count(*) FROM cnsim"


async def _start_sites(tmp: Path, pki: CertFactory, ops: CertPaths,
                       procs: list[DaemonProcess]) -> list[int]:
    ports = [free_port() for _ in range(3)]
    for i, port in enumerate(ports):
        name = f"site-{'abc'[i]}"
        cfg = write_node_config(
            tmp / name, pki.issue(name, "node"), name, port=port, crl=pki.crl_path,
            catalogs=[glm_catalog(tmp, i + 1)], logging={"level": "warning"},
            privacy={"dp": "off"}, gossip={"enabled": False},
            federation={"peers": [f"127.0.0.1:{p}" for p in ports if p != port]})
        procs.append(DaemonProcess(cfg))
    for p, port in zip(procs, ports, strict=True):
        await p.wait_healthy(ops, f"127.0.0.1:{port}")
    return ports


def _pooled_fit(tmp: Path) -> float:
    import statsmodels.api as sm

    df = pooled(tmp)
    started = time.perf_counter()
    d = df[["DIS_DIAB", "PM_BMI_CONTINUOUS", "LAB_TSC"]].dropna()
    sm.GLM(d["DIS_DIAB"], sm.add_constant(d[["PM_BMI_CONTINUOUS", "LAB_TSC"]]),
           family=sm.families.Binomial()).fit()
    return time.perf_counter() - started


async def main(turns: int) -> None:
    tmp = workdir()
    pki = CertFactory(tmp / "pki")
    ops = pki.issue("ops", "admin")
    alice = pki.issue("alice", "researcher")
    procs: list[DaemonProcess] = []
    try:
        ports = await _start_sites(tmp, pki, ops, procs)
        async with AsyncClient(client_config(alice, f"127.0.0.1:{ports[0]}", 60)) as c:
            ans = await c.query(GLM, federated=True, min_sites=3)  # warm-up, and the rounds
            rounds = int(ans.result["glm"]["rounds"])
            for _ in range(3):
                await c.query(COUNT, federated=True, min_sites=3)
            fits, floors, pooled_s = [], [], []
            for _ in range(turns):
                t = time.perf_counter()
                await c.query(GLM, federated=True, min_sites=3)
                fits.append(time.perf_counter() - t)
                t = time.perf_counter()
                for _ in range(rounds):
                    await c.query(COUNT, federated=True, min_sites=3)
                floors.append(time.perf_counter() - t)
                pooled_s.append(_pooled_fit(tmp))
    finally:
        for p in procs:
            p.stop()
    fit, floor, pool = (statistics.median(v) for v in (fits, floors, pooled_s))
    print(f"federated binomial GLM on CNSIM, 3 loopback sites: {rounds} rounds "
          f"({ans.result['glm']['iterations']} iterations), n = {ans.result['glm']['n']}")
    print(f"  federated fit           median {fit * 1000:8.1f} ms over {turns} turns")
    print(f"  {rounds} sequential count(*) median {floor * 1000:8.1f} ms (the rounds' floor)")
    print(f"  pooled statsmodels fit  median {pool * 1000:8.1f} ms")
    print(f"  fit / floor  = {fit / floor:.2f}  (goal <= 1.5)")
    print(f"  fit / pooled = {fit / pool:.1f}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--turns", type=int, default=15)
    asyncio.run(main(parser.parse_args().turns))
