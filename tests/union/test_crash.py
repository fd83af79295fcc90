"""kill -9 of the union with lookups in flight (invariant 4): every lookup ends in exactly one report.

The union runs as a real child process here, so SIGKILL is a real crash: no
graceful stop, no released leases, whatever was half-done stays half-done.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import sys
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import TypeVar

import grpc
import pytest
from cardlookup.v1 import card_lookup_service_pb2 as pb
from grpc_health.v1 import health_pb2, health_pb2_grpc
from sqlalchemy import Connection, create_engine, func, select

from clients.client import TERMS_VERSION, CardLookupClient
from server.bank.bank_server import RunningBank
from server.bank.faults import FaultSettings
from server.population.catalogue import PILOT_REGIONS
from server.population.generator import Person, person_at
from server.union.sms import read_one_time_code
from server.union.storage.models import LookupRow, ReportRow
from tests.conftest import SEED

T = TypeVar("T")
LOOKUPS = 110
OPEN = {region.code for region in PILOT_REGIONS}
MASTER_KEY = "11" * 32  # shared by the replicas of one deployment, as in production


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


class UnionProcess:
    """`cardlookup-union serve` as a child process."""

    def __init__(self, data_dir: Path, database_url: str, banks: dict[str, RunningBank]) -> None:
        self.data_dir = data_dir
        self.address = f"127.0.0.1:{free_port()}"
        self.command = [
            sys.executable,
            "-m",
            "server.union",
            "serve",
            "--listen",
            self.address,
            "--data-dir",
            str(data_dir),
            "--database-url",
            database_url,
            "--population-size",
            "1000",
            "--requery-cooldown-hours",
            "0",
            "--call-timeout-seconds",
            "3",
            "--lease-margin-seconds",
            "1",
            "--log-level",
            "INFO",
        ]
        for code, bank in banks.items():
            self.command += ["--bank", f"{code}={bank.address}"]
        self.process: asyncio.subprocess.Process | None = None

    async def start(self) -> None:
        env = {
            **os.environ,
            "CARDLOOKUP_MASTER_KEY": MASTER_KEY,
            "CARDLOOKUP_ADMIN_TOKEN": "test-admin-token",
        }
        # Kept for a failure's post-mortem: the union writes JSON log lines to stderr.
        self.log = self.data_dir.with_name(f"{self.data_dir.name}-{self.address.rsplit(':', 1)[1]}.log")
        with self.log.open("ab") as log:
            self.process = await asyncio.create_subprocess_exec(*self.command, env=env, stderr=log)
        async with grpc.aio.insecure_channel(self.address) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            for _ in range(300):
                try:
                    status = await stub.Check(health_pb2.HealthCheckRequest(), timeout=1)
                    if status.status == health_pb2.HealthCheckResponse.SERVING:
                        return
                except grpc.aio.AioRpcError:
                    pass
                await asyncio.sleep(0.1)
        raise AssertionError("union process did not become healthy")

    async def kill(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGKILL)
        await self.process.wait()

    async def stop(self) -> None:
        if self.process is not None and self.process.returncode is None:
            self.process.terminate()
            await self.process.wait()


@pytest.fixture
async def union_processes(tmp_path: Path) -> AsyncIterator[list[UnionProcess]]:
    processes: list[UnionProcess] = []
    yield processes
    for process in processes:
        await process.stop()


async def start_lookup(union: UnionProcess, person: Person, outbox: Path) -> tuple[str, str]:
    """Verify `person` and create a lookup; returns (session token, lookup name)."""
    async with CardLookupClient(union.address) as client:
        started = await client.start_verification(
            person.name, person.resident_id_number, person.mobile_number
        )
        code = read_one_time_code(outbox, person.mobile_number)
        assert code is not None
        await client.complete_verification(started.verification_id, code)
        lookup = await client.create_lookup(
            request_id=f"crash-{person.index}", consent_terms_version=TERMS_VERSION
        )
        assert client.session_token is not None
        return client.session_token, lookup.name


async def finish(union: UnionProcess, token: str, lookup_name: str) -> pb.Lookup:
    async with CardLookupClient(union.address, session_token=token) as client:
        async for event in client.watch_lookup(lookup_name, stream_timeout=60):
            if event.report_ready:
                return event.lookup
    raise AssertionError("watch ended early")


async def create_many(union: UnionProcess, data_dir: Path) -> list[tuple[str, str]]:
    people = [p for p in (person_at(SEED, i) for i in range(5, 1000)) if p.region_code in OPEN][:LOOKUPS]
    gate = asyncio.Semaphore(16)

    async def one(person: Person) -> tuple[str, str]:
        async with gate:
            return await start_lookup(union, person, data_dir / "sms-outbox.jsonl")

    return await asyncio.gather(*(one(p) for p in people))


def read_database(database_url: str, query: Callable[[Connection], T]) -> T:
    """Run `query` on a fresh connection that is closed whatever happens (no stray connections)."""
    engine = create_engine(database_url)
    try:
        with engine.connect() as connection:
            return query(connection)
    finally:
        engine.dispose()


def assert_one_report_each(database_url: str, lookup_names: list[str]) -> None:
    ids = [name.split("/")[1] for name in lookup_names]

    def counts(connection: Connection) -> tuple[dict[str, int], int, int]:
        rows = connection.execute(
            select(ReportRow.lookup_id, func.count()).group_by(ReportRow.lookup_id)
        ).all()
        lookups = connection.scalar(select(func.count()).select_from(LookupRow)) or 0
        unfinished = (
            connection.scalar(
                select(func.count()).select_from(LookupRow).where(LookupRow.report_id.is_(None))
            )
            or 0
        )
        return {lookup_id: int(n) for lookup_id, n in rows}, lookups, unfinished

    per_lookup, lookups, unfinished = read_database(database_url, counts)
    assert {i: per_lookup.get(i, 0) for i in ids} == dict.fromkeys(ids, 1)
    assert lookups == len(ids)
    assert unfinished == 0


def slow_banks(banks: dict[str, RunningBank]) -> None:
    """Half the banks answer slowly, so lookups are certainly in flight when the union dies."""
    for index, bank in enumerate(banks.values()):
        if index % 2:
            bank.servicer.faults = FaultSettings(latency_ms=1500, latency_jitter_ms=500)


@pytest.mark.parametrize("database_url", ["sqlite", "postgresql"], indirect=True)
async def test_kill_9_with_lookups_in_flight_then_restart(
    tmp_path: Path, database_url: str, banks: dict[str, RunningBank], union_processes: list[UnionProcess]
) -> None:
    slow_banks(banks)
    first = UnionProcess(tmp_path / "union", database_url, banks)
    union_processes.append(first)
    await first.start()
    created = await create_many(first, tmp_path / "union")
    assert len({name for _, name in created}) == LOOKUPS

    await first.kill()
    running = read_database(
        database_url,
        lambda c: c.scalar(select(func.count()).select_from(LookupRow).where(LookupRow.report_id.is_(None))),
    )
    assert running, "the crash should leave lookups in flight"

    second = UnionProcess(tmp_path / "union", database_url, banks)
    union_processes.append(second)
    await second.start()
    finished = await asyncio.gather(*(finish(second, token, name) for token, name in created))
    assert all(lookup.state == pb.LOOKUP_STATE_COMPLETED for lookup in finished)
    assert all(
        all(b.outcome == pb.BANK_OUTCOME_ANSWERED for b in lookup.bank_progress) for lookup in finished
    )
    assert_one_report_each(database_url, [name for _, name in created])


@pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)
async def test_two_replicas_share_postgresql_and_survive_one_crash(
    tmp_path: Path, database_url: str, banks: dict[str, RunningBank], union_processes: list[UnionProcess]
) -> None:
    slow_banks(banks)
    replica_a = UnionProcess(tmp_path / "union-a", database_url, banks)
    replica_b = UnionProcess(tmp_path / "union-b", database_url, banks)
    union_processes += [replica_a, replica_b]
    await asyncio.gather(replica_a.start(), replica_b.start())
    created = await create_many(replica_a, tmp_path / "union-a")
    await replica_a.kill()

    # Replica B sees A's lookups (one database, one key) and finishes A's claimed work once its leases lapse.
    finished = await asyncio.gather(*(finish(replica_b, token, name) for token, name in created))
    assert all(lookup.state == pb.LOOKUP_STATE_COMPLETED for lookup in finished)
    assert all(
        all(b.outcome == pb.BANK_OUTCOME_ANSWERED for b in lookup.bank_progress) for lookup in finished
    )
    assert_one_report_each(database_url, [name for _, name in created])
