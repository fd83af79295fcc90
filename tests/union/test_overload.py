"""Overload and cancellation: excess calls get a fast RESOURCE_EXHAUSTED with RetryInfo, never
UNKNOWN; nothing leaks when clients give up; the server serves normally afterwards."""

from __future__ import annotations

import asyncio
import resource

import grpc
import pytest
from cardlookup.v1 import card_lookup_service_pb2 as pb
from cardlookup.v1 import card_lookup_service_pb2_grpc as pb_grpc

from clients.client import TERMS_VERSION, CardLookupError
from server.union.union_server import UnionServer
from tests.conftest import ZHANG, UnionFactory, run_lookup, verified_client

NORMAL_WATCHES = 8


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


async def _settle(union: UnionServer) -> None:
    for _ in range(50):
        if union.events.watcher_count() == 0 and union.admission.streams_in_progress == 0:
            return
        await asyncio.sleep(0.05)


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
async def test_ten_times_the_normal_concurrency(make_union: UnionFactory) -> None:
    union = await make_union(max_concurrent_calls=16, max_concurrent_watches=NORMAL_WATCHES)
    client = await verified_client(union, ZHANG)
    async with client:
        await union.orchestrator.stop(0)  # keep the lookup running so watches stay open
        lookup = await client.create_lookup(consent_terms_version=TERMS_VERSION)
        metadata = (("authorization", f"Bearer {client.session_token}"),)
        before = rss_mb()
        async with grpc.aio.insecure_channel(union.address) as channel:
            stub = pb_grpc.CardLookupServiceStub(channel)
            calls = [
                stub.WatchLookup(pb.WatchLookupRequest(name=lookup.name), metadata=metadata, timeout=10)
                for _ in range(NORMAL_WATCHES * 10)
            ]

            async def first_message(
                call: grpc.aio.UnaryStreamCall[pb.WatchLookupRequest, pb.WatchLookupResponse],
            ) -> grpc.aio.AioRpcError | None:
                try:
                    await call.read()
                except grpc.aio.AioRpcError as error:
                    return error
                return None

            outcomes = await asyncio.gather(*(first_message(call) for call in calls))
            refused = [error for error in outcomes if error is not None]
            assert len(outcomes) - len(refused) == NORMAL_WATCHES
            assert len(refused) == NORMAL_WATCHES * 9
            assert {error.code() for error in refused} == {grpc.StatusCode.RESOURCE_EXHAUSTED}
            assert all("retry" in (error.details() or "") for error in refused)

            # A flood of unary calls: each is answered OK or refused with RetryInfo, never UNKNOWN/INTERNAL.
            flood = [client.get_lookup(lookup.name) for _ in range(16 * 10)]
            results = await asyncio.gather(*flood, return_exceptions=True)
            for result in results:
                if isinstance(result, CardLookupError):
                    assert result.code == grpc.StatusCode.RESOURCE_EXHAUSTED
                    assert result.retry_after is not None
                else:
                    assert isinstance(result, pb.Lookup)
            for call in calls:
                call.cancel()
        await _settle(union)
        assert union.events.watcher_count() == 0
        assert union.admission.streams_in_progress == 0
        assert union.admission.unary_in_progress == 0
        assert rss_mb() - before < 200  # bounded: refusals cost nothing to keep

        # Afterwards the server serves normally.
        union.orchestrator.start()
        events = [e async for e in client.watch_lookup(lookup.name)]
        assert events[-1].report_ready


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
async def test_cancelled_watches_and_creates_leak_nothing(union: UnionServer) -> None:
    client = await verified_client(union, ZHANG)
    async with client:
        await union.orchestrator.stop(0)
        lookup = await client.create_lookup(request_id="resumed", consent_terms_version=TERMS_VERSION)
        baseline_tasks = len(asyncio.all_tasks())
        metadata = (("authorization", f"Bearer {client.session_token}"),)
        async with grpc.aio.insecure_channel(union.address) as channel:
            stub = pb_grpc.CardLookupServiceStub(channel)
            calls = [
                stub.WatchLookup(pb.WatchLookupRequest(name=lookup.name), metadata=metadata)
                for _ in range(50)
            ]
            await asyncio.gather(*(call.read() for call in calls))
            assert union.events.watcher_count() > 0
            for call in calls:
                call.cancel()
            # A create that the client abandons mid-call.
            create = stub.CreateLookup(
                pb.CreateLookupRequest(request_id="abandoned", consent_terms_version=TERMS_VERSION),
                metadata=metadata,
            )
            create.cancel()
        await _settle(union)
        assert union.events.watcher_count() == 0
        assert union.admission.streams_in_progress == 0
        for _ in range(50):
            if len(asyncio.all_tasks()) <= baseline_tasks:
                break
            await asyncio.sleep(0.05)
        assert len(asyncio.all_tasks()) <= baseline_tasks
        union.orchestrator.start()
        _, report = await run_lookup(client, request_id="resumed")
        assert report.total_card_count == 5
