"""Who may call what: identity from the certificate, roles, revocation, audit."""

from __future__ import annotations

import json
import os
import re

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from stimctl.client import (
    AsyncClient,
    ConnectionFailed,
    NotAuthenticated,
    NotFound,
    PermissionDenied,
)
from stimnetd.testing import CertFactory, foreign
from tests.helpers import client_config


def _addr(daemon) -> str:  # type: ignore[no-untyped-def]
    return f"127.0.0.1:{daemon.port}"


async def _audit(daemon, action: str) -> list:  # type: ignore[no-untyped-def]
    return [r for r in await daemon.store.audit_rows() if r.action == action]


async def test_researcher_lists_and_describes_catalogs(start_node, pki: CertFactory,
                                                       small_catalog: dict) -> None:
    """A researcher certificate can list and describe catalogs; no data value is returned."""
    alice = pki.issue("alice", "researcher")
    async with start_node(catalogs=[small_catalog]) as d:
        async with AsyncClient(client_config(alice, _addr(d))) as c:
            info = await c.info()
            cats = await c.catalogs()
            desc = await c.describe("dbs_outcomes")
    assert (info.caller, info.caller_role) == ("alice", "researcher")
    assert [x.name for x in cats] == ["dbs_outcomes"] and cats[0].subjects == "20"
    by_name = {f.name: f for f in desc.fields}
    assert by_name["age"].has_bounds and by_name["age"].unit == "years"
    assert list(by_name["sex"].levels) == ["F", "M"]
    assert desc.images[0].shape == [91, 109, 91] and desc.images[0].voxel_size == [2.0, 2.0, 2.0]
    # Only schema crosses the wire: no subject id appears anywhere in the description.
    assert "site-a-0001" not in str(desc)


async def test_counts_below_k_min_are_hidden(start_node, pki: CertFactory, small_catalog: dict) -> None:
    """A catalog smaller than k_min reports its subject and row counts as '< k'."""
    alice = pki.issue("alice", "researcher")
    async with start_node(catalogs=[small_catalog], node={"k_min": 25}) as d:
        async with AsyncClient(client_config(alice, _addr(d))) as c:
            cats = await c.catalogs()
            desc = await c.describe("dbs_outcomes")
    assert cats[0].subjects == "< 25"
    assert {t.rows for t in desc.tables} == {"< 25"}


async def test_unknown_catalog_is_not_found(start_node, pki: CertFactory) -> None:
    """Describing a catalog the node does not hold is NOT_FOUND with its name."""
    alice = pki.issue("alice", "researcher")
    async with start_node() as d:
        async with AsyncClient(client_config(alice, _addr(d))) as c:
            with pytest.raises(NotFound, match="no catalog named 'nope'"):
                await c.describe("nope")


def _unverifiable_credentials(case: str, pki: CertFactory, tmp_path) -> grpc.ChannelCredentials:  # type: ignore[no-untyped-def]
    if case == "no-certificate":
        return grpc.ssl_channel_credentials(root_certificates=pki.ca_cert_path.read_bytes())
    other = (foreign(tmp_path).issue("alice", "researcher") if case == "other-ca"
             else pki.issue("alice", "researcher", expired=True))
    return grpc.ssl_channel_credentials(
        root_certificates=pki.ca_cert_path.read_bytes(),
        private_key=other.key.read_bytes(), certificate_chain=other.cert.read_bytes())


UNVERIFIABLE = {
    "no-certificate": ("anonymous", "", "client certificate issued by the federation CA is "
                                        "required \\(none was presented\\)"),
    "other-ca": ("unverified", "researcher/alice", "was not issued by CN=StimNet Test CA"),
    "expired": ("unverified", "researcher/alice", "expired at"),
}


async def test_a_refusal_quoting_the_request_is_bounded_in_the_audit_log(
        start_node, pki: CertFactory) -> None:
    """Refusals quote the request (here a 1 MB catalog name, and a 1 MB job id) and every
    refusal is kept in the audit log for good: each entry's text is cut at MAX_AUDIT_TEXT,
    so a caller cannot grow the log by megabytes a call."""
    from stimnetd.rpc.guard import MAX_AUDIT_TEXT

    alice = pki.issue("alice", "researcher")
    async with start_node() as d:
        async with AsyncClient(client_config(alice, _addr(d))) as c:
            with pytest.raises(NotFound):
                await c.describe("x" * 1_000_000)
            with pytest.raises(NotFound):
                await c.get_job("y" * 1_000_000)
        rows = [r for r in await d.store.audit_rows() if r.decision == "refused"]
    assert len(rows) == 2
    assert [len(r.detail_json) < MAX_AUDIT_TEXT + 500 for r in rows] == [True, True], [len(r.detail_json) for r in rows]


@pytest.mark.parametrize("case", sorted(UNVERIFIABLE))
async def test_unverifiable_callers_are_refused_and_audited(start_node, pki: CertFactory,
                                                            tmp_path, case: str) -> None:
    """No certificate, another CA's or an expired one: UNAUTHENTICATED with the reason, and
    an audit entry keyed by the caller's address (its certificate's name is only a claim)."""
    role, claimed, reason = UNVERIFIABLE[case]
    async with start_node() as d:
        async with grpc.aio.secure_channel(
                _addr(d), _unverifiable_credentials(case, pki, tmp_path)) as ch:
            for _ in range(2):  # the connection stays refused; each call is answered
                with pytest.raises(grpc.aio.AioRpcError) as err:
                    await health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(),
                                                               timeout=5)
                assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
                assert re.search(reason, err.value.details()) is not None, err.value.details()
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await reflection_pb2_grpc.ServerReflectionStub(ch).ServerReflectionInfo(
                    iter([reflection_pb2.ServerReflectionRequest(list_services="")]),
                    timeout=5).read()
            assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
        rows = await _audit(d, "/grpc.health.v1.Health/Check")
    assert [(r.role, r.decision) for r in rows] == [(role, "denied")] * 2
    detail = json.loads(rows[0].detail_json)
    assert re.search(reason, detail["reason"]) is not None, detail
    assert rows[0].actor == detail["remote"] and detail["remote"].startswith("127.0.0.1:")
    assert detail.get("claimed", "") == claimed


async def test_a_flood_of_refused_calls_is_audited_in_brief(start_node, pki: CertFactory,
                                                           tmp_path) -> None:
    """Every call of an unverifiable caller is refused, but only the first few a minute get
    an entry each (a caller must not fill the node's disk or drive its fsyncs): the rest
    are counted, and the count is audited when the minute ends, or at shutdown."""
    from stimnetd.store import Store

    async with start_node(tls={"refusals_audited_per_minute": 3}) as d:
        async with grpc.aio.secure_channel(
                _addr(d), _unverifiable_credentials("other-ca", pki, tmp_path)) as ch:
            for _ in range(8):
                with pytest.raises(grpc.aio.AioRpcError) as err:
                    await health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(),
                                                               timeout=5)
                assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
        rows = await _audit(d, "/grpc.health.v1.Health/Check")
        assert [(r.role, r.decision) for r in rows] == [("unverified", "denied")] * 3
        assert await _audit(d, "rpc") == []  # the minute is not over
        path = d.store.path
    store = Store(path)  # the node has stopped: its last entries are on disk
    await store.open()
    try:
        [condensed] = [r for r in await store.audit_rows() if r.action == "rpc"]
        verified = await store.verify_audit()
    finally:
        await store.close()
    detail = json.loads(condensed.detail_json)
    assert (condensed.actor, condensed.role, condensed.decision) == \
        ("127.0.0.1", "unverified", "denied-condensed")
    assert detail["suppressed"] == 5
    assert detail["methods"] == {"/grpc.health.v1.Health/Check": 5}
    assert (verified.ok, verified.first_bad_seq, verified.problem) == (True, None, "")


async def test_client_names_an_unverifiable_certificate_in_one_line(start_node,
                                                                    pki: CertFactory) -> None:
    """stimctl says why its certificate was refused, not a traceback."""
    async with start_node() as d:
        expired = pki.issue("alice", "researcher", expired=True)
        async with AsyncClient(client_config(expired, _addr(d))) as c:
            with pytest.raises(NotAuthenticated, match="researcher/alice .* expired at"):
                await c.info()


async def test_local_process_bypassing_the_front_is_refused(start_node, pki: CertFactory) -> None:
    """The plaintext socket behind the front is private and grants nothing without a front
    verdict, even to a process of the same user that reaches it."""
    async with start_node() as d:
        inner = d.inner_socket
        assert inner is not None
        assert os.stat(os.path.dirname(inner)).st_mode & 0o077 == 0
        async with grpc.aio.insecure_channel(f"unix:{inner}") as ch:
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=5)
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert "did not arrive through the node's TLS front" in err.value.details()


@pytest.mark.parametrize("case", sorted(UNVERIFIABLE))
async def test_grpc_terminated_tls_refuses_unverifiable_callers_at_handshake(
        start_node, pki: CertFactory, tmp_path, case: str) -> None:
    """With `[tls] terminate = "grpc"` the same callers never get an RPC: UNAVAILABLE at the
    handshake, nothing to audit (the trade-off the front exists to avoid)."""
    async with start_node(tls={"terminate": "grpc"}) as d:
        assert d.front is None
        async with grpc.aio.secure_channel(
                _addr(d), _unverifiable_credentials(case, pki, tmp_path)) as ch:
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=5)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        assert await _audit(d, "/grpc.health.v1.Health/Check") == []
        expired = pki.issue("bob", "researcher", expired=True)
        async with AsyncClient(client_config(expired, _addr(d))) as c:
            with pytest.raises(ConnectionFailed, match="TLS handshake|cannot reach"):
                await c.info()


async def test_revoked_certificate_is_refused_and_audited(start_node, pki: CertFactory) -> None:
    """A revoked certificate is refused with UNAUTHENTICATED, also on a channel opened earlier."""
    alice = pki.issue("alice", "researcher")
    async with start_node() as d:
        async with AsyncClient(client_config(alice, _addr(d))) as c:
            assert (await c.info()).caller == "alice"
            pki.revoke("alice")
            d.reload()  # what SIGHUP does
            with pytest.raises(NotAuthenticated, match="revoked"):
                await c.info()
        async with AsyncClient(client_config(alice, _addr(d))) as fresh:
            with pytest.raises(NotAuthenticated, match="revoked"):
                await fresh.catalogs()
        denied = [r for r in await d.store.audit_rows() if r.decision == "denied"]
    assert [(r.actor, r.action) for r in denied] == [
        ("alice", "/stimnet.v1.NodeService/GetInfo"),
        ("alice", "/stimnet.v1.NodeService/ListCatalogs")]
    assert "revoked" in denied[0].detail_json


async def test_wrong_role_is_permission_denied_and_audited(start_node, pki: CertFactory) -> None:
    """A researcher calling an admin RPC gets PERMISSION_DENIED naming the allowed roles."""
    alice = pki.issue("alice", "researcher")
    async with start_node() as d:
        async with AsyncClient(client_config(alice, _addr(d))) as c:
            with pytest.raises(PermissionDenied, match="role 'researcher' may not call .*admin"):
                await c.status()
            with pytest.raises(PermissionDenied):
                await c.audit_verify()
        rows = await _audit(d, "/stimnet.v1.NodeService/GetStatus")
    assert [(r.actor, r.role, r.decision) for r in rows] == [("alice", "researcher", "denied")]


async def test_admin_may_call_admin_rpcs(start_node, pki: CertFactory) -> None:
    """An admin certificate can read node status and verify the audit chain."""
    ops = pki.issue("ops", "admin")
    async with start_node() as d:
        async with AsyncClient(client_config(ops, _addr(d))) as c:
            status = await c.status()
            verified = await c.audit_verify()
    assert status.name == "node-a" and status.uptime_s >= 0
    assert (verified.ok, verified.first_bad_seq, verified.problem) == (True, 0, "")
    assert verified.entries >= 1


async def test_another_nodes_admin_is_refused_and_audited(start_node, pki: CertFactory) -> None:
    """An admin certificate is valid federation-wide; only the admins a node's config names
    may read its status, jobs and audit or approve its scripts. Another node's admin gets
    PERMISSION_DENIED naming the rule, and the refusal is in the audit chain."""
    ops_a, ops_b = pki.issue("ops-a", "admin"), pki.issue("ops-b", "admin")
    async with start_node(node={"admins": ["ops-a"]}) as d:
        async with AsyncClient(client_config(ops_b, _addr(d))) as c:
            info = await c.info()  # public node facts stay open to every identity
            for call in (c.status(), c.audit_verify(), c.list_jobs(), c.approve("0" * 32),
                         c.get_job("0" * 32)):
                with pytest.raises(PermissionDenied,
                                   match=r"admin 'ops-b' is not an admin of node 'node-a' "
                                         r"\(its \[node\] admins: ops-a\)"):
                    await call
        async with AsyncClient(client_config(ops_a, _addr(d))) as c:
            assert (await c.status()).name == "node-a"
        rows = [r for r in await d.store.audit_rows() if r.actor == "ops-b"]
    assert info.name == "node-a"
    refused = {r.action for r in rows if r.decision == "denied"}
    assert refused == {"/stimnet.v1.NodeService/GetStatus", "/stimnet.v1.AdminService/VerifyAudit",
                       "/stimnet.v1.JobService/ListJobs", "/stimnet.v1.JobService/ApproveJob",
                       "/stimnet.v1.JobService/GetJob"}
    assert all("is not an admin of node" in r.detail_json for r in rows if r.decision == "denied")


async def test_a_node_naming_no_admins_obeys_none(start_node, pki: CertFactory) -> None:
    """`[node] admins = []`: no admin certificate is obeyed at this node."""
    ops = pki.issue("ops", "admin")
    async with start_node(node={"admins": []}) as d:
        async with AsyncClient(client_config(ops, _addr(d))) as c:
            with pytest.raises(PermissionDenied, match=r"its \[node\] admins: none"):
                await c.status()


async def test_allowed_calls_are_audited(start_node, pki: CertFactory) -> None:
    """Allowed calls are recorded in the audit chain with caller and role."""
    alice = pki.issue("alice", "researcher")
    async with start_node() as d:
        async with AsyncClient(client_config(alice, _addr(d))) as c:
            await c.info()
        rows = await _audit(d, "/stimnet.v1.NodeService/GetInfo")
    assert [(r.actor, r.role, r.decision) for r in rows] == [("alice", "researcher", "allowed")]


async def test_health_serving_and_reflection_lists_services(start_node, pki: CertFactory) -> None:
    """The standard health service answers SERVING and reflection lists StimNet services."""
    alice = pki.issue("alice", "researcher")
    async with start_node() as d:
        creds = client_config(alice, _addr(d)).credentials()
        async with grpc.aio.secure_channel(_addr(d), creds) as ch:
            health = await health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(),
                                                                timeout=5)
            stub = reflection_pb2_grpc.ServerReflectionStub(ch)

            async def one() -> reflection_pb2.ServerReflectionRequest:
                yield reflection_pb2.ServerReflectionRequest(list_services="")

            services = []
            async for resp in stub.ServerReflectionInfo(one(), timeout=5):
                services = [s.name for s in resp.list_services_response.service]
    assert health.status == health_pb2.HealthCheckResponse.SERVING
    assert {"stimnet.v1.NodeService", "stimnet.v1.AdminService",
            "grpc.health.v1.Health"} <= set(services)


async def test_a_query_cannot_change_the_catalog_the_next_query_sees(
        start_node, pki: CertFactory, small_catalog: dict) -> None:
    """Catalogs hand out shallow copies (copy-on-write): writing into one changes nothing
    for the next caller, and the same query gives the same answer afterwards."""
    alice = pki.issue("alice", "researcher")
    async with start_node(catalogs=[small_catalog]) as d:
        cat = d.catalogs.get("dbs_outcomes")
        async with AsyncClient(client_config(alice, _addr(d))) as c:
            sql = "SELECT count(*), avg(age) FROM dbs_outcomes"
            before = (await c.query(sql)).to_pandas()
            frame = cat.frame()
            frame.loc[:, "age"] = 1000.0
            assert cat.frame()["age"].max() < 200
            after = (await c.query(sql)).to_pandas()
    assert after.to_dict() == before.to_dict()


def _all_methods() -> list[tuple[str, bool, bool]]:
    from grpc_health.v1 import health_pb2 as hp
    from grpc_reflection.v1alpha import reflection_pb2 as rp

    from stimnet.v1 import admin_pb2, federation_pb2, jobs_pb2, node_pb2

    out = []
    for mod in (node_pb2, jobs_pb2, federation_pb2, admin_pb2, hp, rp):
        for svc in mod.DESCRIPTOR.services_by_name.values():
            for m in svc.methods:
                out.append((f"/{svc.full_name}/{m.name}", m.client_streaming, m.server_streaming))
    return out


def test_every_method_has_a_role_rule() -> None:
    """A method missing from the role table would be refused to everyone (fail closed);
    this keeps the table complete instead."""
    from stimnetd.rpc.roles import RPC_ROLES

    missing = [m for m, _, _ in _all_methods() if m not in RPC_ROLES]
    assert missing == []


async def test_every_method_refuses_a_caller_without_a_certificate(start_node,
                                                                   pki: CertFactory) -> None:
    """Each RPC the node serves passes the guard: none answers an unauthenticated caller
    (each audited: more than the default burst of refusals a minute is allowed for)."""
    async with start_node(tls={"refusals_audited_per_minute": 1000}) as d:
        creds = grpc.ssl_channel_credentials(root_certificates=pki.ca_cert_path.read_bytes())
        async with grpc.aio.secure_channel(_addr(d), creds) as ch:
            for method, client_streaming, server_streaming in _all_methods():
                with pytest.raises(grpc.aio.AioRpcError) as err:
                    if client_streaming and server_streaming:
                        call = ch.stream_stream(method)(iter([b""]), timeout=5)
                        await call.read()
                    elif server_streaming:
                        await ch.unary_stream(method)(b"", timeout=5).read()
                    elif client_streaming:
                        await ch.stream_unary(method)(iter([b""]), timeout=5)
                    else:
                        await ch.unary_unary(method)(b"", timeout=5)
                assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED, (method, err.value)
        denied = {r.action for r in await d.store.audit_rows() if r.decision == "denied"}
    assert denied == {m for m, _, _ in _all_methods()}


async def test_gossip_and_health_calls_are_audited_as_counts(start_node, pki: CertFactory) -> None:
    """Allowed health checks (and gossip) come several a second: one audit entry per caller
    and method per window with the count, not one per call (an idle three-node demo wrote
    a million entries a day); other calls are still audited one by one."""
    import json as _json

    from grpc_health.v1 import health_pb2, health_pb2_grpc

    alice = pki.issue("alice", "researcher")
    async with start_node() as d:
        async with AsyncClient(client_config(alice, _addr(d))) as c:
            stub = health_pb2_grpc.HealthStub(c._channel)  # noqa: SLF001
            for _ in range(5):
                await stub.Check(health_pb2.HealthCheckRequest(), timeout=5)
            await c.info()
        assert await _audit(d, "/grpc.health.v1.Health/Check") == []
        assert d.guard.audit_quiet_calls() == 0  # its window has not ended
        assert d.guard.audit_quiet_calls(everything=True) == 1
        [row] = await _audit(d, "/grpc.health.v1.Health/Check")
        assert (row.actor, row.role, row.decision) == ("alice", "researcher", "allowed-condensed")
        assert _json.loads(row.detail_json)["calls"] == 5
        assert len(await _audit(d, "/stimnet.v1.NodeService/GetInfo")) == 1
