"""The caller's side of calls multiplexed on one long-lived bidi stream (used by the
client's Session stream and by a node's SubJobs streams to its peers); the server loop is
stimnetd/rpc/multiplex.py.

Per-call overhead, not bytes, dominates a small federated query: a gRPC call's set-up
and its status cost more than the query's own messages. Here each call is one message each
way, tagged with an id; a call that ends as a failed call would ends with a CallStatus, and
the stream and the other calls on it go on.

Messages follow one shape: a call has `id`, `timeout_s`, `cancel` and its request in a
field named by `body`; a reply has `id`, `event` and `status`.

The server speaks first (initial metadata MULTIPLEX_KEY): a caller learns that the stream
is served before it sends anything. A server that answers without the handshake does not
speak this protocol: that is an error (`NotMultiplexed`), raised before any call is sent.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import time
from collections.abc import Callable
from typing import Any

import grpc

MULTIPLEX_KEY = "x-stimnet-multiplexed"
# A call's deadline on a stream is the caller's to choose, within reason.
MAX_CALL_TIMEOUT_S = 24 * 3600.0
# Calls running at once on one stream (each a task; the domain's own per-caller limits
# apply within them), and replies a stream may hold that its caller has not read.
MAX_RUNNING = 256
MAX_UNSENT = 1024
# A shared stream's lifetime (its call deadline) at least; it is replaced before then.
STREAM_LIFETIME_S = 600.0


class StreamBroken(Exception):
    """A shared stream could not take a call (it ended or broke meanwhile)."""


class NotMultiplexed(Exception):
    """The server answered the stream without the multiplexing handshake, so it does not
    speak this protocol (a protocol error); nothing was sent on the stream."""


class SharedStream:
    """The caller's side: one stream carrying many calls, each call's replies routed to it
    by id. A broken stream ends each of its calls with the error (as a failed call would);
    the next call opens a new stream. Sent calls are `call(id=…, timeout_s=…, <body>=…)`;
    `last(reply)` says whether a reply is its call's last."""

    def __init__(self, open_call: Callable[[float], Any], lifetime_s: float, *, call: Any,
                 body: str, last: Callable[[Any], bool]) -> None:
        # A deadline as every call has; calls go on the stream only while they can finish
        # before it (see `takes`).
        self._deadline = time.monotonic() + lifetime_s
        self._call = open_call(lifetime_s)
        self._message, self._body, self._last = call, body, last
        self._subs: dict[int, asyncio.Queue[Any]] = {}
        self._ids = itertools.count(1)
        self._write_lock = asyncio.Lock()
        self._broken: str | None = None
        self._error: grpc.aio.AioRpcError | None = None
        self._retired = False
        self._closing = False
        self._tasks: set[asyncio.Task[None]] = set()
        self._opened = asyncio.ensure_future(self._call.initial_metadata())
        self._reader = asyncio.create_task(self._read())

    def takes(self, timeout_s: float, channel: grpc.aio.Channel) -> bool:
        """Whether a call of `timeout_s` may go on this stream: not if it broke, would
        outlive the stream's deadline, or its connection is going away (a server's
        max_connection_age: the stream would be cut when the grace period ends)."""
        return (self._broken is None and not self._retired
                and self._deadline - time.monotonic() > timeout_s + 1.0
                # Still opening (its channel connecting): the call waits for it with the rest.
                and (not self._opened.done()
                     or channel.get_state() == grpc.ChannelConnectivity.READY))

    async def start(self, request: Any, timeout_s: float) -> SharedCall:
        # The server speaks first: writing to a call it does not serve can hide the reason
        # (grpc/grpc#36066 reports INTERNAL instead of UNIMPLEMENTED), and a call sent on
        # such a stream could not tell "not run" from "lost".
        metadata = await asyncio.shield(self._opened)
        if (MULTIPLEX_KEY, "1") not in tuple(metadata or ()):
            # Refused (its status says why), or not served: not this protocol, whatever
            # the server does with the stream next.
            self._call.cancel()
            await asyncio.wait([self._reader])
            if self._error is None or self._error.code() in (grpc.StatusCode.UNIMPLEMENTED,
                                                             grpc.StatusCode.CANCELLED):
                raise NotMultiplexed
            raise self._error
        call_id = next(self._ids)
        queue: asyncio.Queue[Any] = asyncio.Queue()
        self._subs[call_id] = queue
        try:
            await self._write(self._message(id=call_id, timeout_s=timeout_s,
                                            **{self._body: request}))
        except BaseException:
            self._subs.pop(call_id, None)
            raise
        return SharedCall(self, call_id, queue)

    async def _write(self, message: Any) -> None:
        async with self._write_lock:
            if self._broken is not None:
                raise StreamBroken(self._broken)
            try:
                await self._call.write(message)
            except Exception:  # noqa: BLE001 - the call ended meanwhile: its status says why
                await asyncio.wait([self._reader])
                if self._error is not None:
                    raise self._error from None
                raise StreamBroken(self._broken or "the stream ended") from None

    async def _read(self) -> None:
        ended: Any = None  # the server ended the stream: its calls end without an outcome
        try:
            async for reply in self._call:
                queue = self._subs.get(reply.id)
                if queue is not None:  # else cancelled by us meanwhile
                    queue.put_nowait(reply)
        except grpc.aio.AioRpcError as exc:
            ended = self._error = exc
        except asyncio.CancelledError:
            ended = StreamBroken("the stream was closed")
            raise
        finally:
            self._broken = (f"{ended.code().name}: {ended.details()}"
                            if isinstance(ended, grpc.aio.AioRpcError)
                            else str(ended) if ended is not None else "the stream ended")
            for queue in self._subs.values():
                queue.put_nowait(ended)
            self._subs.clear()

    def last(self, reply: Any) -> bool:
        return self._last(reply)

    def forget(self, call_id: int, *, ended: bool) -> None:
        """Call `call_id` is over for the caller; `ended`: the server said so too, else it
        is told to stop."""
        if self._subs.pop(call_id, None) is None or self._broken is not None:
            return
        if not ended:
            self._spawn(self._write(self._message(id=call_id, cancel=True)))
        if self._retired and not self._subs:
            self._finish()

    def retire(self) -> None:
        """No new calls; the stream ends once those on it have."""
        self._retired = True
        if not self._subs:
            self._finish()

    async def aclose(self, timeout_s: float) -> None:
        """Retire, and wait up to `timeout_s` for the server to end the stream (a stream
        still open when an event loop closes breaks grpc's next loop in the process)."""
        self.retire()
        _, late = await asyncio.wait([self._reader], timeout=timeout_s)
        for task in late:
            task.cancel()
        if self._tasks:
            await asyncio.wait(self._tasks, timeout=timeout_s)

    def _finish(self) -> None:
        if not self._closing and self._broken is None:
            self._closing = True
            self._spawn(self._done_writing())

    async def _done_writing(self) -> None:
        async with self._write_lock:
            await self._call.done_writing()

    def _spawn(self, coro: Any) -> None:
        async def quietly() -> None:
            # The stream may break meanwhile: its calls learn that from the reader.
            with contextlib.suppress(StreamBroken, grpc.aio.AioRpcError,
                                     asyncio.InvalidStateError):
                await coro
        task = asyncio.create_task(quietly())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)


class SharedCall:
    """One call on a SharedStream: its replies, then None (the server ended the stream)
    or the stream's error."""

    def __init__(self, stream: SharedStream, call_id: int, queue: asyncio.Queue[Any]) -> None:
        self._stream = stream
        self._id = call_id
        self._queue = queue
        self._ended = False

    async def next(self) -> Any:
        got = await self._queue.get()
        if got is None or isinstance(got, BaseException):
            self._ended = True
            if got is not None:
                raise got
            return None
        if got.HasField("status") or self._stream.last(got):
            self._ended = True  # nothing follows on the server's side
        return got

    def close(self) -> None:
        self._stream.forget(self._id, ended=self._ended)


def shared(streams: dict[str, SharedStream], key: str, channel: grpc.aio.Channel,
           timeout_s: float, make: Callable[[float], SharedStream]) -> SharedStream:
    """The stream in `streams[key]` if it takes a call of `timeout_s`, else a new one there
    (`make(lifetime_s)`), the old one retired."""
    stream = streams.get(key)
    if stream is None or not stream.takes(timeout_s, channel):
        if stream is not None:
            stream.retire()
        stream = streams[key] = make(max(STREAM_LIFETIME_S, 10 * timeout_s))
    return stream

