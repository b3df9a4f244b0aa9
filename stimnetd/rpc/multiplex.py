"""Calls multiplexed on one long-lived bidi stream (FederationService.SubJobs between nodes,
JobService.Session from researchers' clients).

Per-call overhead, not bytes, dominates a small federated query: a gRPC call's set-up
(headers, a handler context, its request read in a round trip of its own) and its status
cost more than the query's own messages. Here each call is one message each way: the caller
tags it with an id, the server runs it as a task under the same rules as the call it stands
for (Guard.subcall: checked again, audited, logged, measured, its errors mapped) and tags its
replies. A call that ends as a failed call would ends with a CallStatus; the stream and the
other calls on it go on.

Messages follow one shape: a call has `id`, `timeout_s`, `cancel` and its request in a
field named by `body`; a reply has `id`, `event` and `status`.

The server speaks first (initial metadata MULTIPLEX_KEY): a caller learns that the stream
is served before it sends anything, and treats a stream answered without it as a protocol
error (stimnet/multiplex.py).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import TYPE_CHECKING, Any

import grpc
import structlog

from stimnet.multiplex import MAX_CALL_TIMEOUT_S, MAX_RUNNING, MAX_UNSENT, MULTIPLEX_KEY
from stimnet.v1 import common_pb2

if TYPE_CHECKING:  # the guard imports this module's callers
    from stimnetd.rpc.guard import Caller, Guard


def status(reply: Any, call_id: int, code: str, message: str, kind: str = "") -> Any:
    return reply(id=call_id, status=common_pb2.CallStatus(code=code, message=message, kind=kind))


async def serve(calls: AsyncIterator[Any], context: grpc.aio.ServicerContext, guard: Guard,
                method: str, *, body: str, reply: Any,
                request_id: Callable[[Any], str],
                run: Callable[[Any, Caller], AsyncIterator[Any]]) -> AsyncIterator[Any]:
    """Serve a stream of calls to `method`: each `run(request, caller)` as a task, its
    events sent as `reply` messages. Ends once the caller has stopped writing and every
    call on the stream has ended."""
    await context.send_initial_metadata(((MULTIPLEX_KEY, "1"),))
    stream = _StreamCalls(context, guard, method, body=body, reply=reply,
                          request_id=request_id, run=run)
    reader = asyncio.create_task(stream.read(calls))
    try:
        while (item := await stream.replies.get()) is not None:
            if stream.replies.qsize() < MAX_UNSENT:
                stream.room.set()
            yield item
        await reader  # a broken request stream ends this one with its error
    finally:
        reader.cancel()
        for task in list(stream.running.values()):
            task.cancel()


class _StreamCalls:
    """The calls of one stream as the server runs them, and the replies they queue for it
    (None last, once the caller has stopped writing and every call has ended)."""

    def __init__(self, context: grpc.aio.ServicerContext, guard: Guard, method: str, *,
                 body: str, reply: Any, request_id: Callable[[Any], str],
                 run: Callable[[Any, Caller], AsyncIterator[Any]]) -> None:
        self._context, self._guard, self._method = context, guard, method
        self._body, self._reply, self._request_id, self._run = body, reply, request_id, run
        self.replies: asyncio.Queue[Any] = asyncio.Queue()
        self.running: dict[int, asyncio.Task[None]] = {}
        # A caller that writes calls but does not read their replies must not grow this
        # queue without bound (its flow control stops our writes, not its own): past
        # MAX_UNSENT replies, its calls are not read until it has read some.
        self.room = asyncio.Event()
        self.room.set()

    def _put(self, item: Any) -> None:
        self.replies.put_nowait(item)
        if self.replies.qsize() >= MAX_UNSENT:
            self.room.clear()

    async def read(self, calls: AsyncIterator[Any]) -> None:
        try:
            async for call in calls:
                await self.room.wait()
                self._take(call)
            if self.running:
                await asyncio.wait(list(self.running.values()))
        finally:
            self.replies.put_nowait(None)

    def _take(self, call: Any) -> None:
        if call.cancel:
            if (task := self.running.get(call.id)) is not None:
                task.cancel()
            return
        if problem := _problem(call, self._body, self.running):
            self._put(status(self._reply, call.id, "INVALID_ARGUMENT", problem))
            return
        if len(self.running) >= MAX_RUNNING:
            self._put(status(self._reply, call.id, "RESOURCE_EXHAUSTED",
                             f"{len(self.running)} calls are running on this stream, its limit; "
                             "wait for some to end"))
            return
        self.running[call.id] = asyncio.create_task(self._one(call), name=f"{self._body}-{call.id}")

    async def _one(self, call: Any) -> None:
        from stimnetd.rpc.guard import SubcallEnded

        request = getattr(call, self._body)
        try:
            async with asyncio.timeout(call.timeout_s):
                async for ev in self._guard.subcall(self._method, self._context,
                                                    self._request_id(request),
                                                    lambda caller: self._run(request, caller)):
                    self._put(self._reply(id=call.id, event=ev))
        except SubcallEnded as ended:
            self._put(status(self._reply, call.id, ended.code, ended.message, ended.kind))
        except TimeoutError:
            self._put(status(self._reply, call.id, "DEADLINE_EXCEEDED",
                             f"call {call.id} ran past its {call.timeout_s:g}s deadline"))
        except Exception:  # noqa: BLE001 - a call always ends with a status, or its caller hangs
            structlog.get_logger("stimnetd.rpc").exception("multiplexed call failed")
            self._put(status(self._reply, call.id, "INTERNAL",
                             "internal error; the node's operator can find it in the logs"))
        finally:
            self.running.pop(call.id, None)


def _problem(call: Any, body: str, running: dict[int, Any]) -> str | None:
    if not call.HasField(body):
        return f"call {call.id}: a call needs `{body}` or `cancel`"
    if call.id in running:
        return f"call {call.id} is already running on this stream"
    if not 0 < call.timeout_s <= MAX_CALL_TIMEOUT_S:  # NaN fails too
        return (f"call {call.id}: timeout_s {call.timeout_s!r} is not within "
                f"(0, {MAX_CALL_TIMEOUT_S:g}] seconds")
    return None
