"""Waiting for a node to serve: the standard grpc.health.v1 check every node answers.

Used by whoever starts a node as a process (the demo, test fixtures) before calling it.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc


async def wait_serving(address: str, credentials: grpc.ChannelCredentials, *,
                       timeout_s: float, exited: Callable[[], int | None] = lambda: None,
                       interval_s: float = 0.1) -> None:
    """Return once the node at `address` answers a health check with SERVING.

    Args:
        address: the node's ``host:port``.
        credentials: mutual-TLS channel credentials the node accepts.
        timeout_s: give up after this long.
        exited: the node process's exit code if it is gone, else None: a crashed node
            fails at once instead of after the timeout.
        interval_s: the pause between checks.

    Raises:
        RuntimeError: the node's process exited.
        TimeoutError: the node did not serve within `timeout_s`.
    """
    deadline = time.monotonic() + timeout_s
    while True:
        code = exited()
        if code is not None:
            raise RuntimeError(f"node at {address} exited with code {code}")
        try:
            async with grpc.aio.secure_channel(address, credentials) as ch:
                r = await health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(),
                                                               timeout=2)
            if r.status == health_pb2.HealthCheckResponse.SERVING:
                return
        except grpc.RpcError:
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"node at {address} not serving after {timeout_s:.0f}s")
        await asyncio.sleep(interval_s)
