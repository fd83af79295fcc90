"""OpenTelemetry traces for the union and the banks: one lookup is one trace.

Off unless configured: a server given no tracer provider adds no interceptor, starts no span and
sends nothing, so tracing costs nothing it does not use. With a provider (OTLP when an endpoint
is configured; an in-memory exporter in tests):

- every gRPC server span comes from opentelemetry-instrumentation-grpc's grpc.aio interceptor,
  which reads the caller's W3C trace context from the call's metadata; a Connect or gRPC-Web call
  on the union's HTTP port gets the same span (`start_server_span`: same name, kind and
  attributes, parent from the request's `traceparent` header);
- the union's calls to the banks are client spans with the trace context in the metadata;
  queries that travel on a shared session stream carry it in the query itself
  (`QuerySessionRequest.trace_context`), so each bank query is a span of its own lookup's trace on
  both sides, not of whichever lookup happened to open the stream;
- the union's SQL statements are spans (opentelemetry-instrumentation-sqlalchemy on its engine),
  with the statement text only: bound values never become attributes.

Health checks are left out: every server answers several a second and they say nothing about a
request. No span attribute carries anything a person typed: gRPC spans name the method, the status
and the peer; SQL spans the statement with its placeholders.
"""

from __future__ import annotations

import contextvars
import functools
import inspect
import os
import socket
from collections.abc import Callable, Mapping, MutableMapping
from concurrent.futures import Executor, Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, ParamSpec, TypeVar

import grpc
from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.instrumentation.grpc import aio_client_interceptors, aio_server_interceptor
from opentelemetry.instrumentation.grpc.filters import health_check, negate
from opentelemetry.metrics import NoOpMeterProvider
from opentelemetry.sdk.resources import SERVICE_INSTANCE_ID, SERVICE_NAME, Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased
from opentelemetry.trace import Span, SpanKind, Status, StatusCode, Tracer
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
from sqlalchemy.engine import Engine

INSTRUMENTATION_NAME = "cardlookup"
_PROPAGATOR = TraceContextTextMapPropagator()
P = ParamSpec("P")
R = TypeVar("R")


@dataclass(frozen=True)
class TracingConfig:
    """Where spans go. An empty `otlp_endpoint` means no tracing at all."""

    otlp_endpoint: str = ""  # e.g. http://127.0.0.1:4317 (OTLP over gRPC)
    insecure: bool = True  # plaintext to the collector (a local agent); False: TLS
    sample_ratio: float = 1.0  # of new traces; a call that arrives traced follows its caller
    service_name: str = ""


def otlp_tracer_provider(config: TracingConfig) -> TracerProvider | None:
    """A provider that batches spans to the configured OTLP endpoint, or None when it is off."""
    if not config.otlp_endpoint:
        return None
    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

    instance = f"{socket.gethostname()}-{os.getpid()}"  # one process: replicas share a service name
    provider = TracerProvider(
        resource=Resource.create({SERVICE_NAME: config.service_name, SERVICE_INSTANCE_ID: instance}),
        sampler=ParentBased(TraceIdRatioBased(config.sample_ratio)),
    )
    provider.add_span_processor(
        BatchSpanProcessor(OTLPSpanExporter(endpoint=config.otlp_endpoint, insecure=config.insecure))
    )
    return provider


def shutdown(provider: trace.TracerProvider | None) -> None:
    """Send what is batched and stop (at process end)."""
    if isinstance(provider, TracerProvider):
        provider.shutdown()


def tracer(provider: trace.TracerProvider | None) -> Tracer | None:
    return trace.get_tracer(INSTRUMENTATION_NAME, tracer_provider=provider) if provider else None


def server_interceptors(provider: trace.TracerProvider | None) -> list[Any]:
    """The grpc.aio server interceptor (a span per call, parent from the metadata), or none."""
    if provider is None:
        return []
    return [aio_server_interceptor(tracer_provider=provider, filter_=negate(health_check()))]  # type: ignore[no-untyped-call]


def client_interceptors(provider: trace.TracerProvider | None) -> list[Any]:
    """The grpc.aio channel interceptors (a span per call, trace context into the metadata), or none."""
    if provider is None:
        return []
    interceptors: list[Any] = aio_client_interceptors(  # type: ignore[no-untyped-call]
        tracer_provider=provider, filter_=negate(health_check())
    )
    return interceptors


def _in_a_trace() -> bool:
    return trace.get_current_span().get_span_context().is_valid


class _ChildSpansOnly:
    """A tracer that starts spans only inside a trace: the orchestrator's polling (several
    statements a second, with no request behind them) would otherwise be a trace per statement."""

    def __init__(self, tracer_: Tracer) -> None:
        self._tracer = tracer_

    def start_span(self, name: str, *args: Any, **kwargs: Any) -> Span:
        if not _in_a_trace():
            return trace.INVALID_SPAN
        return self._tracer.start_span(name, *args, **kwargs)


def trace_engine(engine: Engine, provider: trace.TracerProvider | None) -> None:
    """A span per SQL statement on `engine` (this engine only, not every engine the process makes),
    with the statement text and its placeholders, never the bound values (no SQL commenter
    either), for statements run inside a trace."""
    if provider is None:
        return
    from opentelemetry.instrumentation.sqlalchemy.engine import EngineTracer

    connections = (
        NoOpMeterProvider()
        .get_meter(INSTRUMENTATION_NAME)
        .create_up_down_counter("db.client.connections.usage")
    )
    sql_tracer = trace.get_tracer("opentelemetry.instrumentation.sqlalchemy", tracer_provider=provider)
    EngineTracer(  # type: ignore[no-untyped-call]
        _ChildSpansOnly(sql_tracer), engine, connections, enable_commenter=False
    )


class ContextExecutor(Executor):
    """Runs work in `pool` in the context of the code that submitted it (as asyncio.to_thread
    does, and loop.run_in_executor does not), so a statement run for a request is in its trace."""

    def __init__(self, pool: ThreadPoolExecutor) -> None:
        self._pool = pool

    def submit(self, fn: Callable[P, R], /, *args: P.args, **kwargs: P.kwargs) -> Future[R]:
        return self._pool.submit(contextvars.copy_context().run, functools.partial(fn, *args, **kwargs))

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        self._pool.shutdown(wait, cancel_futures=cancel_futures)


class TracedCalls:
    """`target` with a span around each of its public coroutine methods, inside a trace only:
    "db.record_answer" covers what the lookup waited for, batching and thread hop included."""

    def __init__(self, target: Any, tracer_: Tracer, prefix: str) -> None:
        self._target = target
        self._tracer = tracer_
        self._prefix = prefix
        self._wrapped: dict[str, Any] = {}

    def __getattr__(self, name: str) -> Any:
        value = getattr(self._target, name)
        if name.startswith("_") or not inspect.iscoroutinefunction(value):
            return value
        wrapped = self._wrapped.get(name)
        if wrapped is None:
            wrapped = self._wrapped[name] = self._traced(value, f"{self._prefix}.{name}")
        return wrapped

    def _traced(self, method: Callable[..., Any], span_name: str) -> Callable[..., Any]:
        tracer_ = self._tracer

        @functools.wraps(method)
        async def traced(*args: Any, **kwargs: Any) -> Any:
            if not _in_a_trace():
                return await method(*args, **kwargs)
            with tracer_.start_as_current_span(span_name, kind=SpanKind.INTERNAL):
                return await method(*args, **kwargs)

        return traced


def inject(carrier: MutableMapping[str, str]) -> None:
    """Put the current span's W3C trace context into `carrier` (nothing when there is no span)."""
    _PROPAGATOR.inject(carrier)


def start_child(
    tracer_: Tracer, name: str, carrier: Mapping[str, str], kind: SpanKind, attributes: Mapping[str, str]
) -> Span:
    """A span whose parent is the trace context in `carrier`, or the current span without one."""
    parent = _PROPAGATOR.extract(carrier) if carrier else None
    return tracer_.start_span(name, context=parent, kind=kind, attributes=attributes)


# What the gRPC instrumentation marks as an error on a server span: the server's failures. A code
# the caller earned (INVALID_ARGUMENT, UNAUTHENTICATED...) leaves the status unset, as there.
SERVER_FAULTS = frozenset(
    {"UNKNOWN", "DEADLINE_EXCEEDED", "UNIMPLEMENTED", "INTERNAL", "UNAVAILABLE", "DATA_LOSS"}
)


def start_server_span(
    tracer_: Tracer, full_method: str, carrier: Mapping[str, str], peer: tuple[str, int] | None
) -> Span:
    """A server span for a call that did not come over gRPC, as the grpc.aio instrumentation makes
    one (name '/pkg.Service/Method', its rpc.* and net.peer.* attributes, but no user agent),
    continuing the W3C trace context in `carrier` (a new trace without one)."""
    service, _, method = full_method.lstrip("/").partition("/")
    attributes: dict[str, str | int] = {
        "rpc.system": "grpc",
        "rpc.service": service,
        "rpc.method": method,
        "rpc.grpc.status_code": 0,
    }
    if peer is not None:
        attributes["net.peer.ip"], attributes["net.peer.port"] = peer[0], str(peer[1])
        if peer[0] in ("127.0.0.1", "::1"):
            attributes["net.peer.name"] = "localhost"
    parent = _PROPAGATOR.extract(carrier)
    return tracer_.start_span(full_method, context=parent, kind=SpanKind.SERVER, attributes=attributes)


def end_server_span(span: Span, code: grpc.StatusCode) -> None:
    """The status the call ended with, recorded as the gRPC instrumentation records it (the code's
    number; an error status for the server's faults, named by the code only, no message)."""
    span.set_attribute("rpc.grpc.status_code", code.value[0])
    if code.name in SERVER_FAULTS:
        span.set_status(Status(StatusCode.ERROR, str(code)))
    span.end()


def end_failed(span: Span, reason: str) -> None:
    span.set_status(Status(StatusCode.ERROR, reason))
    span.end()


class Detached:
    """Code run inside is in no trace: a long-lived stream opened while one lookup's query runs
    must not become part of that lookup's trace."""

    def __enter__(self) -> None:
        self._token = otel_context.attach(otel_context.Context())

    def __exit__(self, *_: object) -> None:
        otel_context.detach(self._token)
