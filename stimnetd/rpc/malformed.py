"""Request bytes that are not the method's request message.

grpc deserializes a request before any handler runs, and a deserializer that raises makes
the call UNKNOWN with a traceback in the log. `readable` wraps a method's handler so that
the bytes read as a `Malformed` marker instead, and the behavior raises InvalidRequest for
it inside the guard: the caller gets INVALID_ARGUMENT saying so, and the guard audits and
counts it like any other refusal (the caller is authenticated first).
"""

from __future__ import annotations

import inspect
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc
from google.protobuf.message import DecodeError

from stimnet.errors import InvalidRequest


class Malformed:
    """Stands for a request whose bytes did not parse."""

    __slots__ = ("message",)

    def __init__(self, message: str) -> None:
        self.message = message


def _tolerant(deserializer: Callable[[bytes], Any] | None) -> Callable[[bytes], Any] | None:
    if deserializer is None:
        return None
    owner = getattr(deserializer, "__self__", None)
    name = getattr(getattr(owner, "DESCRIPTOR", None), "full_name", "request")

    def read(data: bytes) -> Any:
        try:
            return deserializer(data)
        except DecodeError:
            return Malformed(f"malformed request: {len(data)} bytes that are not a {name} "
                             "message")

    return read


def _check(request: Any) -> Any:
    if isinstance(request, Malformed):
        raise InvalidRequest(request.message)
    return request


async def _checked_stream(requests: AsyncIterator[Any]) -> AsyncIterator[Any]:
    async for request in requests:
        yield _check(request)


def _checked(behavior: Callable[..., Any] | None, streamed_requests: bool) -> Any:
    if behavior is None:
        return None
    prepare: Callable[[Any], Any] = _checked_stream if streamed_requests else _check
    if inspect.isasyncgenfunction(behavior):
        async def gen(request: Any, context: grpc.aio.ServicerContext) -> Any:
            async for item in behavior(prepare(request), context):
                yield item

        return gen

    async def call(request: Any, context: grpc.aio.ServicerContext) -> Any:
        return await behavior(prepare(request), context)

    return call


def readable(handler: Any) -> Any:
    """`handler` (an RpcMethodHandler) whose requests that do not parse are refused as
    INVALID_ARGUMENT by its behavior, not made UNKNOWN by grpc."""
    return handler._replace(
        request_deserializer=_tolerant(handler.request_deserializer),
        unary_unary=_checked(handler.unary_unary, False),
        unary_stream=_checked(handler.unary_stream, False),
        stream_unary=_checked(handler.stream_unary, True),
        stream_stream=_checked(handler.stream_stream, True),
    )
