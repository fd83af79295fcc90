"""Every streaming RPC of the union and of a bank, through each server's real interceptor chain.

grpc.health.v1.Health/Watch is a coroutine that writes through its context, not an async
generator; an interceptor that assumed the latter answered it UNKNOWN on every server. Here each
server's streaming methods are listed through reflection (itself a streaming RPC), so a new one
cannot be added without being called here; each is called and must answer as its contract says.
"""

from __future__ import annotations

import asyncio
import shutil
import uuid
from collections.abc import AsyncIterator
from datetime import timedelta
from pathlib import Path

import grpc
import pytest
from bankquery.v1 import bank_query_service_pb2 as bank_pb
from bankquery.v1 import bank_query_service_pb2_grpc as bank_grpc
from google.protobuf import descriptor_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from server.bank.bank_server import RunningBank, start_bank
from server.bank.faults import FaultSettings
from server.union.union_server import UnionServer
from tests.conftest import SEED, SIZE, ZHANG, UnionFactory, run_lookup, verified_client

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
HealthWatch = grpc.aio.UnaryStreamCall[health_pb2.HealthCheckRequest, health_pb2.HealthCheckResponse]


async def reflect(channel: grpc.aio.Channel) -> dict[str, tuple[bool, bool]]:
    """Every method the server lists: full name → (client streaming, server streaming)."""
    stub = reflection_pb2_grpc.ServerReflectionStub(channel)
    listed = [
        m
        async for m in stub.ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=10
        )
    ]
    services = [s.name for s in listed[0].list_services_response.service]
    asked = [reflection_pb2.ServerReflectionRequest(file_containing_symbol=name) for name in services]
    methods: dict[str, tuple[bool, bool]] = {}
    async for answer in stub.ServerReflectionInfo(iter(asked), timeout=10):
        for raw in answer.file_descriptor_response.file_descriptor_proto:
            file = descriptor_pb2.FileDescriptorProto.FromString(raw)
            for service in file.service:
                full = f"{file.package}.{service.name}" if file.package else service.name
                if full not in services:
                    continue
                for method in service.method:
                    methods[f"/{full}/{method.name}"] = (method.client_streaming, method.server_streaming)
    assert len(methods) > len(services)
    return methods


def streaming(methods: dict[str, tuple[bool, bool]]) -> set[str]:
    return {name for name, (client, server) in methods.items() if client or server}


async def next_status(call: HealthWatch) -> int:
    message = await asyncio.wait_for(call.read(), timeout=30)
    assert isinstance(message, health_pb2.HealthCheckResponse), f"Watch ended: {await call.code()}"
    return int(message.status)


async def watch_until(call: HealthWatch, wanted: int) -> None:
    """Read Watch's updates until `wanted` (the stream sends only changes)."""
    while await next_status(call) != wanted:
        pass


@pytest.fixture
def icbc_dir(seeded_banks_template: Path, tmp_path: Path) -> Path:
    for path in seeded_banks_template.glob("icbc.sqlite3*"):
        shutil.copy(path, tmp_path / path.name)
    return tmp_path


@pytest.fixture
async def bank(icbc_dir: Path) -> AsyncIterator[RunningBank]:
    running = await start_bank("ICBC", data_dir=icbc_dir, seed=SEED, size=SIZE)
    yield running
    await running.stop(0)


async def test_every_streaming_rpc_of_a_bank_answers_through_its_interceptors(bank: RunningBank) -> None:
    async with grpc.aio.insecure_channel(bank.address) as channel:
        methods = await reflect(channel)
        called: set[str] = set()

        watch = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(), timeout=30)
        assert await next_status(watch) == SERVING
        watch.cancel()
        called.add("/grpc.health.v1.Health/Watch")

        watch = health_pb2_grpc.HealthStub(channel).Watch(
            health_pb2.HealthCheckRequest(service="bankquery.v1.BankQueryService"), timeout=30
        )
        assert await next_status(watch) == SERVING
        watch.cancel()

        stub = bank_grpc.BankQueryServiceStub(channel)
        person = {"resident_id_number": ZHANG.resident_id_number, "name": ZHANG.name}
        messages = [
            m async for m in stub.QueryCards(bank_pb.QueryCardsRequest(query_id="q", **person), timeout=10)
        ]
        assert messages[-1].summary.record_count == len(messages) - 1 > 0
        called.add("/bankquery.v1.BankQueryService/QueryCards")

        session = [
            m
            async for m in stub.QuerySession(
                iter([bank_pb.QuerySessionRequest(query_id="s", **person)]), timeout=10
            )
        ]
        assert [a.answer.summary.record_count for a in session] == [len(messages) - 1]
        called.add("/bankquery.v1.BankQueryService/QuerySession")

        batches = [
            m
            async for m in stub.QueryBatchSession(
                iter(
                    [
                        bank_pb.QueryBatchSessionRequest(
                            queries=[bank_pb.QuerySessionRequest(query_id="b", **person)]
                        )
                    ]
                ),
                timeout=10,
            )
        ]
        assert [a.query_id for m in batches for a in m.answers] == ["b"]
        called.add("/bankquery.v1.BankQueryService/QueryBatchSession")

        called.add("/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo")  # reflect() above
        assert streaming(methods) == called


async def test_every_streaming_rpc_of_the_union_answers_through_its_interceptors(union: UnionServer) -> None:
    async with grpc.aio.insecure_channel(union.address) as channel:
        methods = await reflect(channel)
        called: set[str] = set()

        for service in ("", "cardlookup.v1.CardLookupService"):
            watch = health_pb2_grpc.HealthStub(channel).Watch(
                health_pb2.HealthCheckRequest(service=service), timeout=30
            )
            assert await next_status(watch) == SERVING
            watch.cancel()
        called.add("/grpc.health.v1.Health/Watch")

        client = await verified_client(union, ZHANG)
        events, report = await run_lookup(client, request_id=uuid.uuid4().hex)
        assert events[-1].report_ready
        assert report.total_card_count > 0
        called.add("/cardlookup.v1.CardLookupService/WatchLookup")

        called.add("/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo")  # reflect() above
        assert streaming(methods) == called


async def test_a_bank_in_outage_is_not_serving_until_it_recovers(bank: RunningBank) -> None:
    async with grpc.aio.insecure_channel(bank.address) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        whole = health.Watch(health_pb2.HealthCheckRequest(), timeout=60)
        service = health.Watch(
            health_pb2.HealthCheckRequest(service="bankquery.v1.BankQueryService"), timeout=60
        )
        assert await next_status(whole) == SERVING
        assert await next_status(service) == SERVING

        bank.servicer.faults = FaultSettings(outage=True)
        await watch_until(whole, NOT_SERVING)
        await watch_until(service, NOT_SERVING)
        checked = await health.Check(health_pb2.HealthCheckRequest(), timeout=5)
        assert checked.status == NOT_SERVING

        bank.servicer.faults = FaultSettings()
        await watch_until(whole, SERVING)
        await watch_until(service, SERVING)
        whole.cancel()
        service.cancel()


async def test_a_bank_that_starts_in_outage_is_never_serving(
    icbc_dir: Path,
) -> None:
    bank = await start_bank(
        "ICBC", data_dir=icbc_dir, seed=SEED, size=SIZE, faults=FaultSettings(outage=True)
    )
    try:
        async with grpc.aio.insecure_channel(bank.address) as channel:
            checked = await health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(), timeout=5
            )
            assert checked.status == NOT_SERVING
    finally:
        await bank.stop(0)


async def test_the_union_watches_a_bank_go_down_and_come_back(
    make_union: UnionFactory, banks: dict[str, RunningBank]
) -> None:
    union = await make_union(health_interval=timedelta(milliseconds=100))
    async with grpc.aio.insecure_channel(union.address) as channel:
        watch = health_pb2_grpc.HealthStub(channel).Watch(
            health_pb2.HealthCheckRequest(service="bank/ICBC"), timeout=60
        )
        await watch_until(watch, SERVING)
        banks["ICBC"].servicer.faults = FaultSettings(outage=True)
        await watch_until(watch, NOT_SERVING)
        banks["ICBC"].servicer.faults = FaultSettings()
        await watch_until(watch, SERVING)
        watch.cancel()
