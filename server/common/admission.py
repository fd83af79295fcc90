"""Admission control: a bounded number of calls in progress, and a fast, explicit "no" beyond it.

Under overload a server that queues everything gets slower for everyone and
its memory grows without bound. This interceptor keeps two counters — unary
calls and server streams in progress — and answers RESOURCE_EXHAUSTED with
RetryInfo as soon as either is full, so clients back off and the calls already
admitted finish at normal speed. Health checks and reflection are never
refused: load balancers must see a busy server as alive.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from datetime import timedelta
from typing import Any

import grpc

from server.common import errors
from server.common.grpc_errors import abort
from server.common.handler_shapes import Wrappers, abort_sync, rebuild

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
        # Sync behaviours run in the server's thread pool; async ones on the loop, one at a time.
        self._lock = threading.Lock()
        self._wrappers = Wrappers(guard=self.admitted, guard_sync=self._admitted_sync)

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
        # Every kind and shape of handler: a call with a streaming response counts as a stream.
        return rebuild(handler, self._wrappers)

    def _take(self, streaming: bool) -> errors.ResourceExhausted | None:
        """One place, or the refusal; one decision under the lock."""
        with self._lock:
            if streaming:
                if self.streams_in_progress >= self.max_streams:
                    return self._refusal("streams")
                self.streams_in_progress += 1
            else:
                if self.unary_in_progress >= self.max_unary:
                    return self._refusal("calls")
                self.unary_in_progress += 1
            return None

    def _give_back(self, streaming: bool) -> None:
        with self._lock:
            if streaming:
                self.streams_in_progress -= 1
            else:
                self.unary_in_progress -= 1

    @contextlib.asynccontextmanager
    async def admitted(self, context: Any, streaming: bool) -> AsyncIterator[None]:
        """Hold one place for a call (any context with grpc.aio's `abort`: gRPC, or the union's
        Connect adapter), or abort it with RESOURCE_EXHAUSTED."""
        refusal = self._take(streaming)
        if refusal is not None:
            await abort(context, refusal)
        try:
            yield
        finally:
            self._give_back(streaming)

    @contextlib.contextmanager
    def _admitted_sync(self, context: grpc.ServicerContext, streaming: bool) -> Iterator[None]:
        refusal = self._take(streaming)
        if refusal is not None:
            abort_sync(context, refusal)
        try:
            yield
        finally:
            self._give_back(streaming)
