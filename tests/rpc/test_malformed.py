"""What a client sends that cannot be read is INVALID_ARGUMENT naming the problem, never
INTERNAL or UNKNOWN: mistyped fields in a signed job payload, and bytes that are not the
request message at all."""

from __future__ import annotations

import dataclasses

import grpc
import pytest

from stimctl.client import AsyncClient, InvalidRequest
from stimnet.signing import new_request
from stimnetd.testing import CertFactory
from tests.helpers import client_config

SPEC = {"catalog": "dbs_outcomes", "where": None, "group_by": [],
        "aggregates": [{"func": "count", "fields": [], "name": "n", "params": []}]}


@pytest.mark.parametrize("kind", ["query", "script"])
@pytest.mark.parametrize("value", [None, 5])
async def test_a_mistyped_script_sha256_is_invalid_argument_and_audited(
        start_node, pki: CertFactory, small_catalog: dict, kind: str, value: object) -> None:
    """script_sha256 null or 5 in a signed payload: refused naming the field, audited, and
    the job listing still answers (a stored row with a NULL hash once broke it)."""
    alice = pki.issue("alice", "researcher")
    async with start_node(catalogs=[small_catalog]) as d:
        addr = f"127.0.0.1:{d.port}"
        async with AsyncClient(client_config(alice, addr)) as c:
            req = new_request(kind, "dbs_outcomes", entry=await c.entry_node(),
                              spec=SPEC if kind == "query" else None,
                              script=b"print(1)" if kind == "script" else None)
            bad = dataclasses.replace(req, script_sha256=value)
            with pytest.raises(InvalidRequest, match="script_sha256 must be a string"):
                await c.submit(c.sign(bad, b"print(1)" if kind == "script" else None))
            assert list(await c.list_jobs()) == []
        await d.store.flush()
        rows = [r for r in await d.store.audit_rows() if "script_sha256" in r.detail_json]
    assert rows and all(r.actor == "alice" and r.decision != "allowed" for r in rows)


def _methods() -> list[tuple[str, bool, bool]]:
    from stimnet.v1 import admin_pb2, federation_pb2, jobs_pb2, node_pb2

    return [(f"/{svc.full_name}/{m.name}", m.client_streaming, m.server_streaming)
            for mod in (node_pb2, jobs_pb2, federation_pb2, admin_pb2)
            for svc in mod.DESCRIPTOR.services_by_name.values() for m in svc.methods]


# Not a protobuf message: field 1 as a varint whose bytes never end, then a truncated
# length-delimited field.
GARBAGE = b"\x08\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\x12\x7f\x00"


async def test_bytes_that_are_not_the_request_message_are_invalid_argument(
        start_node, pki: CertFactory) -> None:
    """Every RPC, as a caller whose role may make it, sent bytes that do not parse as its
    request message: INVALID_ARGUMENT saying so (audited), never INTERNAL or UNKNOWN."""
    callers = {"researcher": pki.issue("alice", "researcher"), "admin": pki.issue("ops", "admin"),
               "node": pki.issue("node-b", "node")}
    got: dict[tuple[str, str], tuple[grpc.StatusCode, str]] = {}
    async with start_node(tls={"refusals_audited_per_minute": 1000}) as d:
        addr = f"127.0.0.1:{d.port}"
        for role, who in callers.items():
            async with AsyncClient(client_config(who, addr)) as c:
                ch = c._channel  # noqa: SLF001 - raw bytes need the raw channel
                for method, cs, ss in _methods():
                    with pytest.raises(grpc.aio.AioRpcError) as err:
                        if cs and ss:
                            await ch.stream_stream(method)(iter([GARBAGE]), timeout=5).read()
                        elif ss:
                            await ch.unary_stream(method)(GARBAGE, timeout=5).read()
                        elif cs:
                            await ch.stream_unary(method)(iter([GARBAGE]), timeout=5)
                        else:
                            await ch.unary_unary(method)(GARBAGE, timeout=5)
                    got[(role, method)] = (err.value.code(), err.value.details() or "")
        await d.store.flush()
        audited = {r.action for r in await d.store.audit_rows()
                   if r.decision == "refused" and "malformed request" in r.detail_json}
    assert {code for code, _ in got.values()} == {grpc.StatusCode.INVALID_ARGUMENT,
                                                  grpc.StatusCode.PERMISSION_DENIED}
    readers = {m for (_, m), (code, text) in got.items()
               if code == grpc.StatusCode.INVALID_ARGUMENT and "malformed request" in text}
    assert readers == {m for m, _, _ in _methods()}  # each method by some role allowed it
    assert audited == readers


async def test_a_method_the_node_does_not_implement_is_unimplemented(
        start_node, pki: CertFactory) -> None:
    """grpc health's List is in the service, but grpc's asyncio servicer does not implement
    it (its base class raises NotImplementedError): UNIMPLEMENTED naming the method, not
    INTERNAL with a traceback in the log."""
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    ops = pki.issue("ops", "admin")
    async with start_node() as d:
        addr = f"127.0.0.1:{d.port}"
        async with AsyncClient(client_config(ops, addr)) as c:
            stub = health_pb2_grpc.HealthStub(c._channel)  # noqa: SLF001 - a raw stub
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await stub.List(health_pb2.HealthListRequest(), timeout=5)
    assert (err.value.code(), err.value.details()) == (
        grpc.StatusCode.UNIMPLEMENTED, "this node does not serve /grpc.health.v1.Health/List")
