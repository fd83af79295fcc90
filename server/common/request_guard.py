"""Unparseable request bytes are the caller's mistake: INVALID_ARGUMENT, not UNKNOWN.

grpcio parses the request before any servicer code runs; a DecodeError there
(truncated varints, invalid UTF-8 in a string field) surfaces as UNKNOWN with
the parser's exception text. This interceptor gives each handler a
deserializer that never raises: a bad message becomes a `Malformed` marker,
and the wrapped behaviour answers INVALID_ARGUMENT with a field-free BadRequest.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
from google.protobuf.message import DecodeError

from server.common import errors
from server.common.grpc_errors import abort


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


class RequestGuard(grpc.aio.ServerInterceptor):  # type: ignore[type-arg]
    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Any, Any]]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any]:
        handler = await continuation(handler_call_details)
        if handler is None:
            return handler
        if handler.unary_unary is not None:
            unary: Any = handler.unary_unary

            async def guarded_unary(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
                if isinstance(request, Malformed):
                    await abort(context, _malformed_error(request))
                return await unary(request, context)

            return grpc.unary_unary_rpc_method_handler(
                guarded_unary,
                request_deserializer=_safe(handler.request_deserializer),
                response_serializer=handler.response_serializer,
            )
        if handler.unary_stream is not None:
            stream: Any = handler.unary_stream  # an async generator function under grpc.aio

            async def guarded_stream(
                request: Any, context: grpc.aio.ServicerContext[Any, Any]
            ) -> AsyncIterator[Any]:
                if isinstance(request, Malformed):
                    await abort(context, _malformed_error(request))
                async for message in stream(request, context):
                    yield message

            return grpc.unary_stream_rpc_method_handler(
                guarded_stream,
                request_deserializer=_safe(handler.request_deserializer),
                response_serializer=handler.response_serializer,
            )
        return handler
