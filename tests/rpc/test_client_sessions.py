"""The client runs its queries on one Session stream: answers are routed by call id, and a
call's refusal keeps its error class."""

from __future__ import annotations

import asyncio

import grpc
import pytest

from stimctl.client import AsyncClient, BudgetExhausted, ConnectionFailed, Overloaded
from stimnet import codec
from stimnet.frames import packed_frames
from stimnet.multiplex import MULTIPLEX_KEY
from stimnet.v1 import common_pb2, jobs_pb2, jobs_pb2_grpc
from stimnetd.testing import CertFactory
from tests.helpers import client_config
from tests.rpc.test_client_streams import _serve


def _answer(call_id: int, job_id: str) -> list[jobs_pb2.SessionReply]:
    """A succeeded job's final state riding on its one result frame, as RunJob sends it."""
    frames = list(packed_frames(codec.pack({"result": {"columns": [job_id]}}, {})))
    return [jobs_pb2.SessionReply(id=call_id, event=jobs_pb2.JobEvent(
        result=frames[-1], state=jobs_pb2.Job(id=job_id, state="succeeded")))]


class _OutOfOrder(jobs_pb2_grpc.JobServiceServicer):
    """Serves sessions; answers each pair of calls second first, and refuses calls whose
    query names catalog 'busy' (Overloaded) or 'spent' (the privacy budget)."""

    def __init__(self) -> None:
        self.streams = 0

    async def Session(self, request_iterator, context):  # type: ignore[no-untyped-def]
        self.streams += 1
        await context.send_initial_metadata(((MULTIPLEX_KEY, "1"),))
        held: list[jobs_pb2.SessionCall] = []
        async for call in request_iterator:
            catalog = _catalog(call)
            if catalog in ("busy", "spent"):
                kind = "Overloaded" if catalog == "busy" else "BudgetExhausted"
                yield jobs_pb2.SessionReply(id=call.id, status=common_pb2.CallStatus(
                    code="RESOURCE_EXHAUSTED", message=f"{catalog}: try later", kind=kind))
                continue
            held.append(call)
            if len(held) == 2:
                for c in reversed(held):
                    for reply in _answer(c.id, f"job-{_catalog(c)}"):
                        yield reply
                held = []


class _NoSessions(jobs_pb2_grpc.JobServiceServicer):
    """A server that refuses Session as unimplemented and counts the RunJob calls it gets."""

    def __init__(self) -> None:
        self.runs = 0

    async def Session(self, request_iterator, context):  # type: ignore[no-untyped-def]
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, "Method not implemented!")

    async def RunJob(self, request, context):  # type: ignore[no-untyped-def]
        self.runs += 1
        yield jobs_pb2.JobEvent(state=jobs_pb2.Job(id="j1", state="failed"))


def _catalog(call: jobs_pb2.SessionCall) -> str:
    import json

    return str(json.loads(call.run.job.payload)["catalog"])


async def test_concurrent_queries_on_one_session_get_their_own_answers(
        pki: CertFactory) -> None:
    """Two queries at once on the client's session, answered in the opposite order: each
    gets its own answer, and both went on one stream."""
    alice = pki.issue("alice", "researcher")
    servicer = _OutOfOrder()
    server, port = await _serve(pki, servicer)
    try:
        async with AsyncClient(client_config(alice, f"127.0.0.1:{port}")) as c:
            first, second = await asyncio.wait_for(asyncio.gather(
                c.query("SELECT count(*) FROM one"), c.query("SELECT count(*) FROM two")), 10)
            # Each call is over on the client's side once its answer is in, not when the
            # garbage collector gets to it.
            assert c._sessions[""]._subs == {}
    finally:
        await server.stop(None)
    assert (first.job_id, second.job_id) == ("job-one", "job-two")
    assert first.columns == ["job-one"] and second.columns == ["job-two"]
    assert servicer.streams == 1


@pytest.mark.parametrize("catalog, error", [("busy", Overloaded), ("spent", BudgetExhausted)])
async def test_a_refusal_on_the_session_keeps_its_error_class(
        pki: CertFactory, catalog: str, error: type[Exception]) -> None:
    """A call's status on the session is the typed error a RunJob call's would be: a load
    limit is Overloaded, the privacy budget BudgetExhausted (same gRPC code, told apart by
    the daemon's error class); the session goes on for the next query."""
    alice = pki.issue("alice", "researcher")
    servicer = _OutOfOrder()
    server, port = await _serve(pki, servicer)
    try:
        async with AsyncClient(client_config(alice, f"127.0.0.1:{port}")) as c:
            with pytest.raises(error, match="try later") as err:
                await asyncio.wait_for(c.query(f"SELECT count(*) FROM {catalog}"), 10)
            assert type(err.value) is error
            answers = await asyncio.wait_for(asyncio.gather(
                c.query("SELECT count(*) FROM a"), c.query("SELECT count(*) FROM b")), 10)
    finally:
        await server.stop(None)
    assert sorted(a.job_id for a in answers) == ["job-a", "job-b"]
    assert servicer.streams == 1


async def test_a_server_without_sessions_fails_the_query_with_nothing_run(
        pki: CertFactory) -> None:
    """A query to a server that does not serve Session is ConnectionFailed naming the
    service, and is not sent another way (no RunJob call)."""
    alice = pki.issue("alice", "researcher")
    servicer = _NoSessions()
    server, port = await _serve(pki, servicer)
    try:
        async with AsyncClient(client_config(alice, f"127.0.0.1:{port}")) as c:
            with pytest.raises(ConnectionFailed) as err:
                await asyncio.wait_for(c.query("SELECT count(*) FROM cnsim"), 10)
    finally:
        await server.stop(None)
    assert str(err.value) == (f"the node at 127.0.0.1:{port} does not serve JobService/Session "
                              "(is it a StimNet node?)")
    assert servicer.runs == 0
