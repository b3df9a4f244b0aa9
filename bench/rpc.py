"""Unary request rate of our GetInfo / ListCatalogs over mTLS vs a bare grpc.aio mTLS echo.

All servers run as separate processes on loopback in the same run, with certificates from
our PKI; the client is this process. Prints each rate and the ratio ours/bare (goal ≥ 0.5:
our TLS front, guard, audit and servicer stack costs at most 2× the bare server). The node
runs with its default TLS front (`[tls] terminate = "stimnet"`); GetInfo is also measured
on a second node with gRPC-terminated TLS, to show what the front costs.
"""

from __future__ import annotations

import argparse
import asyncio
import sys

import grpc
from _common import rate, start_echo, workdir  # type: ignore[import-not-found]

from stimctl.client import AsyncClient
from stimnetd.testing import CertFactory, DaemonProcess, client_config, free_port, write_node_config


async def main(seconds: float, concurrency: int) -> None:
    tmp = workdir()
    pki = CertFactory(tmp / "pki")
    node = pki.issue("bench-node", "node")
    alice = pki.issue("alice", "researcher")
    port, grpc_port, echo_port = free_port(), free_port(), free_port()
    from stimnetd.testing import demo_catalog

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

            # Baseline before and after, so drift on a shared machine hits both sides.
            bare1 = await rate(echo_call, seconds, concurrency)
            info = await rate(c.info, seconds, concurrency)
            cats = await rate(c.catalogs, seconds, concurrency)
            info_grpc = await rate(c_grpc.info, seconds, concurrency)
            bare2 = await rate(echo_call, seconds, concurrency)
            bare = (bare1 + bare2) / 2
    finally:
        for d in daemons:
            d.stop()
        echo.terminate()
        echo.wait()
    print(f"concurrency {concurrency}, {seconds:g}s per measurement")
    print(f"bare grpc.aio mTLS echo      : {bare:8.0f} req/s (baseline)")
    print(f"stimnetd GetInfo             : {info:8.0f} req/s   ratio {info / bare:.2f}")
    print(f"stimnetd ListCatalogs        : {cats:8.0f} req/s   ratio {cats / bare:.2f}")
    print(f"GetInfo, gRPC-terminated TLS : {info_grpc:8.0f} req/s   ratio {info_grpc / bare:.2f}"
          "  (no TLS front: unaudited handshake refusals)")
    print("goal: ratio >= 0.50")


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--concurrency", type=int, default=16)
    a = ap.parse_args()
    sys.exit(asyncio.run(main(a.seconds, a.concurrency)))
