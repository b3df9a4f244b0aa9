"""The server side of multiplexed streams (rpc/multiplex.serve), with a fake guard: calls
run concurrently and end alone, a cancel stops one, and a caller can make the stream hold
neither unbounded tasks nor unbounded unread replies."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest

from stimnet.v1 import federation_pb2
from stimnetd.rpc import multiplex


class _Context:
    def __init__(self) -> None:
        self.metadata: tuple = ()

    async def send_initial_metadata(self, metadata: tuple) -> None:
        self.metadata = metadata


class _Guard:
    """Runs each call's behaviour as is (the real one checks, audits and maps errors)."""

    async def subcall(self, method: str, context: Any, request_id: str,
                      behavior: Any) -> AsyncIterator[Any]:
        async for item in behavior(None):
            yield item


class _Calls:
    """The caller's side of the stream: calls queued by the test, counted as read."""

    def __init__(self) -> None:
        self.queue: asyncio.Queue[federation_pb2.SubJobCall | None] = asyncio.Queue()
        self.read = 0

    def __aiter__(self) -> _Calls:
        return self

    async def __anext__(self) -> federation_pb2.SubJobCall:
        item = await self.queue.get()
        if item is None:
            raise StopAsyncIteration
        self.read += 1
        return item

    def start(self, call_id: int) -> None:
        self.queue.put_nowait(federation_pb2.SubJobCall(
            id=call_id, timeout_s=30, start=federation_pb2.SubJobRequest(request_id=str(call_id))))


def _serve(calls: _Calls, run: Any) -> AsyncIterator[federation_pb2.SubJobReply]:
    return multiplex.serve(calls, _Context(), _Guard(), "/m", body="start",  # type: ignore[arg-type]
                           reply=federation_pb2.SubJobReply,
                           request_id=lambda request: request.request_id, run=run)


def _event(text: str) -> federation_pb2.SubJobEvent:
    return federation_pb2.SubJobEvent(log_line=text)


async def test_calls_beyond_the_running_limit_are_refused_and_the_rest_answered(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """With MAX_RUNNING calls held, the next is refused RESOURCE_EXHAUSTED at once; when
    they are let go each is answered, and the stream ends after the caller's last call."""
    monkeypatch.setattr(multiplex, "MAX_RUNNING", 3)
    gate = asyncio.Event()

    async def run(request: Any, caller: Any) -> AsyncIterator[Any]:
        await gate.wait()
        yield _event(f"answer {request.request_id}")

    calls = _Calls()
    replies = _serve(calls, run)
    for i in range(1, 5):
        calls.start(i)
    refused = await asyncio.wait_for(anext(replies), 5)
    assert (refused.id, refused.status.code) == (4, "RESOURCE_EXHAUSTED")
    assert "3 calls are running on this stream" in refused.status.message
    gate.set()
    calls.queue.put_nowait(None)
    rest = [r async for r in replies]
    assert sorted((r.id, r.event.log_line) for r in rest) == [
        (i, f"answer {i}") for i in (1, 2, 3)]


async def test_a_cancelled_call_stops_and_the_others_go_on() -> None:
    """A cancel message ends that call's task (no reply for it); a call beside it is
    answered."""
    started: dict[str, asyncio.Event] = {"1": asyncio.Event(), "2": asyncio.Event()}
    cancelled: list[str] = []
    gate = asyncio.Event()

    async def run(request: Any, caller: Any) -> AsyncIterator[Any]:
        started[request.request_id].set()
        try:
            await gate.wait()
        except asyncio.CancelledError:
            cancelled.append(request.request_id)
            raise
        yield _event("done")

    calls = _Calls()
    replies = _serve(calls, run)
    first = asyncio.ensure_future(anext(replies))
    calls.start(1)
    calls.start(2)
    await asyncio.wait_for(started["1"].wait(), 5)
    await asyncio.wait_for(started["2"].wait(), 5)
    calls.queue.put_nowait(federation_pb2.SubJobCall(id=1, cancel=True))
    for _ in range(100):
        if cancelled:
            break
        await asyncio.sleep(0.01)
    gate.set()
    calls.queue.put_nowait(None)
    got = [await asyncio.wait_for(first, 5)] + [r async for r in replies]
    assert cancelled == ["1"]
    assert [(r.id, r.event.log_line) for r in got] == [(2, "done")]


async def test_a_caller_that_does_not_read_replies_is_not_read_either(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Calls answered at once (here refused: no deadline) while the caller reads nothing:
    past MAX_UNSENT unread replies the stream stops reading its calls, and reads on as the
    caller reads its replies (running calls are bounded by MAX_RUNNING)."""
    monkeypatch.setattr(multiplex, "MAX_UNSENT", 4)

    async def run(request: Any, caller: Any) -> AsyncIterator[Any]:
        yield _event(request.request_id)

    calls = _Calls()
    replies = _serve(calls, run)
    for i in range(1, 21):
        calls.queue.put_nowait(federation_pb2.SubJobCall(
            id=i, start=federation_pb2.SubJobRequest()))  # timeout_s 0: refused
    first = asyncio.ensure_future(anext(replies))
    await asyncio.sleep(0.2)
    # 4 unread, 1 taken by the caller, and 1 read that waits for room: not all 20.
    assert calls.read == 6, calls.read
    calls.queue.put_nowait(None)
    got = [await asyncio.wait_for(first, 5)] + [r async for r in replies]
    assert [r.id for r in got] == list(range(1, 21)) and calls.read == 20
    assert {r.status.code for r in got} == {"INVALID_ARGUMENT"}
