"""The project's interceptors (request guard, admission control) keep every handler working.

grpcio runs a behaviour by its shape: coroutine, async generator, coroutine writing through the
context, or a sync function in the thread pool; and by its kind (unary or streaming request and
response). An interceptor that rebuilds a handler in the wrong shape breaks that RPC (as the
guard once broke grpc.health's Watch). Here one behaviour of every kind and shape runs behind the
same interceptor chain as the real servers, with a good request, a malformed one, and no room.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterable, Iterator
from typing import Any

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_health.v1.health_pb2 import HealthCheckRequest as Request
from grpc_health.v1.health_pb2 import HealthCheckResponse as Response
from grpc_status import rpc_status

from server.common.admission import AdmissionControl
from server.common.grpc_runtime import GrpcServer

SERVICE = "test.Shapes"
GOOD = Request(service="ok").SerializeToString()
# Field 1 (a string) holding bytes that are not UTF-8: grpcio's parser raises on it.
MALFORMED = b"\x0a\x02\xff\xfe"


def answer(count: int) -> Response:
    return Response(status=Response.SERVING if count else Response.UNKNOWN)


async def unary_async(request: Request, context: Any) -> Response:
    return answer(1)


def unary_sync(request: Request, context: Any) -> Response:
    return answer(1)


async def server_stream_generator(request: Request, context: Any) -> AsyncIterator[Response]:
    yield answer(1)
    yield answer(1)


async def server_stream_writer(request: Request, context: Any) -> None:
    await context.write(answer(1))
    await context.write(answer(1))


def server_stream_sync(request: Request, context: Any) -> Iterator[Response]:
    yield answer(1)
    yield answer(1)


async def client_stream_async(requests: AsyncIterator[Request], context: Any) -> Response:
    return answer(len([r async for r in requests]))


def client_stream_sync(requests: Iterable[Request], context: Any) -> Response:
    return answer(len(list(requests)))


async def bidi_generator(requests: AsyncIterator[Request], context: Any) -> AsyncIterator[Response]:
    async for _ in requests:
        yield answer(1)


async def bidi_writer(requests: AsyncIterator[Request], context: Any) -> None:
    async for _ in requests:
        await context.write(answer(1))


def bidi_sync(requests: Iterable[Request], context: Any) -> Iterator[Response]:
    for _ in requests:
        yield answer(1)


HANDLERS: dict[str, grpc.RpcMethodHandler[Any, Any]] = {
    "UnaryAsync": grpc.unary_unary_rpc_method_handler(
        unary_async, Request.FromString, Response.SerializeToString
    ),
    "UnarySync": grpc.unary_unary_rpc_method_handler(
        unary_sync, Request.FromString, Response.SerializeToString
    ),
    "ServerStreamGenerator": grpc.unary_stream_rpc_method_handler(
        server_stream_generator, Request.FromString, Response.SerializeToString
    ),
    "ServerStreamWriter": grpc.unary_stream_rpc_method_handler(
        server_stream_writer, Request.FromString, Response.SerializeToString
    ),
    "ServerStreamSync": grpc.unary_stream_rpc_method_handler(
        server_stream_sync, Request.FromString, Response.SerializeToString
    ),
    "ClientStreamAsync": grpc.stream_unary_rpc_method_handler(
        client_stream_async, Request.FromString, Response.SerializeToString
    ),
    "ClientStreamSync": grpc.stream_unary_rpc_method_handler(
        client_stream_sync, Request.FromString, Response.SerializeToString
    ),
    "BidiGenerator": grpc.stream_stream_rpc_method_handler(
        bidi_generator, Request.FromString, Response.SerializeToString
    ),
    "BidiWriter": grpc.stream_stream_rpc_method_handler(
        bidi_writer, Request.FromString, Response.SerializeToString
    ),
    "BidiSync": grpc.stream_stream_rpc_method_handler(
        bidi_sync, Request.FromString, Response.SerializeToString
    ),
}


async def start(admission: AdmissionControl) -> GrpcServer:
    def register(server: grpc.aio.Server) -> None:
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, HANDLERS),))

    server = GrpcServer("127.0.0.1:0", [SERVICE], register, interceptors=[admission])
    await server.start()
    return server


async def call(
    channel: grpc.aio.Channel, method: str, payloads: list[bytes], close: bool = True
) -> list[Response]:
    """Send `payloads` (only the first to a unary request) and collect every response.

    A request stream is written with nothing in flight when the server may end the call: a
    client write that fails because the call has just ended makes grpc.aio report INTERNAL in
    place of the server's status (grpc/grpc#36066). So an unanswered stream is not half-closed."""
    path = f"/{SERVICE}/{method}"
    handler = HANDLERS[method]
    options: dict[str, Any] = {"response_deserializer": Response.FromString}
    if handler.unary_unary is not None:
        return [await channel.unary_unary(path, **options)(payloads[0], timeout=10)]
    if handler.unary_stream is not None:
        return [m async for m in channel.unary_stream(path, **options)(payloads[0], timeout=10)]
    multi: Any = (
        channel.stream_unary(path, **options)
        if handler.stream_unary is not None
        else channel.stream_stream(path, **options)
    )
    streaming = multi(timeout=10)  # no request iterator: written below
    for payload in payloads:
        await streaming.write(payload)
    if close:
        await streaming.done_writing()
    if handler.stream_unary is not None:
        return [await streaming]
    return [m async for m in streaming]


@pytest.fixture
async def server() -> AsyncIterator[GrpcServer]:
    running = await start(AdmissionControl(max_unary=10, max_streams=10))
    yield running
    await running.stop(0)


@pytest.mark.parametrize("method", sorted(HANDLERS))
async def test_every_kind_and_shape_answers_through_the_interceptors(server: GrpcServer, method: str) -> None:
    async with grpc.aio.insecure_channel(server.address) as channel:
        responses = await call(channel, method, [GOOD, GOOD])
    assert all(r.status == Response.SERVING for r in responses)
    streams_back = "Bidi" in method or method.startswith("ServerStream")
    assert len(responses) == (2 if streams_back else 1)


@pytest.mark.parametrize("method", sorted(HANDLERS))
async def test_a_malformed_request_is_invalid_argument_in_every_kind_and_shape(
    server: GrpcServer, method: str
) -> None:
    async with grpc.aio.insecure_channel(server.address) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await call(channel, method, [MALFORMED], close=False)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    status = rpc_status.from_call(caught.value)  # type: ignore[arg-type]
    assert status is not None
    bad_request = error_details_pb2.BadRequest()
    assert status.details[0].Unpack(bad_request)
    assert "could not be parsed" in bad_request.field_violations[0].description


@pytest.mark.parametrize("method", sorted(HANDLERS))
async def test_a_full_server_refuses_every_kind_and_shape_with_resource_exhausted(method: str) -> None:
    admission = AdmissionControl(max_unary=0, max_streams=0)
    server = await start(admission)
    # A request stream sends nothing: the refusal comes before any read.
    payloads = [] if "Client" in method or "Bidi" in method else [GOOD]
    try:
        async with grpc.aio.insecure_channel(server.address) as channel:
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await call(channel, method, payloads, close=False)
    finally:
        await server.stop(0)
    assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert admission.refused == 1
    assert (admission.unary_in_progress, admission.streams_in_progress) == (0, 0)
