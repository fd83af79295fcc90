"""Operations: health follows the database; many people at once never trip over each other."""

from __future__ import annotations

import asyncio
import os
from datetime import timedelta

import grpc
import pytest
from cardlookup.v1 import card_lookup_service_pb2 as pb
from grpc_health.v1 import health_pb2
from sqlalchemy import create_engine, func, select, text
from sqlalchemy.engine import make_url

from clients.client import TERMS_VERSION, CardLookupError
from server.bank.bank_server import RunningBank
from server.bank.faults import FaultSettings
from server.population.generator import person_at
from server.union.storage.models import ReportRow
from tests.conftest import POSTGRES_ENV, SEED, UnionFactory, run_lookup, verified_client, wait_health


@pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)
async def test_health_not_serving_while_database_is_unreachable(
    make_union: UnionFactory, database_url: str, banks: dict[str, RunningBank]
) -> None:
    union = await make_union(health_interval=timedelta(milliseconds=100))
    client = await verified_client(union, person_at(SEED, 0))
    # Banks slow enough that the lookup is in flight when the database goes away.
    for bank in banks.values():
        bank.servicer.faults = FaultSettings(latency_ms=1000)
    lookup = await client.create_lookup(request_id="through-the-outage", consent_terms_version=TERMS_VERSION)
    admin = create_engine(os.environ[POSTGRES_ENV], isolation_level="AUTOCOMMIT")
    name = make_url(database_url).database
    try:
        with admin.connect() as connection:
            connection.execute(text(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS false'))
            connection.execute(
                text("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = :name"),
                {"name": name},
            )
        await wait_health(union.address, health_pb2.HealthCheckResponse.NOT_SERVING)
        async with client:
            with pytest.raises(CardLookupError) as down:
                await client.list_reports()
            assert down.value.code == grpc.StatusCode.UNAVAILABLE
            assert down.value.retry_after is not None
            await asyncio.sleep(1.5)  # the banks answer meanwhile; nothing can be recorded

            with admin.connect() as connection:
                connection.execute(text(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS true'))
            await wait_health(union.address, health_pb2.HealthCheckResponse.SERVING)
            # Recovered by itself, and nothing was half-written: the lookup finishes with one whole report.
            events = [event async for event in client.watch_lookup(lookup.name, stream_timeout=60)]
            report = await client.get_report(events[-1].lookup.report)
            assert report.total_card_count == 5
            assert all(s.outcome == pb.BANK_OUTCOME_ANSWERED for s in report.bank_summaries)
            with union.store.engine.connect() as connection:
                assert connection.scalar(select(func.count()).select_from(ReportRow)) == 1
    finally:
        with admin.connect() as connection:
            connection.execute(text(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS true'))
        admin.dispose()


async def test_many_people_at_once(make_union: UnionFactory) -> None:
    """Concurrent verifications and lookups: no 'database is locked', one report each."""
    union = await make_union()
    people = [person_at(SEED, index) for index in range(5, 200)]
    people = [p for p in people if p.region_code in {"310000", "530000", "110000", "500000", "330000"}][:24]
    assert len(people) >= 12
    clients = await asyncio.gather(*(verified_client(union, person) for person in people))
    try:
        results = await asyncio.gather(*(run_lookup(client) for client in clients))
    finally:
        await asyncio.gather(*(client.close() for client in clients))
    reports = [report for _, report in results]
    assert len({r.name for r in reports}) == len(people)
    assert all(len(r.bank_summaries) == 16 for r in reports)
