"""Rebuild a gRPC method handler around its behaviour, in the shape grpcio expects of it.

A grpc.aio server runs a behaviour according to what it is: a coroutine
function (unary response; or, for a streaming response, a handler that writes
through `context.write`, as grpc_health's Watch does), an async generator
function (a streaming response it yields), or a plain function (the sync stack,
run in the server's thread pool, returning a response or an iterator). A server
interceptor that wraps a behaviour must keep that shape: an async generator
around a coroutine breaks the call with UNKNOWN ("'async for' requires an object
with __aiter__ method, got coroutine"), and a coroutine around a sync function
never runs it.

`rebuild` covers all four RPC kinds (unary/streaming request x response) and all
three shapes; an interceptor supplies what runs before the behaviour (`prepare_*`:
check or replace the request, or the request iterator) and around it (`guard`:
a context manager entered for the whole call, response stream included).
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import AbstractAsyncContextManager, AbstractContextManager
from dataclasses import dataclass
from typing import Any

import grpc
from grpc_status import rpc_status

from server.common import errors
from server.common.grpc_errors import to_status

AsyncContext = grpc.aio.ServicerContext[Any, Any]
Prepare = Callable[[Any, AsyncContext], Awaitable[Any]]
PrepareSync = Callable[[Any, grpc.ServicerContext], Any]
Guard = Callable[[AsyncContext, bool], AbstractAsyncContextManager[None]]
GuardSync = Callable[[grpc.ServicerContext, bool], AbstractContextManager[None]]


def abort_sync(context: grpc.ServicerContext, error: errors.DomainError) -> None:
    """server.common.grpc_errors.abort for a sync behaviour's context (raises).

    grpc.aio hands sync behaviours a context whose abort takes the trailing metadata that
    carries the rich details (it has no abort_with_status)."""
    status = rpc_status.to_status(to_status(error))
    aborting: Any = context.abort
    aborting(status.code, status.details, status.trailing_metadata)


async def _as_is(request: Any, context: AsyncContext) -> Any:
    return request


def _as_is_sync(request: Any, context: grpc.ServicerContext) -> Any:
    return request


def _no_guard(context: Any, response_streaming: bool) -> Any:
    return contextlib.nullcontext()


@dataclass(frozen=True)
class Wrappers:
    """What an interceptor adds to a behaviour. `guard` gets whether the response is a stream."""

    prepare_unary: Prepare = _as_is
    prepare_stream: Prepare = _as_is
    prepare_unary_sync: PrepareSync = _as_is_sync
    prepare_stream_sync: PrepareSync = _as_is_sync
    guard: Guard = _no_guard
    guard_sync: GuardSync = _no_guard


def is_async(behaviour: Callable[..., Any]) -> bool:
    """grpc.aio's own test: anything else is a sync behaviour, run in the thread pool."""
    return inspect.iscoroutinefunction(behaviour) or inspect.isasyncgenfunction(behaviour)


def _wrap_async(
    behaviour: Callable[..., Any], request_streaming: bool, response_streaming: bool, wrappers: Wrappers
) -> Callable[..., Any]:
    prepare = wrappers.prepare_stream if request_streaming else wrappers.prepare_unary
    guard = wrappers.guard
    if not response_streaming:

        async def unary(request: Any, context: AsyncContext) -> Any:
            async with guard(context, False):
                return await behaviour(await prepare(request, context), context)

        return unary
    if inspect.isasyncgenfunction(behaviour):

        async def yielding(request: Any, context: AsyncContext) -> AsyncIterator[Any]:
            async with guard(context, True):
                async for message in behaviour(await prepare(request, context), context):
                    yield message

        return yielding

    async def writing(request: Any, context: AsyncContext) -> None:
        # A streaming handler that writes through the context and returns None.
        async with guard(context, True):
            await behaviour(await prepare(request, context), context)

    return writing


def _wrap_sync(
    behaviour: Callable[..., Any], request_streaming: bool, response_streaming: bool, wrappers: Wrappers
) -> Callable[..., Any]:
    prepare = wrappers.prepare_stream_sync if request_streaming else wrappers.prepare_unary_sync
    guard = wrappers.guard_sync
    if not response_streaming:

        def unary(request: Any, context: grpc.ServicerContext) -> Any:
            with guard(context, False):
                return behaviour(prepare(request, context), context)

        return unary

    def yielding(request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
        with guard(context, True):
            yield from behaviour(prepare(request, context), context)

    return yielding


def wrap(
    behaviour: Callable[..., Any], request_streaming: bool, response_streaming: bool, wrappers: Wrappers
) -> Callable[..., Any]:
    """`behaviour` with `wrappers` added, in its own shape."""
    if is_async(behaviour):
        return _wrap_async(behaviour, request_streaming, response_streaming, wrappers)
    return _wrap_sync(behaviour, request_streaming, response_streaming, wrappers)


def rebuild(
    handler: grpc.RpcMethodHandler[Any, Any],
    wrappers: Wrappers,
    request_deserializer: Callable[[bytes], Any] | None = None,
) -> grpc.RpcMethodHandler[Any, Any]:
    """The same method handler with its behaviour wrapped (and, if given, another deserializer)."""
    deserializer = request_deserializer or handler.request_deserializer
    serializer = handler.response_serializer
    if handler.unary_unary is not None:
        return grpc.unary_unary_rpc_method_handler(
            wrap(handler.unary_unary, False, False, wrappers), deserializer, serializer
        )
    if handler.unary_stream is not None:
        return grpc.unary_stream_rpc_method_handler(
            wrap(handler.unary_stream, False, True, wrappers), deserializer, serializer
        )
    if handler.stream_unary is not None:
        return grpc.stream_unary_rpc_method_handler(
            wrap(handler.stream_unary, True, False, wrappers), deserializer, serializer
        )
    if handler.stream_stream is not None:
        return grpc.stream_stream_rpc_method_handler(
            wrap(handler.stream_stream, True, True, wrappers), deserializer, serializer
        )
    return handler
