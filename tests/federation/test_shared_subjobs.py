"""Table-query sub-jobs share one SubJobs stream per peer: each is still checked,
audited, refused and timed as a call of its own would be, one's end leaves the others'
alone."""

from __future__ import annotations

import asyncio
import json
import math
from pathlib import Path

import grpc
import pytest

from stimnet import signing
from stimnet.multiplex import MULTIPLEX_KEY
from stimnet.v1 import federation_pb2, federation_pb2_grpc
from stimnetd.rpc import convert
from stimnetd.testing import CertPaths
from tests.federation.test_federated_queries import _tiny_catalog
from tests.federation.test_peer_identity import _Garbler, ask_node
from tests.federation.test_signed_jobs import _signed, _tamper
from tests.helpers import client_config

AGES = [float(a) for a in range(30, 60)]


def _catalogs(tmp_path: Path, n: int) -> list[list[dict]]:
    return [[_tiny_catalog(tmp_path / f"t{i}", AGES)] for i in range(n)]


def _node_certs(fed, name: str) -> CertPaths:  # type: ignore[no-untyped-def]
    d = fed.tmp / "pki" / f"node-{name}"
    return CertPaths(cert=d / f"{name}.crt", key=d / f"{name}.key", ca=d / "ca.crt")


def _start(signed: signing.SignedJob, call_id: int, timeout_s: float = 10.0,
           request_id: str = "") -> federation_pb2.SubJobCall:
    return federation_pb2.SubJobCall(id=call_id, timeout_s=timeout_s, start=federation_pb2.SubJobRequest(
        job=convert.signed_job_pb(signed), entry_node="site-a", request_id=request_id))


async def _replies(call, want: set[int]) -> dict[int, list[federation_pb2.SubJobReply]]:  # type: ignore[no-untyped-def]
    """Read replies until each sub-job in `want` has ended (terminal event or status)."""
    got: dict[int, list[federation_pb2.SubJobReply]] = {}
    ended: set[int] = set()
    while not want <= ended:
        reply = await asyncio.wait_for(call.read(), 10)
        assert reply is not grpc.aio.EOF, f"stream ended; still waiting for {want - ended}"
        got.setdefault(reply.id, []).append(reply)
        if reply.HasField("status") or reply.event.site.state in ("done", "refused", "failed",
                                                                  "suppressed"):
            ended.add(reply.id)
    return got


def _audit(rows, action: str) -> list:  # type: ignore[no-untyped-def]
    return [r for r in rows if r.action == action]


async def test_sub_jobs_of_several_queries_share_one_stream_each_audited(federation,
                                                                         tmp_path: Path) -> None:
    """Three federated table queries: each peer opens one SubJobs stream for all of them,
    answers each exactly, and audits each sub-job as a RunSubJob call (allowed, accepted,
    released) besides the one stream."""
    async with federation(_catalogs(tmp_path, 3)) as fed, fed.client() as c:
        for _ in range(3):
            result = await c.query("SELECT count(*), avg(age) FROM tiny", federated=True,
                                   min_sites=3)
            assert result.rows[0][0] == 3 * len(AGES)
        await asyncio.sleep(0.1)  # allowed calls are group-committed
        for peer in fed.daemons[1:]:
            rows = await peer.store.audit_rows()
            streams = [r for r in rows if r.action == "/stimnet.v1.FederationService/SubJobs"]
            calls = [r for r in rows if r.action == "/stimnet.v1.FederationService/RunSubJob"]
            assert [(r.actor, r.decision) for r in streams] == [("site-a", "allowed")]
            assert [(r.actor, r.decision) for r in calls] == [("site-a", "allowed")] * 3
            assert [r.decision for r in _audit(rows, "release")] == ["released"] * 3


async def test_a_refused_or_malformed_sub_job_ends_alone(federation, tmp_path: Path) -> None:
    """On one stream: a tampered job is refused UNAUTHENTICATED, a replay and a bad deadline
    are refused, a duplicate id is refused while the first runs — and the good sub-jobs
    beside them are answered, each refusal audited at the peer with its reason."""
    async with federation(_catalogs(tmp_path, 2)) as fed, fed.client() as c:
        good = _signed(c, scope="federated")
        tampered = _tamper(_signed(c, scope="federated"), epsilon=5.0)
        creds = client_config(_node_certs(fed, "site-a"), fed.address(1)).credentials()
        async with grpc.aio.secure_channel(fed.address(1), creds) as ch:
            call = federation_pb2_grpc.FederationServiceStub(ch).SubJobs(timeout=30)
            assert (MULTIPLEX_KEY, "1") in tuple(await call.initial_metadata())
            await call.write(_start(good, 1))
            await call.write(_start(tampered, 2))
            await call.write(_start(_signed(c, scope="federated"), 3, timeout_s=math.nan))
            await call.write(_start(_signed(c, scope="federated"), 4, timeout_s=-1))
            got = await _replies(call, {1, 2, 3, 4})
            await call.write(_start(good, 5))  # the same signed job again: a replay
            await call.write(_start(_signed(c, scope="federated"), 6))
            got.update(await _replies(call, {5, 6}))
            await call.done_writing()
            assert await call.read() is grpc.aio.EOF
            assert await call.code() == grpc.StatusCode.OK
        rows = await fed.daemons[1].store.audit_rows()
    assert got[1][-1].event.site.state == "done" and got[6][-1].event.site.state == "done"
    status = {i: (got[i][-1].status.code, got[i][-1].status.message) for i in (2, 3, 4, 5)}
    assert status[2][0] == "UNAUTHENTICATED" and "signature does not match" in status[2][1]
    assert status[3][0] == status[4][0] == "INVALID_ARGUMENT"
    assert "timeout_s nan is not within" in status[3][1]
    assert status[5][0] == "FAILED_PRECONDITION" and "replayed request" in status[5][1]
    refused = [json.loads(r.detail_json) for r in _audit(
        rows, "/stimnet.v1.FederationService/RunSubJob") if r.decision == "refused"]
    assert sorted(d["code"] for d in refused) == ["FAILED_PRECONDITION", "UNAUTHENTICATED"]


async def test_a_revoked_entry_is_refused_on_its_open_stream(federation,
                                                             tmp_path: Path) -> None:
    """Revocation is checked per sub-job, as per call: an entry revoked while its stream
    stays open gets its next sub-job refused on it, and audited."""
    async with federation(_catalogs(tmp_path, 2)) as fed, fed.client() as c:
        creds = client_config(_node_certs(fed, "site-a"), fed.address(1)).credentials()
        async with grpc.aio.secure_channel(fed.address(1), creds) as ch:
            call = federation_pb2_grpc.FederationServiceStub(ch).SubJobs(timeout=30)
            await call.write(_start(_signed(c, scope="federated"), 1))
            first = await _replies(call, {1})
            fed.pki.revoke("site-a")
            fed.daemons[1].reload()
            await call.write(_start(_signed(c, scope="federated"), 2))
            second = await _replies(call, {2})
            call.cancel()
        rows = await fed.daemons[1].store.audit_rows()
    assert first[1][-1].event.site.state == "done"
    assert second[2][-1].status.code == "UNAUTHENTICATED"
    assert "revoked" in second[2][-1].status.message
    denied = [r for r in _audit(rows, "/stimnet.v1.FederationService/RunSubJob")
              if r.decision == "denied"]
    assert len(denied) == 1 and "revoked" in json.loads(denied[0].detail_json)["reason"]


async def test_a_sub_job_past_its_deadline_ends_and_the_stream_goes_on(federation,
                                                                        tmp_path: Path) -> None:
    """A sub-job's deadline is its own: past it, that sub-job ends DEADLINE_EXCEEDED at
    the peer, and the next one on the stream is answered."""
    async with federation(_catalogs(tmp_path, 2)) as fed, fed.client() as c:
        creds = client_config(_node_certs(fed, "site-a"), fed.address(1)).credentials()
        async with grpc.aio.secure_channel(fed.address(1), creds) as ch:
            call = federation_pb2_grpc.FederationServiceStub(ch).SubJobs(timeout=30)
            await call.write(_start(_signed(c, scope="federated"), 1, timeout_s=1e-9))
            late = await _replies(call, {1})
            await call.write(_start(_signed(c, scope="federated"), 2))
            on_time = await _replies(call, {2})
            call.cancel()
    assert late[1][-1].status.code == "DEADLINE_EXCEEDED"
    assert on_time[2][-1].event.site.state == "done"


class _Shared(_Garbler):
    """A hostile node that also serves SubJobs, answering each sub-job as its RunSubJob
    would."""

    async def SubJobs(self, request_iterator, context):  # type: ignore[no-untyped-def]
        await context.send_initial_metadata(((MULTIPLEX_KEY, "1"),))
        async for call in request_iterator:
            async for ev in self.RunSubJob(call.start, context):
                yield federation_pb2.SubJobReply(id=call.id, event=ev)


async def _ask_shared(fed, c, servicer: _Garbler) -> tuple:  # type: ignore[no-untyped-def]
    return await ask_node(fed, c, servicer._name, servicer, times=2, small=True)


GOOD_DOC = '{"partials": [], "epsilon": null, "mechanism": null}'


@pytest.mark.parametrize("doc, states, problem", [
    ('[1, 2]', ("done",), "malformed partial aggregates: the answer is not an object"),
    (GOOD_DOC, ("dancing",), "node 'garbler' sent an unknown state 'dancing'"),
])
async def test_a_malformed_answer_on_the_shared_stream_fails_that_site(
        federation, tmp_path: Path, doc: str, states: tuple[str, ...], problem: str) -> None:
    """A hostile node's answers read on the shared stream are judged as on a call: the
    site fails, saying why, and the next sub-job to it is judged afresh."""
    async with federation(_catalogs(tmp_path, 1)) as fed, fed.client() as c:
        outcomes, events = await _ask_shared(fed, c, _Shared("garbler", doc, states))
    assert [o.state for o in outcomes] == ["failed", "failed"]
    assert [o.detail for o in outcomes] == [problem, problem]
    assert [e[1] for e in events if e[0] == "garbler"][-1] == "failed"


async def test_queries_go_on_across_peer_connection_ages(federation, tmp_path: Path) -> None:
    """Peers that close every connection after half a second (max_connection_age_s): the
    entry moves to a new stream when a connection is going away, and no query fails."""
    async with federation(_catalogs(tmp_path, 3),
                          node={"max_connection_age_s": 0.5, "grace_s": 5.0}) as fed, \
            fed.client() as c:
        for _ in range(12):
            result = await c.query("SELECT count(*) FROM tiny", federated=True, min_sites=3)
            assert result.rows[0][0] == 3 * len(AGES)
            await asyncio.sleep(0.15)


async def test_a_clients_queries_share_one_session_each_audited_as_runjob(
        federation, tmp_path: Path) -> None:
    """One client, three queries: one Session stream at the entry, and each query audited
    (and answered) as the RunJob call it stands for."""
    async with federation(_catalogs(tmp_path, 1)) as fed, fed.client() as c:
        for _ in range(3):
            assert (await c.query("SELECT count(*) FROM tiny")).rows[0][0] == len(AGES)
        await asyncio.sleep(0.1)  # allowed calls are group-committed
        rows = await fed.daemons[0].store.audit_rows()
    sessions = _audit(rows, "/stimnet.v1.JobService/Session")
    runs = _audit(rows, "/stimnet.v1.JobService/RunJob")
    assert [(r.actor, r.decision) for r in sessions] == [("alice", "allowed")]
    assert [(r.actor, r.decision) for r in runs] == [("alice", "allowed")] * 3


async def test_a_client_outlives_its_nodes_restart(federation, tmp_path: Path) -> None:
    """The entry restarts under an open session: the query during the outage fails as a
    lost connection, and the same client's next query, after the restart, is answered on
    a new session."""
    from stimctl.client import ConnectionFailed
    from stimnetd.config import load_config
    from stimnetd.daemon import Daemon

    async with federation(_catalogs(tmp_path, 1)) as fed, fed.client(timeout_s=5) as c:
        assert (await c.query("SELECT count(*) FROM tiny")).rows[0][0] == len(AGES)
        await fed.daemons[0].shutdown()
        with pytest.raises(ConnectionFailed):
            await c.query("SELECT count(*) FROM tiny")
        again = Daemon(load_config(fed.tmp / "site-a" / "stimnetd.toml"))
        await again.start()
        try:
            for _ in range(50):  # the channel reconnects with backoff
                try:
                    answer = await c.query("SELECT count(*) FROM tiny")
                    break
                except ConnectionFailed:
                    await asyncio.sleep(0.2)
            else:
                raise AssertionError("no answer after the restart")
        finally:
            await again.shutdown()
    assert answer.rows[0][0] == len(AGES)


async def test_a_signed_job_whose_spec_is_no_query_is_refused_by_each_site(
        federation, tmp_path: Path) -> None:
    """A researcher's own client may sign any spec: one that is not a query fails the job
    with each site's refusal (saying why), never an internal error at the entry."""
    from stimctl.client import JobFailed

    async with federation(_catalogs(tmp_path, 2)) as fed, fed.client() as c:
        req = signing.new_request("query", "tiny", spec={"catalog": "tiny", "outputs": 7},
                                  entry="site-a", scope="federated")
        with pytest.raises(JobFailed) as err:
            await c.run_job(await c.submit(c.sign(req)))
    detail = str(err.value)
    assert "internal error" not in detail
    assert "site-a: refused" in detail and "site-b: refused" in detail, detail
