"""JobService: researcher-facing jobs. Translates; the JobService domain object decides."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import asdict
from typing import Any

from stimnet.errors import InvalidRequest
from stimnet.frames import packed_frames
from stimnet.v1 import jobs_pb2, jobs_pb2_grpc
from stimnetd.jobs.service import JobService
from stimnetd.rpc import convert, multiplex
from stimnetd.rpc.guard import Guard, current_caller
from stimnetd.store.records import JobRecord

_RUN_JOB = "/stimnet.v1.JobService/RunJob"


class JobServicer(jobs_pb2_grpc.JobServiceServicer):
    def __init__(self, jobs: JobService, guard: Guard) -> None:
        self._jobs = jobs
        self._guard = guard

    async def SubmitJob(self, request: jobs_pb2.SubmitJobRequest, context: Any) -> jobs_pb2.Job:
        if not request.HasField("job"):
            raise InvalidRequest("SubmitJob needs a signed job")
        caller = current_caller()
        record = await self._jobs.submit(convert.signed_job(request.job), caller.identity,
                                         caller.request_id)
        return convert.job(record)

    async def RunJob(self, request: jobs_pb2.SubmitJobRequest,
                     context: Any) -> AsyncIterator[jobs_pb2.JobEvent]:
        if not request.HasField("job"):
            raise InvalidRequest("RunJob needs a signed job")
        caller = current_caller()
        record = await self._jobs.submit(convert.signed_job(request.job), caller.identity,
                                         caller.request_id, follow=True)
        # The submitted record goes along: no read, and a quick job's whole stream is its
        # final state with the answer (see jobs/watch.py).
        async for event in self._events(record.id, record):
            yield event

    async def Session(self, request_iterator: AsyncIterator[jobs_pb2.SessionCall],
                      context: Any) -> AsyncIterator[jobs_pb2.SessionReply]:
        """RunJob calls multiplexed on one stream (rpc/multiplex.py), each as a RunJob call."""
        async for reply in multiplex.serve(
                request_iterator, context, self._guard, _RUN_JOB, body="run",
                reply=jobs_pb2.SessionReply, request_id=lambda _request: "",
                run=lambda request, _caller: self.RunJob(request, context)):
            yield reply

    async def GetJob(self, request: jobs_pb2.GetJobRequest, context: Any) -> jobs_pb2.Job:
        return convert.job(await self._jobs.get(request.id, current_caller().identity))

    async def ListJobs(self, request: jobs_pb2.ListJobsRequest,
                       context: Any) -> jobs_pb2.ListJobsResponse:
        records = await self._jobs.list(current_caller().identity, request.limit)
        return jobs_pb2.ListJobsResponse(jobs=[convert.job(r) for r in records])

    async def CancelJob(self, request: jobs_pb2.CancelJobRequest, context: Any) -> jobs_pb2.Job:
        return convert.job(await self._jobs.cancel(request.id, current_caller().identity))

    async def WatchJob(self, request: jobs_pb2.WatchJobRequest,
                       context: Any) -> AsyncIterator[jobs_pb2.JobEvent]:
        async for event in self._events(request.id):
            yield event

    async def _events(self, job_id: str,
                      submitted: JobRecord | None = None) -> AsyncIterator[jobs_pb2.JobEvent]:
        async for update in self._jobs.watch(job_id, current_caller().identity, submitted):
            if update.kind == "state" and update.job is not None and update.result is not None:
                # The final state with its answer: the state rides on the last frame.
                frames = list(packed_frames(update.result))
                for frame in frames[:-1]:
                    yield jobs_pb2.JobEvent(result=frame)
                yield jobs_pb2.JobEvent(result=frames[-1], state=convert.job(update.job))
            elif update.kind == "state" and update.job is not None:
                yield jobs_pb2.JobEvent(state=convert.job(update.job))
            elif update.kind == "site" and update.site is not None:
                yield jobs_pb2.JobEvent(site=convert.site_event(asdict(update.site)))
            elif update.kind == "sites":
                yield jobs_pb2.JobEvent(sites=[convert.site_event(asdict(s))
                                               for s in update.sites])
            elif update.kind == "log":
                yield jobs_pb2.JobEvent(log_line=update.line)

    async def GetResult(self, request: jobs_pb2.GetResultRequest,
                        context: Any) -> AsyncIterator[Any]:
        for frame in packed_frames(await self._jobs.result(request.id, current_caller().identity)):
            yield frame

    async def ApproveJob(self, request: jobs_pb2.ReviewJobRequest, context: Any) -> jobs_pb2.Job:
        return convert.job(await self._jobs.approve(request.id, current_caller().identity,
                                                    request.remember))

    async def DenyJob(self, request: jobs_pb2.ReviewJobRequest, context: Any) -> jobs_pb2.Job:
        return convert.job(await self._jobs.deny(request.id, current_caller().identity))
