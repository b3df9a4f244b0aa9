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
is served before it sends anything, so a call sent to a node that does not serve it (an
older version) is known not to have run, and can be sent again as a call of its own.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import TYPE_CHECKING, Any

import grpc

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
    from stimnetd.rpc.guard import SubcallEnded

    await context.send_initial_metadata(((MULTIPLEX_KEY, "1"),))
    replies: asyncio.Queue[Any] = asyncio.Queue()
    running: dict[int, asyncio.Task[None]] = {}
    # A caller that writes calls but does not read their replies must not grow this
    # queue without bound (its flow control stops our writes, not its own): past
    # MAX_UNSENT replies, its calls are not read until it has read some.
    room = asyncio.Event()
    room.set()

    def put(item: Any) -> None:
        replies.put_nowait(item)
        if replies.qsize() >= MAX_UNSENT:
            room.clear()

    async def one(call: Any) -> None:
        request = getattr(call, body)
        try:
            async with asyncio.timeout(call.timeout_s):
                async for ev in guard.subcall(method, context, request_id(request),
                                              lambda caller: run(request, caller)):
                    put(reply(id=call.id, event=ev))
        except SubcallEnded as ended:
            put(status(reply, call.id, ended.code, ended.message, ended.kind))
        except TimeoutError:
            put(status(reply, call.id, "DEADLINE_EXCEEDED",
                       f"call {call.id} ran past its {call.timeout_s:g}s deadline"))
        finally:
            running.pop(call.id, None)

    async def read() -> None:
        try:
            async for call in calls:
                await room.wait()
                if call.cancel:
                    if (task := running.get(call.id)) is not None:
                        task.cancel()
                    continue
                if problem := _problem(call, body, running):
                    put(status(reply, call.id, "INVALID_ARGUMENT", problem))
                    continue
                if len(running) >= MAX_RUNNING:
                    put(status(reply, call.id, "RESOURCE_EXHAUSTED",
                               f"{len(running)} calls are running on this stream, its limit; "
                               "wait for some to end"))
                    continue
                running[call.id] = asyncio.create_task(one(call), name=f"{body}-{call.id}")
            if running:
                await asyncio.wait(list(running.values()))
        finally:
            replies.put_nowait(None)

    reader = asyncio.create_task(read())
    try:
        while (item := await replies.get()) is not None:
            if replies.qsize() < MAX_UNSENT:
                room.set()
            yield item
        await reader  # a broken request stream ends this one with its error
    finally:
        reader.cancel()
        for task in list(running.values()):
            task.cancel()


def _problem(call: Any, body: str, running: dict[int, Any]) -> str | None:
    if not call.HasField(body):
        return f"call {call.id}: a call needs `{body}` or `cancel`"
    if call.id in running:
        return f"call {call.id} is already running on this stream"
    if not 0 < call.timeout_s <= MAX_CALL_TIMEOUT_S:  # NaN fails too
        return (f"call {call.id}: timeout_s {call.timeout_s!r} is not within "
                f"(0, {MAX_CALL_TIMEOUT_S:g}] seconds")
    return None
