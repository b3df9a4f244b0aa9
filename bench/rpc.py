"""Unary request rate of our GetInfo / ListCatalogs over mTLS vs a bare grpc.aio mTLS echo.

All servers run as separate processes on loopback in the same run, with certificates from
our PKI; the client is this process. Prints each rate and the ratio ours/bare (goal ≥ 0.5:
our TLS front, guard, audit and servicer stack costs at most 2× the bare server). The node
runs with its default TLS front (`[tls] terminate = "stimnet"`); GetInfo is also measured
on a second node with gRPC-terminated TLS, to show what the front costs. Each server
process's CPU per request is printed too: steadier than rates on a shared machine.
"""

from __future__ import annotations

import argparse
import asyncio
import sys

import grpc
from _common import process_cpu_s, rate, start_echo, workdir  # type: ignore[import-not-found]

from stimctl.client import AsyncClient
from stimnetd.testing import CertFactory, DaemonProcess, free_port, write_node_config
from tests.helpers import client_config


async def main(seconds: float, concurrency: int) -> None:
    tmp = workdir()
    pki = CertFactory(tmp / "pki")
    node = pki.issue("bench-node", "node")
    alice = pki.issue("alice", "researcher")
    port, grpc_port, echo_port = free_port(), free_port(), free_port()
    from tests.helpers import demo_catalog

    catalog = demo_catalog(tmp / "data", n_subjects=20)
    daemons = [DaemonProcess(write_node_config(
        tmp / f"node-{terminate}", node, "bench-node", port=p, crl=pki.crl_path,
        catalogs=[catalog], tls={"terminate": terminate}, logging={"level": "warning"},
        gossip={"enabled": False})) for p, terminate in ((port, "stimnet"), (grpc_port, "grpc"))]
    echo = start_echo(echo_port, node.key, node.cert, node.ca)
    try:
        for d, p in zip(daemons, (port, grpc_port), strict=True):
            await d.wait_healthy(alice, f"127.0.0.1:{p}")
        creds = client_config(alice, f"127.0.0.1:{echo_port}").credentials()
        async with grpc.aio.secure_channel(f"127.0.0.1:{echo_port}", creds) as ch, \
                AsyncClient(client_config(alice, f"127.0.0.1:{port}")) as c, \
                AsyncClient(client_config(alice, f"127.0.0.1:{grpc_port}")) as c_grpc:
            call = ch.unary_unary("/bench.Echo/Call")
            payload = b"x" * 64

            async def echo_call() -> bytes:
                return await call(payload, timeout=10)

            async def measured(call, pid: int) -> tuple[float, float]:  # type: ignore[no-untyped-def]
                """Rate, and the server's CPU microseconds per request over the window."""
                before = process_cpu_s(pid)
                r = await rate(call, seconds, concurrency)
                return r, (process_cpu_s(pid) - before) / (r * seconds) * 1e6

            ours, theirs = daemons[0].proc.pid, daemons[1].proc.pid
            # Baseline before and after, so drift on a shared machine hits both sides.
            bare1, bare_cpu1 = await measured(echo_call, echo.pid)
            info, info_cpu = await measured(c.info, ours)
            cats, cats_cpu = await measured(c.catalogs, ours)
            info_grpc, info_grpc_cpu = await measured(c_grpc.info, theirs)
            bare2, bare_cpu2 = await measured(echo_call, echo.pid)
            bare, bare_cpu = (bare1 + bare2) / 2, (bare_cpu1 + bare_cpu2) / 2
    finally:
        for d in daemons:
            d.stop()
        echo.terminate()
        echo.wait()
    print(f"concurrency {concurrency}, {seconds:g}s per measurement; server CPU per request "
          "(all threads) beside each rate")
    print(f"bare grpc.aio mTLS echo      : {bare:8.0f} req/s (baseline)          "
          f"{bare_cpu:5.0f} us/req")
    for label, r, cpu in (("stimnetd GetInfo", info, info_cpu),
                          ("stimnetd ListCatalogs", cats, cats_cpu),
                          ("GetInfo, gRPC-terminated TLS", info_grpc, info_grpc_cpu)):
        print(f"{label:29s}: {r:8.0f} req/s   ratio {r / bare:.2f}   {cpu:5.0f} us/req "
              f"(x{cpu / bare_cpu:.2f})")
    print("(gRPC-terminated TLS: no TLS front, so handshake refusals are not audited)")
    print("goal: ratio >= 0.50")


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--concurrency", type=int, default=16)
    a = ap.parse_args()
    sys.exit(asyncio.run(main(a.seconds, a.concurrency)))
