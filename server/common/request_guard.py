"""Unparseable request bytes are the caller's mistake: INVALID_ARGUMENT, not UNKNOWN.

grpcio parses the request before any servicer code runs; a DecodeError there
(truncated varints, invalid UTF-8 in a string field) surfaces as UNKNOWN with
the parser's exception text. This interceptor gives each handler a
deserializer that never raises: a bad message becomes a `Malformed` marker,
and the wrapped behaviour answers INVALID_ARGUMENT with a field-free BadRequest
(for a request stream, when the handler reads the bad message).

It wraps every kind of handler in the shape grpcio expects of it (see
server.common.handler_shapes): unary or streaming requests and responses, async
generators, coroutines that write through the context (grpc_health's Watch),
and sync functions. A wrapper of the wrong shape breaks the RPC for everyone.
"""

from __future__ import annotations

from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable, Iterable, Iterator
from typing import Any

import grpc
from google.protobuf.message import DecodeError

from server.common import errors
from server.common.grpc_errors import abort
from server.common.handler_shapes import Wrappers, abort_sync, rebuild


class Malformed:
    """Stands in for a request that could not be parsed."""

    def __init__(self, reason: str) -> None:
        self.reason = reason


def _malformed_error(request: Malformed) -> errors.InvalidArgument:
    return errors.InvalidArgument(
        [errors.FieldViolation("", f"the request could not be parsed: {request.reason}")]
    )


def _safe(deserializer: Callable[[bytes], Any] | None) -> Callable[[bytes], Any] | None:
    if deserializer is None:
        return None

    def parse(data: bytes) -> Any:
        try:
            return deserializer(data)
        except (DecodeError, UnicodeDecodeError, ValueError) as error:
            # Keep the reason short and generic: parser messages can echo type names, never data.
            kind = (
                "invalid UTF-8 in a string field" if "UTF-8" in str(error) else "not a valid protobuf message"
            )
            return Malformed(kind)

    return parse


async def _refuse(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> None:
    if isinstance(request, Malformed):
        await abort(context, _malformed_error(request))


def _refuse_sync(request: Any, context: grpc.ServicerContext) -> None:
    """The sync stack's context aborts with the same rich status (and raises)."""
    if isinstance(request, Malformed):
        abort_sync(context, _malformed_error(request))


async def _checked_stream(
    requests: AsyncIterable[Any], context: grpc.aio.ServicerContext[Any, Any]
) -> AsyncIterator[Any]:
    async for request in requests:
        await _refuse(request, context)
        yield request


def _checked_stream_sync(requests: Iterable[Any], context: grpc.ServicerContext) -> Iterator[Any]:
    for request in requests:
        _refuse_sync(request, context)
        yield request


async def _prepare_unary(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
    await _refuse(request, context)
    return request


async def _prepare_stream(requests: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
    return _checked_stream(requests, context)


def _prepare_unary_sync(request: Any, context: grpc.ServicerContext) -> Any:
    _refuse_sync(request, context)
    return request


def _prepare_stream_sync(requests: Any, context: grpc.ServicerContext) -> Any:
    return _checked_stream_sync(requests, context)


_GUARD = Wrappers(
    prepare_unary=_prepare_unary,
    prepare_stream=_prepare_stream,
    prepare_unary_sync=_prepare_unary_sync,
    prepare_stream_sync=_prepare_stream_sync,
)


class RequestGuard(grpc.aio.ServerInterceptor):  # type: ignore[type-arg]
    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Any, Any]]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any]:
        handler = await continuation(handler_call_details)
        if handler is None:
            return handler
        return rebuild(handler, _GUARD, request_deserializer=_safe(handler.request_deserializer))
