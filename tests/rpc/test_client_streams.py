"""The client's WatchJob streams against a node that keeps a stream open after its final
state, or sends a finished job's answer after its state."""

from __future__ import annotations

import asyncio
import gc

import grpc
import pytest

from stimctl.client import AsyncClient, JobFailed
from stimnet import codec
from stimnet.frames import packed_frames
from stimnet.v1 import jobs_pb2, jobs_pb2_grpc, node_pb2, node_pb2_grpc
from stimnetd.testing import CertFactory, fake_node
from tests.helpers import client_config


class _Lingering(jobs_pb2_grpc.JobServiceServicer):
    """WatchJob of job "j1": its final state, then the stream held open until released.
    Of any other job: its succeeded state first and its answer after, as a node may send
    them to a watcher joining a finished job."""

    def __init__(self) -> None:
        self.release = asyncio.Event()
        self.ended: asyncio.Future[str] = asyncio.get_running_loop().create_future()

    async def WatchJob(self, request, context):  # type: ignore[no-untyped-def]
        if request.id == "j1":
            yield jobs_pb2.JobEvent(state=jobs_pb2.Job(id="j1", state="failed", detail="no site"))
            try:
                await self.release.wait()
            except asyncio.CancelledError:
                self.ended.set_result("cancelled")
                raise
            self.ended.set_result("finished")
            return
        yield jobs_pb2.JobEvent(state=jobs_pb2.Job(id=request.id, state="succeeded"))
        for frame in packed_frames(codec.pack({"result": {"columns": ["n"]}}, {})):
            yield jobs_pb2.JobEvent(result=frame)


class _Named(node_pb2_grpc.NodeServiceServicer):
    """GetInfo only: the client asks the node's name once, to sign it into each job."""

    async def GetInfo(self, request, context):  # type: ignore[no-untyped-def]
        return node_pb2.NodeInfo(name="node-a")


async def _serve(pki: CertFactory, servicer: jobs_pb2_grpc.JobServiceServicer
                 ) -> tuple[grpc.aio.Server, int]:
    return await fake_node(pki.issue("node-a", "node", hosts=("127.0.0.1",)),
                           jobs_pb2_grpc.add_JobServiceServicer_to_server, servicer,
                           also=((node_pb2_grpc.add_NodeServiceServicer_to_server, _Named()),))


async def test_a_final_state_ends_the_watch_and_its_call_is_kept_until_its_status(
        pki: CertFactory) -> None:
    """The answer (here a failure) is the final state's: the client does not wait for the
    stream's status, yet the call is not dropped (grpc would cancel it, and the node log a
    finished RPC as cancelled): it lives on until the node ends it."""
    alice = pki.issue("alice", "researcher")
    servicer = _Lingering()
    server, port = await _serve(pki, servicer)
    try:
        async with AsyncClient(client_config(alice, f"127.0.0.1:{port}")) as c:
            # The node holds the stream for as long as the test lets it: a client waiting
            # for the status would never get here.
            with pytest.raises(JobFailed, match="j1 failed: no site"):
                await asyncio.wait_for(c.run_job(jobs_pb2.Job(id="j1", state="running")), 10)
            assert len(c._draining) == 1
            # A dropped call would be cancelled once collected; its cancellation goes out
            # on the connection before the next call, whose answer the node sends after.
            gc.collect()
            assert (await c.info()).name == "node-a"
            assert not servicer.ended.done()
            servicer.release.set()
            assert await asyncio.wait_for(servicer.ended, 10) == "finished"
            await asyncio.gather(*c._draining)
            assert c._draining == set()
    finally:
        await server.stop(None)


async def test_a_finished_jobs_answer_after_its_final_state_is_still_read(
        pki: CertFactory) -> None:
    """A succeeded job's final state without its answer does not end the stream: the
    answer that follows it is read (stimctl's submit-then-watch under load)."""
    alice = pki.issue("alice", "researcher")
    server, port = await _serve(pki, _Lingering())
    try:
        async with AsyncClient(client_config(alice, f"127.0.0.1:{port}")) as c:
            answer = await c.run_job(jobs_pb2.Job(id="j2", state="running"))
        assert answer.job_id == "j2" and answer.columns == ["n"]
    finally:
        await server.stop(None)
