"""Shared fixtures: real bank servers and a real union server, in process, on free loopback ports.

The union suite runs on SQLite always, and on PostgreSQL too when
CARDLOOKUP_TEST_POSTGRES_URL points at a server whose role may create
databases (.ci/run starts one): each test then gets a database of its own.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import replace
from datetime import timedelta
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

from clients.client import TERMS_VERSION, CardLookupClient
from server.bank.bank_server import RunningBank, start_all_banks
from server.bank.store import BankStore, default_database_url, seed_stores
from server.population.catalogue import BANKS
from server.population.generator import DEMO_PEOPLE, Person
from server.union.clock import Clock
from server.union.domain.identity import IdentityPolicy
from server.union.domain.lookups import LookupPolicy
from server.union.domain.orchestrator import OrchestratorPolicy
from server.union.sms import read_one_time_code
from server.union.union_server import UnionConfig, UnionServer

SEED = 20211201
SIZE = 300
POSTGRES_ENV = "CARDLOOKUP_TEST_POSTGRES_URL"

ZHANG = DEMO_PEOPLE[0].person  # Shanghai; ICBC 1+1, CMB 2 debit (one dormant), CCB credit
LI = DEMO_PEOPLE[1].person  # Yunnan; BOC, ABC, PSBC debit, CMB credit
WANG = DEMO_PEOPLE[2].person  # Guangdong: a closed region
LIU = DEMO_PEOPLE[3].person  # Beijing; 55 cards at ICBC, 1 at CMB


@pytest.fixture(scope="session")
def seeded_banks_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """All 16 bank stores seeded once per session; tests get copies."""
    directory = tmp_path_factory.mktemp("banks-template")
    stores = {bank.code: BankStore(bank.code, default_database_url(directory, bank.code)) for bank in BANKS}
    for store in stores.values():
        store.create_schema()
    seed_stores(stores, SEED, SIZE)
    for store in stores.values():
        store.close()
    return directory


@pytest.fixture
async def banks(seeded_banks_template: Path, tmp_path: Path) -> AsyncIterator[dict[str, RunningBank]]:
    data_dir = tmp_path / "banks"
    shutil.copytree(seeded_banks_template, data_dir)
    running = await start_all_banks(data_dir=data_dir, seed=SEED, size=SIZE, base_port=0)
    yield {bank.bank_code: bank for bank in running}
    for bank in running:
        await bank.stop(0)


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'union' / 'union.db'}"
        return
    admin_url = os.environ.get(POSTGRES_ENV)
    if not admin_url:
        pytest.skip(f"{POSTGRES_ENV} not set (CI sets it; see .ci/run)")
    name = f"union_test_{uuid.uuid4().hex[:12]}"
    admin = create_engine(admin_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as connection:
        connection.execute(text(f'CREATE DATABASE "{name}"'))
    try:
        yield make_url(admin_url).set(database=name).render_as_string(hide_password=False)
    finally:
        try:
            with admin.connect() as connection:
                # FORCE also ends an autovacuum worker that may be visiting the fresh database.
                connection.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        finally:
            admin.dispose()


def fast_policies() -> dict[str, Any]:
    """Seconds instead of hours, so fault tests finish quickly."""
    return {
        "identity": IdentityPolicy(),
        "lookups": LookupPolicy(watch_poll_interval=timedelta(milliseconds=200)),
        "orchestration": OrchestratorPolicy(
            lookup_deadline=timedelta(seconds=30),
            call_timeout=timedelta(seconds=2),
            backoff_base=timedelta(milliseconds=100),
            backoff_max=timedelta(milliseconds=500),
            poll_interval=timedelta(milliseconds=200),
        ),
    }


UnionFactory = Callable[..., Awaitable[UnionServer]]


@pytest.fixture
async def make_union(
    tmp_path: Path, database_url: str, banks: dict[str, RunningBank]
) -> AsyncIterator[UnionFactory]:
    """Start union servers on one data dir and database; each call is a fresh process-like instance."""
    started: list[UnionServer] = []

    async def factory(clock: Clock | None = None, **overrides: Any) -> UnionServer:
        config = UnionConfig(
            listen="127.0.0.1:0",
            data_dir=tmp_path / "union",
            database_url=database_url,
            bank_addresses={code: bank.address for code, bank in banks.items()},
            population_seed=SEED,
            population_size=SIZE,
            admin_token="test-admin-token",
            **fast_policies(),
        )
        if "orchestration" in overrides and isinstance(overrides["orchestration"], dict):
            overrides["orchestration"] = replace(config.orchestration, **overrides["orchestration"])
        if "lookups" in overrides and isinstance(overrides["lookups"], dict):
            overrides["lookups"] = replace(config.lookups, **overrides["lookups"])
        config = replace(config, **overrides)
        server = UnionServer(config, clock=clock)
        await server.start()
        started.append(server)
        return server

    yield factory
    for server in started:
        await server.stop(0)


@pytest.fixture
async def union(make_union: UnionFactory) -> UnionServer:
    return await make_union()


async def health_status(address: str, service: str = "") -> int:
    """A server's health status for `service` ("" = the whole server); -1 while it has no entry."""
    async with grpc.aio.insecure_channel(address) as channel:
        request = health_pb2.HealthCheckRequest(service=service)
        try:
            response = await health_pb2_grpc.HealthStub(channel).Check(request, timeout=2)
        except grpc.aio.AioRpcError as error:
            if error.code() != grpc.StatusCode.NOT_FOUND:
                raise
            return -1
        return int(response.status)


async def wait_health(address: str, wanted: int, service: str = "") -> None:
    for _ in range(100):
        if await health_status(address, service) == wanted:
            return
        await asyncio.sleep(0.1)
    raise AssertionError(f"health of {service or 'the server'} never became {wanted}")


async def verified_client(union: UnionServer, person: Person) -> CardLookupClient:
    """A client holding a session for `person`, verified through the real SMS outbox."""
    client = CardLookupClient(union.address)
    started = await client.start_verification(person.name, person.resident_id_number, person.mobile_number)
    code = read_one_time_code(union.config.sms_sink_path, person.mobile_number)
    assert code is not None
    await client.complete_verification(started.verification_id, code)
    return client


async def run_lookup(client: CardLookupClient, request_id: str | None = None, **kwargs: Any) -> Any:
    """Create a lookup (the person agreeing to the current terms), follow it to the end, return
    (events, report)."""
    kwargs.setdefault("consent_terms_version", TERMS_VERSION)
    lookup = await client.create_lookup(request_id=request_id or uuid.uuid4().hex, **kwargs)
    events = [event async for event in client.watch_lookup(lookup.name, stream_timeout=60)]
    assert events[-1].report_ready
    report = await client.get_report(events[-1].lookup.report)
    return events, report
