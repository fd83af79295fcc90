"""Every call a server answers: counted and timed by method and status code, and one access line.

One interceptor, the first a server runs (see `GrpcServer(observers=...)`), so it also sees the
calls that later ones refuse (unparseable requests, admission control). For each call it records
`cardlookup_rpc_duration_seconds{server, grpc_service, grpc_method, grpc_code}` (the histogram's
`_count` is the number of calls) and logs one line on the `cardlookup.access` logger: server,
method, status code, duration in milliseconds and the peer's address. Nothing else about the call
is read: no request field, no metadata, so no person can reach a metric or an access line.

The method is a registered one (a handler was found for it); a call to anything else is counted
and logged as `unregistered`, since its path is whatever the caller typed. Health checks and
reflection are logged at DEBUG: load balancers and the union's bank health watch ask several times
a second, and their lines would drown the others.

The union's Connect and gRPC-Web calls (server/union/api/connect.py) are recorded through the same
`RpcObserver.finished`, with the same labels, plus a `protocol` field on their access line.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
from prometheus_client import CollectorRegistry, Histogram

access_log = logging.getLogger("cardlookup.access")

UNREGISTERED = "unregistered"
QUIET_PREFIXES = ("/grpc.health.", "/grpc.reflection.")
# Seconds. Unary calls take milliseconds; server streams (WatchLookup, the banks' query sessions)
# last as long as somebody follows them, up to hours.
RPC_BUCKETS = (
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
    300.0,
    3600.0,
)

Behaviour = Callable[..., Any]


class RpcMetrics:
    """The per-call histogram in one process's registry; one interceptor per server names it."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self._seconds = Histogram(
            "cardlookup_rpc_duration_seconds",
            "Calls this process answered, by server (union or bank code), method and status code, "
            "and how long each took (for a stream: until it ended).",
            ["server", "grpc_service", "grpc_method", "grpc_code"],
            buckets=RPC_BUCKETS,
            registry=registry,
        )
        # labels() takes a lock and builds a key on every call; methods and codes are few.
        self._children: dict[tuple[str, str, str, str], Any] = {}

    def observe(self, server: str, service: str, method: str, code: str, seconds: float) -> None:
        key = (server, service, method, code)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = self._seconds.labels(*key)
        child.observe(seconds)


def _split(full_method: str) -> tuple[str, str]:
    """'/pkg.Service/Method' → ('pkg.Service', 'Method')."""
    service, _, method = full_method.lstrip("/").rpartition("/")
    return service, method


def _code_of(
    context: grpc.aio.ServicerContext[Any, Any], error: BaseException | None, deadline: float | None
) -> str:
    """The status the caller sees, from how the handler ended."""
    if isinstance(error, asyncio.CancelledError | GeneratorExit):
        # grpc.aio cancels the handler both when the caller gives up and when its deadline passes.
        # The call may be gone by now: asking the context anything could crash grpcio's core.
        return (
            "DEADLINE_EXCEEDED" if deadline is not None and time.perf_counter() >= deadline else "CANCELLED"
        )
    code = context.code()  # set by abort() or set_code(); None when the handler just returned
    if code is not None:
        return str(code.name)
    return "OK" if error is None else "UNKNOWN"


def peer_of(host: str, port: int) -> str:
    """An HTTP client's address spelled as grpc.aio spells a peer, so access lines read alike."""
    return f"ipv6:[{host}]:{port}" if ":" in host else f"ipv4:{host}:{port}"


def _call_facts(context: grpc.aio.ServicerContext[Any, Any]) -> tuple[str, float | None]:
    """The peer and the deadline (on the perf_counter clock), read while the call is surely alive."""
    remaining = context.time_remaining()
    deadline = time.perf_counter() + remaining if remaining is not None else None
    return str(context.peer()), deadline


class RpcObserver(grpc.aio.ServerInterceptor):  # type: ignore[type-arg]
    """Times, counts and logs every call one server answers; `server` names it in both."""

    def __init__(self, server: str, metrics: RpcMetrics | None = None) -> None:
        self.server = server
        self.metrics = metrics

    def finished(
        self,
        full_method: str,
        code: str,
        started: float,
        peer: str,
        quiet: bool = False,
        protocol: str | None = None,
    ) -> None:
        """One call ended: `code` is the gRPC status code's name, `started` its perf_counter start.
        `protocol` names the HTTP protocol (connect, grpc-web) of a call that did not come over gRPC."""
        seconds = time.perf_counter() - started
        if self.metrics is not None:
            service, method = (
                _split(full_method) if full_method != UNREGISTERED else (UNREGISTERED, UNREGISTERED)
            )
            self.metrics.observe(self.server, service, method, code, seconds)
        fields: dict[str, Any] = {
            "server": self.server,
            "method": full_method,
            "code": code,
            "duration_ms": round(seconds * 1000, 3),
            "peer": peer,
        }
        if protocol is not None:
            fields["protocol"] = protocol
        access_log.log(logging.DEBUG if quiet else logging.INFO, "rpc", extra=fields)

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Any, Any]]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any]:
        started = time.perf_counter()
        handler = await continuation(handler_call_details)
        if handler is None:
            # grpcio answers UNIMPLEMENTED itself; the path the caller sent is not repeated anywhere.
            self.finished(UNREGISTERED, "UNIMPLEMENTED", started, peer="")
            return handler
        method: str = handler_call_details.method
        quiet = method.startswith(QUIET_PREFIXES)
        if handler.unary_unary is not None:
            return grpc.unary_unary_rpc_method_handler(
                self._observed(method, quiet, handler.unary_unary),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        if handler.unary_stream is not None:
            return grpc.unary_stream_rpc_method_handler(
                self._observed(method, quiet, handler.unary_stream),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        if handler.stream_unary is not None:
            return grpc.stream_unary_rpc_method_handler(
                self._observed(method, quiet, handler.stream_unary),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        if handler.stream_stream is not None:
            return grpc.stream_stream_rpc_method_handler(
                self._observed(method, quiet, handler.stream_stream),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        return handler

    def _observed(self, method: str, quiet: bool, behaviour: Behaviour) -> Behaviour:
        """`behaviour` timed from its start to its end, however it ends. Async generators (the
        project's streams) stay async generators; coroutines stay coroutines."""
        if inspect.isasyncgenfunction(behaviour):

            async def observed_stream(
                request: Any, context: grpc.aio.ServicerContext[Any, Any]
            ) -> AsyncIterator[Any]:
                started = time.perf_counter()
                peer, deadline = _call_facts(context)
                error: BaseException | None = None
                try:
                    async for message in behaviour(request, context):
                        yield message
                except BaseException as raised:
                    error = raised
                    raise
                finally:
                    self.finished(method, _code_of(context, error, deadline), started, peer, quiet)

            return observed_stream

        async def observed(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
            started = time.perf_counter()
            peer, deadline = _call_facts(context)
            error: BaseException | None = None
            try:
                return await behaviour(request, context)
            except BaseException as raised:
                error = raised
                raise
            finally:
                self.finished(method, _code_of(context, error, deadline), started, peer, quiet)

        return observed
