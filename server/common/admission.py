"""Admission control: a bounded number of calls in progress, and a fast, explicit "no" beyond it.

Under overload a server that queues everything gets slower for everyone and
its memory grows without bound. This interceptor keeps two counters — unary
calls and server streams in progress — and answers RESOURCE_EXHAUSTED with
RetryInfo as soon as either is full, so clients back off and the calls already
admitted finish at normal speed. Health checks and reflection are never
refused: load balancers must see a busy server as alive.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import timedelta
from typing import Any

import grpc

from server.common import errors
from server.common.grpc_errors import abort

EXEMPT_PREFIXES = ("/grpc.health.", "/grpc.reflection.")


class AdmissionControl(grpc.aio.ServerInterceptor):  # type: ignore[type-arg]
    def __init__(
        self, max_unary: int, max_streams: int, retry_after: timedelta = timedelta(seconds=1)
    ) -> None:
        self.max_unary = max_unary
        self.max_streams = max_streams
        self.retry_after = retry_after
        self.unary_in_progress = 0
        self.streams_in_progress = 0
        self.refused = 0

    def _refusal(self, what: str) -> errors.ResourceExhausted:
        self.refused += 1
        return errors.ResourceExhausted(
            f"the server is at capacity ({what}); retry shortly",
            reason="SERVER_BUSY",
            retry_after=self.retry_after,
        )

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Any, Any]]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any]:
        handler = await continuation(handler_call_details)
        method: str = handler_call_details.method
        if handler is None or method.startswith(EXEMPT_PREFIXES):
            return handler
        if handler.unary_unary is not None:
            return grpc.unary_unary_rpc_method_handler(
                self._admit_unary(handler.unary_unary),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        if handler.unary_stream is not None:
            return grpc.unary_stream_rpc_method_handler(
                self._admit_stream(handler.unary_stream),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        return handler

    def _admit_unary(self, behaviour: Callable[..., Any]) -> Callable[..., Awaitable[Any]]:
        async def admitted(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
            if self.unary_in_progress >= self.max_unary:
                await abort(context, self._refusal("calls"))
            self.unary_in_progress += 1
            try:
                return await behaviour(request, context)
            finally:
                self.unary_in_progress -= 1

        return admitted

    def _admit_stream(self, behaviour: Callable[..., Any]) -> Callable[..., AsyncIterator[Any]]:
        async def admitted(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> AsyncIterator[Any]:
            if self.streams_in_progress >= self.max_streams:
                await abort(context, self._refusal("streams"))
            self.streams_in_progress += 1
            try:
                async for message in behaviour(request, context):
                    yield message
            finally:
                self.streams_in_progress -= 1

        return admitted
