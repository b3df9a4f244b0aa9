"""What a node logs per call: gossip and health checks only at debug (they were nearly
every line at info), every other call at info."""

from __future__ import annotations

import io
import json

import grpc
import structlog
from grpc_health.v1 import health_pb2, health_pb2_grpc

from stimctl.client import AsyncClient
from stimnetd import logs
from stimnetd.testing import CertFactory
from tests.helpers import client_config


async def _calls_logged(start_node, pki: CertFactory, level: str) -> list[str]:  # type: ignore[no-untyped-def]
    alice = pki.issue("alice", "researcher")
    out = io.StringIO()
    logs.configure(level, node="node-a", stream=out)
    try:
        async with start_node() as d:
            address = f"127.0.0.1:{d.port}"
            async with grpc.aio.secure_channel(
                    address, client_config(alice, address).credentials()) as ch:
                for _ in range(3):
                    await health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(),
                                                               timeout=10)
            async with AsyncClient(client_config(alice, address)) as c:
                await c.info()
    finally:
        structlog.reset_defaults()
    lines = [json.loads(line) for line in out.getvalue().splitlines() if line.startswith("{")]
    return [f"{e['level']} {e.get('method')}" for e in lines if e.get("event") == "rpc"]


async def test_health_checks_log_at_debug_only(start_node, pki: CertFactory) -> None:
    info = await _calls_logged(start_node, pki, "info")
    assert info == ["info /stimnet.v1.NodeService/GetInfo"]


async def test_debug_shows_them(start_node, pki: CertFactory) -> None:
    debug = await _calls_logged(start_node, pki, "debug")
    assert debug.count("debug /grpc.health.v1.Health/Check") == 3
    assert "info /stimnet.v1.NodeService/GetInfo" in debug
