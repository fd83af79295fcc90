"""`make bench`: how fast is a lookup, end to end, through the real public API?

Starts the 16 banks (one process) on loopback and measures three bare
baselines against them: a minimal fan-out with no persistence, auth or
masking, first with one QueryCards call per bank per lookup ("bare per-call"),
then with one long-lived QuerySession stream per bank carrying every lookup's
query one to a message ("bare multiplexed"), then the same over
QueryBatchSession, where whatever queued up while the previous message was
written goes in one message ("bare batched", what the union itself does).
Then, for each count in --replicas (e.g. `1,2`), it starts a
fresh union stack of that many processes on an emptied database, verifies N
simulated people once each (spread round-robin over the replicas), keeps C
lookups in flight for D seconds (create → watch until the report is ready,
person after person) and measures completed lookups/s, time-to-report
percentiles, errors by status code, CPU per lookup of each process and the
union's peak RSS. The banks stay up across counts; the baselines run once.

--hold N measures memory instead of speed: a fresh union in front of banks
that answer nothing for ten minutes, N people verified, one lookup created per
person (refusals such as RESOURCE_EXHAUSTED or UNAVAILABLE are counted, not
failures), then the union's current and peak RSS sampled while they are all in
flight. --hold-only skips the speed phases.

It prints the results as JSON (also written to --out/latest.json with a
latency histogram, latency.png) and then as a short table. Timings are never
asserted: these machines are shared and noisy, so ratios against baselines
from the same run are what to compare.

PostgreSQL (--database-url postgresql+psycopg://…, needed for more than one
replica): point it at a scratch database. Before every union stack starts, the
bench drops the union's own tables there (and Alembic's version table), so the
stack begins empty; other tables are left alone.

    python -m bench.run --concurrency 32 --duration 20 [--bank-latency-ms 50] [--database-url ...]
    python -m bench.run --database-url postgresql+psycopg://…/scratch --replicas 1,2
    python -m bench.run --hold 10000 --hold-only
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Coroutine, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
from bankquery.v1 import bank_query_service_pb2 as bank_pb
from bankquery.v1 import bank_query_service_pb2_grpc as bank_grpc
from cardlookup.v1 import card_lookup_service_pb2 as lookup_pb
from grpc_health.v1 import health_pb2, health_pb2_grpc
from sqlalchemy import create_engine, text

from clients.client import TERMS_VERSION, CardLookupClient, CardLookupError
from server.common.grpc_runtime import tune_garbage_collection
from server.population.catalogue import PILOT_REGIONS
from server.population.generator import Person, person_at
from server.union.sms import ONE_TIME_CODE
from server.union.storage.models import Base

SEED = 20211201
OPEN = {r.code for r in PILOT_REGIONS}
STATUS_NAMES = {code.value[0]: code.name for code in grpc.StatusCode}
# Banks in the --hold stack: the first answer would come after ten minutes.
HOLD_BANK_LATENCY_MS = 600_000


def free_block(size: int) -> int:
    for base in range(30000, 60000, 50):
        ok = True
        for port in range(base, base + size):
            with socket.socket() as probe:
                probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                try:
                    probe.bind(("127.0.0.1", port))
                except OSError:
                    ok = False
                    break
        if ok:
            return base
    raise SystemExit("no free ports")


def _status_mb(pid: int, key: str) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key):
            return int(line.split()[1]) / 1024
    return 0.0


def peak_rss_mb(pid: int) -> float:
    """The most resident memory the process has had (VmHWM)."""
    return _status_mb(pid, "VmHWM:")


def rss_mb(pid: int) -> float:
    """Resident memory now (VmRSS)."""
    return _status_mb(pid, "VmRSS:")


def _stat_fields(stat: Path) -> list[str]:
    """A /proc/<pid>/stat's fields after the command name (which may hold spaces and
    parentheses): [0] is the state, [1] the parent's pid, [11] and [12] user and system ticks,
    [13] and [14] those of the reaped children."""
    return stat.read_text().rsplit(")", 1)[1].split()


def cpu_seconds(pid: int) -> float:
    """User + system CPU time a process has used so far."""
    fields = _stat_fields(Path(f"/proc/{pid}/stat"))
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def postgres_server_pid(database_url: str) -> int | None:
    """The PostgreSQL server (its postmaster) behind `database_url` when it runs on this machine,
    so that its CPU can be attributed like every other process's; None when it runs elsewhere."""
    engine = create_engine(database_url)
    try:
        with engine.connect() as connection:
            backend = int(connection.execute(text("SELECT pg_backend_pid()")).scalar_one())
            # Read while the connection holds the backend: once it closes, the backend ends.
            try:
                if not Path(f"/proc/{backend}/comm").read_text().startswith("postgres"):
                    return None
                fields = _stat_fields(Path(f"/proc/{backend}/stat"))
            except OSError:  # not a process here: the server is on another machine
                return None
    finally:
        engine.dispose()
    return int(fields[1])  # the backend's parent


def postgres_cpu_seconds(postmaster: int) -> float:
    """User + system CPU of a PostgreSQL server so far: the postmaster, its live children (one
    backend per connection, the WAL writer, ...) and the children that have exited (added to the
    postmaster's own children's time once reaped)."""
    clock_ticks = os.sysconf("SC_CLK_TCK")
    reaped = _reaped_children_ticks(postmaster)
    for _ in range(10_000):  # a scan takes a millisecond; backends end far less often than that
        # Each child must be counted once: live (or a zombie) in the scan, or reaped in the
        # postmaster's children's time. A child reaped while the scan runs would be in neither, and
        # one being reaped right now (state X: the kernel adds its time to the parent's before it
        # leaves /proc) could be in both. So a scan is kept only if the reaped time did not move
        # across it and no child was caught in the middle of being reaped (one more try, mostly).
        live = 0
        being_reaped = False
        for stat in _children_stats(postmaster):
            try:
                fields = _stat_fields(stat)
            except OSError:  # exited while we looked
                continue
            if int(fields[1]) == postmaster:
                being_reaped = being_reaped or fields[0] == "X"
                live += int(fields[11]) + int(fields[12])
        fields = _stat_fields(Path(f"/proc/{postmaster}/stat"))
        after = _reaped_children_ticks(postmaster)
        if after == reaped and not being_reaped:
            return (int(fields[11]) + int(fields[12]) + reaped + live) / clock_ticks
        reaped = after
    raise RuntimeError("the PostgreSQL server's children never held still long enough to be counted")


def _children_stats(pid: int) -> list[Path]:
    """The stat files of `pid`'s children: from the kernel's list when it keeps one (quick, so a
    scan rarely overlaps a child's end), else from every process."""
    try:
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    except OSError:
        return list(Path("/proc").glob("[0-9]*/stat"))
    return [Path(f"/proc/{child}/stat") for child in children]


def _reaped_children_ticks(pid: int) -> int:
    fields = _stat_fields(Path(f"/proc/{pid}/stat"))
    return int(fields[13]) + int(fields[14])


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def parse_replicas(value: str) -> list[int]:
    """`--replicas 1,2` → [1, 2]: each a union stack of its own, in this order."""
    try:
        counts = [int(part) for part in value.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected a comma list of counts, e.g. 1,2; got {value!r}"
        ) from None
    if not counts or any(count < 1 for count in counts):
        raise argparse.ArgumentTypeError(f"replica counts must be 1 or more, got {value!r}")
    return counts


def open_region_people(population: int, count: int) -> list[Person]:
    """The first `count` people of the population who live in an open (pilot) region."""
    found: list[Person] = []
    for index in range(5, population):
        person = person_at(SEED, index)
        if person.region_code in OPEN:
            found.append(person)
            if len(found) == count:
                break
    return found


@dataclass
class Run:
    name: str
    completed: int = 0
    seconds: float = 0.0
    latencies_ms: list[float] = field(default_factory=list)
    errors: Counter[str] = field(default_factory=Counter)
    cpu_ms_per_lookup: dict[str, float] = field(default_factory=dict)

    @property
    def cores_busy(self) -> float:
        """How many cores the processes measured kept busy: lookups/s × their CPU per lookup. On
        a machine with N cores this cannot pass N, which is what bounds the figure there."""
        if not self.seconds:
            return 0.0
        return round(self.completed / self.seconds * sum(self.cpu_ms_per_lookup.values()) / 1000, 2)

    @property
    def cores_busy_by_process(self) -> dict[str, float]:
        """The same, for each process (group) apart. A Python process near 1.0 is the bottleneck
        whatever the machine has left: its interpreter runs one thread at a time (only gRPC's and
        the database's C code run beside it), so that group cannot go much past one core."""
        if not self.seconds:
            return {}
        rate = self.completed / self.seconds
        return {name: round(rate * ms / 1000, 2) for name, ms in self.cpu_ms_per_lookup.items()}

    def summary(self) -> dict[str, Any]:
        return {
            "lookups_per_second": round(self.completed / self.seconds, 1) if self.seconds else 0.0,
            "completed": self.completed,
            "p50_ms": round(percentile(self.latencies_ms, 0.50), 1),
            "p95_ms": round(percentile(self.latencies_ms, 0.95), 1),
            "p99_ms": round(percentile(self.latencies_ms, 0.99), 1),
            "mean_ms": round(statistics.fmean(self.latencies_ms), 1) if self.latencies_ms else None,
            "errors": dict(self.errors),
            "cpu_ms_per_lookup": self.cpu_ms_per_lookup,
            "cores_busy": self.cores_busy,
            "cores_busy_by_process": self.cores_busy_by_process,
        }


def _spawn(
    processes: list[subprocess.Popen[bytes]], command: list[str], log: Path, env: dict[str, str]
) -> subprocess.Popen[bytes]:
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("ab") as handle:
        process = subprocess.Popen(command, stdout=handle, stderr=subprocess.STDOUT, env=env)  # noqa: S603
    processes.append(process)
    return process


def _stop(processes: list[subprocess.Popen[bytes]]) -> None:
    for process in processes:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
    for process in processes:
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


BENCH_ENV = {"CARDLOOKUP_MASTER_KEY": "42" * 32, "CARDLOOKUP_ADMIN_TOKEN": "bench-admin"}


class Banks:
    """The 16 simulated banks, one child process, on 16 consecutive loopback ports.

    Their data lives in a directory per population size: a bank only seeds an empty store, so a
    directory seeded for another size would silently lack (or have extra) people.
    """

    def __init__(self, work: Path, population: int, faults: Sequence[str] = (), label: str = "banks") -> None:
        self.work = work
        self.population = population
        self.faults = list(faults)
        self.label = label
        self.base = 0
        self.pid = 0
        self._processes: list[subprocess.Popen[bytes]] = []

    @property
    def addresses(self) -> list[str]:
        return [f"127.0.0.1:{self.base + i}" for i in range(16)]

    def start(self) -> None:
        self.base = free_block(16)
        command = [
            sys.executable,
            "-m",
            "server.bank",
            "serve",
            "--all",
            "--base-port",
            str(self.base),
            "--data-dir",
            str(self.work / f"banks-p{self.population}"),
            "--seed",
            str(SEED),
            "--population",
            str(self.population),
        ]
        for fault in self.faults:
            command += ["--fault", fault]
        env = {**os.environ, **BENCH_ENV}
        self.pid = _spawn(self._processes, command, self.work / "logs" / f"{self.label}.log", env).pid
        asyncio.run(wait_serving(self.addresses))

    def stop(self) -> None:
        _stop(self._processes)


class Unions:
    """`replicas` union processes sharing one database, in front of running banks.

    Each stack starts empty: its data directory (SQLite database, keys, SMS outbox) is removed
    first, and on PostgreSQL the union's tables are dropped (see `reset_union_tables`).
    """

    def __init__(
        self,
        work: Path,
        banks: Banks,
        database_url: str,
        replicas: int,
        label: str,
        profile: bool = False,
    ) -> None:
        self.work = work
        self.data_dir = work / "union"
        self.banks = banks
        self.database_url = database_url
        self.replicas = replicas
        self.label = label
        self.profile = profile
        self.addresses: list[str] = []
        self.pids: list[int] = []
        self._processes: list[subprocess.Popen[bytes]] = []

    @property
    def outbox(self) -> Path:
        return self.data_dir / "sms-outbox.jsonl"

    def start(self) -> None:
        shutil.rmtree(self.data_dir, ignore_errors=True)
        if self.database_url.startswith("postgresql"):
            reset_union_tables(self.database_url)
        base = free_block(self.replicas)
        self.addresses = [f"127.0.0.1:{base + i}" for i in range(self.replicas)]
        env = {**os.environ, **BENCH_ENV}
        for index, address in enumerate(self.addresses):
            command = [
                sys.executable,
                "-m",
                "server.union",
                "serve",
                "--listen",
                address,
                "--data-dir",
                str(self.data_dir),
                "--bank-base-port",
                str(self.banks.base),
                "--population-seed",
                str(SEED),
                # The identity registry must hold everyone the banks know, or verification fails.
                "--population-size",
                str(self.banks.population),
                "--requery-cooldown-hours",
                "0",
                "--log-level",
                "WARNING",
            ]
            if self.database_url:
                command += ["--database-url", self.database_url]
            replica_env = dict(env)
            if self.profile and index == 0:
                replica_env["CARDLOOKUP_PROFILE"] = str(self.work / f"union-profile-{self.label}.txt")
            log = self.work / "logs" / f"union-{self.label}-{index}.log"
            self.pids.append(_spawn(self._processes, command, log, replica_env).pid)
            if index == 0:
                asyncio.run(wait_serving([address]))  # the first replica migrates; the others follow
        asyncio.run(wait_serving(self.addresses))

    def stop(self) -> None:
        _stop(self._processes)


def reset_union_tables(database_url: str) -> None:
    """Drop the union's own tables and Alembic's version table, so the next union migrates an empty
    schema. Only those: the bench never drops a whole schema or anyone else's tables."""
    engine = create_engine(database_url)
    try:
        Base.metadata.drop_all(engine)
        with engine.begin() as connection:
            connection.execute(text("DROP TABLE IF EXISTS alembic_version"))
    finally:
        engine.dispose()


async def wait_serving(addresses: list[str]) -> None:
    async def one(address: str) -> None:
        async with grpc.aio.insecure_channel(address) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            for _ in range(3000):
                try:
                    response = await stub.Check(health_pb2.HealthCheckRequest(), timeout=1)
                    if response.status == health_pb2.HealthCheckResponse.SERVING:
                        return
                except grpc.aio.AioRpcError:
                    pass
                await asyncio.sleep(0.2)
        raise SystemExit(f"{address} never became healthy")

    await asyncio.gather(*(one(a) for a in addresses))


class OutboxReader:
    """Reads the union's development SMS outbox incrementally.

    The outbox is one JSON line per message, {"time", "to", "text"}, the code being the 6-digit
    number in the text. Each read starts where the last one stopped, so verifying N people reads
    the file once overall instead of once per person.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._offset = 0
        self._codes: dict[str, str] = {}

    def _read_new(self) -> None:
        try:
            with self.path.open("rb") as handle:
                handle.seek(self._offset)
                chunk = handle.read()
        except FileNotFoundError:
            return
        end = chunk.rfind(b"\n") + 1  # a line still being written waits for the next read
        for line in chunk[:end].splitlines():
            if not line.strip():
                continue
            entry = json.loads(line)
            if match := ONE_TIME_CODE.search(entry["text"]):
                self._codes[entry["to"]] = match.group(0)
        self._offset += end

    def take(self, mobile_number: str) -> str | None:
        """The newest code sent to this number, if one has arrived since the last `take` of it."""
        self._read_new()
        return self._codes.pop(mobile_number, None)

    async def wait_for(self, mobile_number: str) -> str:
        """The code for this number, polling until it arrives (at most 30 s)."""
        for _ in range(3000):  # the file is written by another process: poll it
            if (code := self.take(mobile_number)) is not None:
                return code
            await asyncio.sleep(0.01)
        raise RuntimeError(f"no one-time code for {mobile_number[:3]}… in {self.path}")


async def verify_all(
    addresses: list[str], outbox: Path, people: list[Person], concurrency: int = 32
) -> list[str]:
    """Verify every person once, person i on replica i mod R; their session tokens, in order."""
    reader = OutboxReader(outbox)
    clients = [CardLookupClient(address, retries=0, timeout=60) for address in addresses]
    tokens = [""] * len(people)
    todo: Iterator[int] = iter(range(len(people)))

    async def worker() -> None:
        # Verification calls carry no session credential, so the replicas' clients are shared.
        for index in todo:
            person = people[index]
            client = clients[index % len(clients)]
            started = await client.start_verification(
                person.name, person.resident_id_number, person.mobile_number
            )
            code = await reader.wait_for(person.mobile_number)
            completed = await client.complete_verification(started.verification_id, code)
            tokens[index] = completed.session_token

    try:
        await asyncio.gather(*(worker() for _ in range(concurrency)))
    finally:
        await asyncio.gather(*(c.close() for c in clients))
    return tokens


async def drive_union(
    addresses: list[str], tokens: list[str], concurrency: int, duration: float, name: str
) -> Run:
    run = Run(name)
    deadline = time.monotonic() + duration
    clients = [CardLookupClient(addresses[i % len(addresses)], retries=0) for i in range(concurrency)]

    async def worker(index: int) -> None:
        client = clients[index]
        mine = tokens[index::concurrency]
        turn = 0
        while time.monotonic() < deadline:
            client.session_token = mine[turn % len(mine)]
            turn += 1
            started = time.monotonic()
            try:
                lookup = await client.create_lookup(
                    request_id=uuid.uuid4().hex, consent_terms_version=TERMS_VERSION
                )
                async for event in client.watch_lookup(
                    lookup.name, stream_timeout=60, group_bank_changes=True
                ):
                    if event.report_ready:
                        break
            except CardLookupError as error:
                run.errors[error.code.name] += 1
                await asyncio.sleep(0.05)
                continue
            run.latencies_ms.append((time.monotonic() - started) * 1000)
            run.completed += 1

    began = time.monotonic()
    await asyncio.gather(*(worker(i) for i in range(concurrency)))
    run.seconds = time.monotonic() - began
    await asyncio.gather(*(c.close() for c in clients))
    return run


async def drive_bare(banks: Banks, people: list[Person], concurrency: int, duration: float) -> Run:
    """The per-call floor: one QueryCards call to each of the 16 banks per lookup, waiting for
    every stream; nothing else."""
    run = Run("bare per-call fan-out")
    channels = [grpc.aio.insecure_channel(address) for address in banks.addresses]
    stubs = [bank_grpc.BankQueryServiceStub(c) for c in channels]
    deadline = time.monotonic() + duration

    async def query(stub: bank_grpc.BankQueryServiceAsyncStub, person: Person) -> None:
        request = bank_pb.QueryCardsRequest(
            query_id=uuid.uuid4().hex, resident_id_number=person.resident_id_number, name=person.name
        )
        async for _ in stub.QueryCards(request, timeout=30):
            pass

    async def worker(index: int) -> None:
        turn = 0
        while time.monotonic() < deadline:
            person = people[(index + turn * concurrency) % len(people)]
            turn += 1
            started = time.monotonic()
            try:
                await asyncio.gather(*(query(stub, person) for stub in stubs))
            except grpc.aio.AioRpcError as error:
                run.errors[error.code().name] += 1
                continue
            run.latencies_ms.append((time.monotonic() - started) * 1000)
            run.completed += 1

    began = time.monotonic()
    await asyncio.gather(*(worker(i) for i in range(concurrency)))
    run.seconds = time.monotonic() - began
    await asyncio.gather(*(c.close(None) for c in channels))
    return run


class SessionStream:
    """One QuerySession (or QueryBatchSession) stream to one bank: `ask` sends a query, a reader
    task resolves its answer.

    The requests go through a queue into the call's request iterator, so the stream has exactly
    one writer however many lookups are asking at once; batched, each message carries every
    query in the queue when it is written.
    """

    def __init__(self, stub: bank_grpc.BankQueryServiceAsyncStub, batched: bool = False) -> None:
        self._outbox: asyncio.Queue[bank_pb.QuerySessionRequest | None] = asyncio.Queue()
        self._waiting: dict[str, asyncio.Future[bank_pb.QuerySessionResponse]] = {}
        self._batched = batched
        self._call: grpc.aio.StreamStreamCall[Any, Any] = (
            stub.QueryBatchSession(self._batches()) if batched else stub.QuerySession(self._requests())
        )
        self._failure: grpc.aio.AioRpcError | None = None
        self._reader = asyncio.create_task(self._read())

    async def _requests(self) -> AsyncIterator[bank_pb.QuerySessionRequest]:
        while (request := await self._outbox.get()) is not None:
            yield request

    async def _batches(self) -> AsyncIterator[bank_pb.QueryBatchSessionRequest]:
        while (request := await self._outbox.get()) is not None:
            queries = [request]
            while len(queries) < 64 and not self._outbox.empty():
                more = self._outbox.get_nowait()
                if more is None:
                    yield bank_pb.QueryBatchSessionRequest(queries=queries)
                    return
                queries.append(more)
            yield bank_pb.QueryBatchSessionRequest(queries=queries)

    async def _read(self) -> None:
        try:
            async for message in self._call:
                for response in message.answers if self._batched else (message,):
                    waiter = self._waiting.pop(response.query_id, None)
                    if waiter is not None and not waiter.done():
                        waiter.set_result(response)
        except grpc.aio.AioRpcError as error:
            self._failure = error
        # The stream is over: nothing still waiting will be answered on it.
        for waiter in self._waiting.values():
            if not waiter.done():
                waiter.set_exception(self._failure or ConnectionError("stream ended"))
        self._waiting.clear()

    def ask(self, person: Person) -> asyncio.Future[bank_pb.QuerySessionResponse]:
        waiter: asyncio.Future[bank_pb.QuerySessionResponse] = asyncio.get_running_loop().create_future()
        if self._reader.done():
            waiter.set_exception(self._failure or ConnectionError("stream ended"))
            return waiter
        query_id = uuid.uuid4().hex
        self._waiting[query_id] = waiter
        self._outbox.put_nowait(
            bank_pb.QuerySessionRequest(
                query_id=query_id, resident_id_number=person.resident_id_number, name=person.name
            )
        )
        return waiter

    async def close(self) -> None:
        """Half-close, so the bank finishes what is outstanding and ends the stream OK."""
        self._outbox.put_nowait(None)
        await self._reader


async def drive_bare_multiplexed(
    banks: Banks, people: list[Person], concurrency: int, duration: float, batched: bool = False
) -> Run:
    """The floor with per-RPC cost taken out: one session stream per bank carries every
    lookup's query; a lookup sends its query to all 16 streams and waits for the 16 answers.
    Batched, per-message cost is mostly taken out too."""
    run = Run("bare batched fan-out" if batched else "bare multiplexed fan-out")
    channels = [grpc.aio.insecure_channel(address) for address in banks.addresses]
    streams = [SessionStream(bank_grpc.BankQueryServiceStub(c), batched) for c in channels]
    deadline = time.monotonic() + duration

    async def worker(index: int) -> None:
        turn = 0
        while time.monotonic() < deadline:
            person = people[(index + turn * concurrency) % len(people)]
            turn += 1
            started = time.monotonic()
            try:
                answers = await asyncio.wait_for(
                    asyncio.gather(*(stream.ask(person) for stream in streams)), timeout=30
                )
            except grpc.aio.AioRpcError as error:
                run.errors[error.code().name] += 1
                continue
            except TimeoutError:
                run.errors["DEADLINE_EXCEEDED"] += 1
                continue
            except ConnectionError:
                run.errors["STREAM_ENDED"] += 1
                continue
            failed = [a.error.code for a in answers if a.WhichOneof("result") == "error"]
            if failed:
                run.errors[STATUS_NAMES.get(failed[0], str(failed[0]))] += 1
                continue
            run.latencies_ms.append((time.monotonic() - started) * 1000)
            run.completed += 1

    began = time.monotonic()
    await asyncio.gather(*(worker(i) for i in range(concurrency)))
    run.seconds = time.monotonic() - began
    await asyncio.gather(*(stream.close() for stream in streams))
    await asyncio.gather(*(c.close(None) for c in channels))
    return run


def rate(run: Run) -> float:
    return run.completed / run.seconds if run.seconds else 0.0


def ratio(numerator: Run, denominator: Run) -> float | None:
    return round(rate(numerator) / rate(denominator), 3) if rate(denominator) else None


def measured(
    pids: dict[str, list[int]], run_phase: Coroutine[Any, Any, Run], postgres: int | None = None
) -> Run:
    """Run one phase and attribute the CPU each process spent to the lookups it completed; with
    `postgres` (a local server's postmaster), the database server's CPU too."""
    groups = {**pids, "load": [os.getpid()]}

    def cpu() -> dict[str, float]:
        spent = {name: sum(cpu_seconds(p) for p in group) for name, group in groups.items()}
        if postgres is not None:
            spent["postgres"] = postgres_cpu_seconds(postgres)
        return spent

    before = cpu()
    run = asyncio.run(run_phase)
    after = cpu()
    if run.completed:
        run.cpu_ms_per_lookup = {
            name: round((after[name] - before[name]) * 1000 / run.completed, 2) for name in after
        }
    return run


@dataclass
class Hold:
    created: int = 0
    errors: Counter[str] = field(default_factory=Counter)
    seconds_to_create: float = 0.0
    names: list[tuple[str, str]] = field(default_factory=list)  # (lookup name, owner's token)


async def create_lookups(addresses: list[str], tokens: list[str], concurrency: int = 64) -> Hold:
    """One lookup per person, `concurrency` creates at a time, none retried: a refusal is an outcome."""
    hold = Hold()
    clients = [
        CardLookupClient(addresses[i % len(addresses)], retries=0, timeout=60) for i in range(concurrency)
    ]
    todo: Iterator[str] = iter(tokens)

    async def worker(client: CardLookupClient) -> None:
        for token in todo:
            client.session_token = token
            try:
                lookup = await client.create_lookup(
                    request_id=uuid.uuid4().hex, consent_terms_version=TERMS_VERSION
                )
            except CardLookupError as error:
                hold.errors[error.code.name] += 1
                continue
            hold.created += 1
            hold.names.append((lookup.name, token))

    began = time.monotonic()
    try:
        await asyncio.gather(*(worker(c) for c in clients))
    finally:
        hold.seconds_to_create = time.monotonic() - began
        await asyncio.gather(*(c.close() for c in clients))
    return hold


async def sample_states(address: str, names: list[tuple[str, str]], count: int = 200) -> dict[str, int]:
    """The states of up to `count` of the held lookups, spread over all of them (a check that they
    are still running, i.e. really in flight)."""
    states: Counter[str] = Counter()
    step = max(1, len(names) // count)
    async with CardLookupClient(address, retries=0) as client:
        for name, token in names[::step][:count]:
            client.session_token = token
            try:
                lookup = await client.get_lookup(name)
            except CardLookupError as error:
                states[error.code.name] += 1
                continue
            states[lookup_pb.LookupState.Name(lookup.state)] += 1
    return dict(states)


def hold_in_flight(args: argparse.Namespace) -> dict[str, Any]:
    """The memory phase: N lookups in flight against banks that do not answer, union RSS sampled."""
    began = time.monotonic()

    def say(message: str) -> None:
        print(f"hold [{time.monotonic() - began:6.1f} s] {message}", flush=True)

    population = max(args.population, 3 * args.hold)
    people = open_region_people(population, args.hold)
    if len(people) < args.hold:
        raise SystemExit(f"only {len(people)} people in open regions among {population}: raise --population")
    say(f"starting banks that answer after {HOLD_BANK_LATENCY_MS // 1000} s, population {population} …")
    banks = Banks(args.work_dir, population, [f"latency_ms={HOLD_BANK_LATENCY_MS}"], label="banks-hold")
    banks.start()
    unions = Unions(args.work_dir, banks, args.database_url, 1, "hold", args.profile)
    try:
        say("starting the union …")
        unions.start()
        pid = unions.pids[0]
        say(f"verifying {len(people)} people …")
        verify_began, verify_cpu = time.monotonic(), cpu_seconds(pid)
        tokens = asyncio.run(verify_all(unions.addresses, unions.outbox, people))
        seconds_to_verify = time.monotonic() - verify_began
        verify_cpu = cpu_seconds(pid) - verify_cpu
        idle_rss = rss_mb(pid)
        say(f"creating {len(tokens)} lookups, 64 at a time …")
        create_cpu = cpu_seconds(pid)
        hold = asyncio.run(create_lookups(unions.addresses, tokens))
        create_cpu = cpu_seconds(pid) - create_cpu
        say(f"{hold.created} created; sampling the union's RSS for {args.hold_seconds:g} s …")
        samples: list[float] = []
        for _ in range(max(1, int(args.hold_seconds / 0.5))):
            samples.append(rss_mb(pid))
            time.sleep(0.5)
        current = rss_mb(pid)
        peak = peak_rss_mb(pid)
        states = asyncio.run(sample_states(unions.addresses[0], hold.names))
    finally:
        say("stopping …")
        unions.stop()
        banks.stop()
    say("done")
    return {
        "lookups_in_flight": hold.created,
        "union_rss_mb": round(current, 1),
        "union_rss_mb_max_sampled": round(max(samples), 1),
        "union_peak_rss_mb": round(peak, 1),
        "union_rss_mb_before_creates": round(idle_rss, 1),
        "errors": dict(hold.errors),
        "seconds_to_create": round(hold.seconds_to_create, 1),
        "seconds_to_verify": round(seconds_to_verify, 1),
        # Where the time goes: the union's CPU per verified person and per created lookup.
        "union_cpu_ms_per_verification": round(verify_cpu * 1000 / len(people), 2),
        "union_cpu_ms_per_create": round(create_cpu * 1000 / max(1, hold.created), 2),
        "sampled_lookup_states": states,
        "population": population,
        "wall_seconds": round(time.monotonic() - began, 1),
    }


def plot(runs: list[Run], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(8, 4.5))
    for run in runs:
        if run.latencies_ms:
            axis.hist(run.latencies_ms, bins=60, alpha=0.6, label=f"{run.name} (n={run.completed})")
    axis.set_xlabel("time to report (ms)")
    axis.set_ylabel("lookups")
    axis.set_title("yijian chaka benchmark: time-to-report distribution")
    axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=110)


def table(runs: list[Run], hold: dict[str, Any] | None) -> str:
    """The figures for people: one line per phase."""
    lines = []
    if runs:
        lines.append(
            f"{'phase':26} {'lookups/s':>10} {'p50 ms':>9} {'p99 ms':>9} {'errors':>7} {'cores':>6}"
            "  cpu ms/lookup (cores busy)"
        )
    for run in runs:
        s = run.summary()
        busy = run.cores_busy_by_process
        cpu = " ".join(f"{name} {ms:g} ({busy[name]:.2f})" for name, ms in run.cpu_ms_per_lookup.items())
        lines.append(
            f"{run.name:26} {s['lookups_per_second']:>10.1f} {s['p50_ms']:>9.1f} {s['p99_ms']:>9.1f}"
            f" {sum(run.errors.values()):>7} {run.cores_busy:>6.2f}  {cpu}"
        )
    if hold is not None:
        lines.append(
            f"hold: {hold['lookups_in_flight']} lookups in flight, union RSS {hold['union_rss_mb']} MB"
            f" (peak {hold['union_peak_rss_mb']} MB), refused {sum(hold['errors'].values())}"
            f" {hold['errors'] or ''}, created in {hold['seconds_to_create']} s"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0] if __doc__ else None,
        epilog="--database-url should name a scratch database: the bench drops the union's tables in it "
        "before every union stack it starts.",
    )
    parser.add_argument("--concurrency", type=int, default=32, help="lookups in flight")
    parser.add_argument("--duration", type=float, default=20, help="seconds of load per measurement")
    parser.add_argument("--people", type=int, default=512, help="distinct verified people")
    parser.add_argument(
        "--population", type=int, default=5000, help="synthetic people the banks and the union know"
    )
    parser.add_argument("--bank-latency-ms", type=int, default=0)
    parser.add_argument(
        "--database-url",
        default="",
        help="the union's database; default: SQLite in the work directory. Give a SCRATCH PostgreSQL "
        "database: the bench empties the union's tables there (drops them and alembic_version) before "
        "each union stack starts",
    )
    parser.add_argument(
        "--replicas",
        type=parse_replicas,
        default=[1],
        help="union processes sharing the database; a comma list (e.g. 1,2) measures each count on a "
        "fresh stack. More than one needs PostgreSQL (default: 1)",
    )
    parser.add_argument(
        "--hold",
        type=int,
        default=0,
        help="then create this many lookups against banks that never answer in time and report the "
        "union's RSS while they are in flight (default 0: off)",
    )
    parser.add_argument("--hold-only", action="store_true", help="run only the --hold phase")
    parser.add_argument(
        "--hold-seconds",
        type=float,
        default=10,
        help="how long to sample RSS with the held lookups in flight",
    )
    parser.add_argument("--work-dir", type=Path, default=Path("data/bench"))
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    parser.add_argument(
        "--profile",
        action="store_true",
        help="profile each union stack's first replica (pyinstrument) into the work dir",
    )
    args = parser.parse_args(argv)
    postgres = args.database_url.startswith("postgresql")
    if max(args.replicas) > 1 and not postgres:
        raise SystemExit("several replicas need a shared PostgreSQL: --database-url postgresql+psycopg://…")
    if args.hold_only and args.hold <= 0:
        raise SystemExit("--hold-only needs --hold N")

    began = time.monotonic()
    result: dict[str, Any] = {
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "platform": platform.platform(),
        },
        "settings": {"database": "postgresql" if postgres else "sqlite", "hold": args.hold},
    }
    runs: list[Run] = []
    if not args.hold_only:
        result["settings"] |= {
            "concurrency": args.concurrency,
            "duration_s": args.duration,
            "people": args.people,
            "population": args.population,
            "bank_latency_ms": args.bank_latency_ms,
            "replicas": args.replicas,
        }
        runs = speed(args, result)
    hold = None
    if args.hold > 0:
        hold = result["hold"] = hold_in_flight(args)
    result["wall_seconds"] = round(time.monotonic() - began, 1)

    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "latest.json").write_text(json.dumps(result, indent=2, ensure_ascii=False) + "\n")
    wrote = [args.out / "latest.json"]
    if runs:
        plot(runs, args.out / "latency.png")
        wrote.append(args.out / "latency.png")
    print(json.dumps(result, indent=2, ensure_ascii=False))
    print()
    print(table(runs, hold))
    print(f"wrote {' and '.join(str(path) for path in wrote)}")
    return 0


def speed(args: argparse.Namespace, result: dict[str, Any]) -> list[Run]:
    """The baselines once, then the union once per replica count; fills `result`, returns the runs."""
    people = open_region_people(args.population, args.people)
    counts = ", ".join(str(n) for n in args.replicas)
    print(f"starting 16 banks; union replicas {counts} in turn; {len(people)} people …", flush=True)
    result["settings"]["people"] = len(people)
    banks = Banks(
        args.work_dir, args.population, [f"latency_ms={args.bank_latency_ms}"] if args.bank_latency_ms else []
    )
    by_replicas: dict[int, tuple[Run, list[float]]] = {}
    # PostgreSQL's own CPU is part of what a lookup costs the machine (it shares the cores here).
    postmaster = (
        postgres_server_pid(args.database_url) if args.database_url.startswith("postgresql") else None
    )
    banks.start()
    try:
        bank_pids = {"banks": [banks.pid]}
        per_call = measured(bank_pids, drive_bare(banks, people, args.concurrency, args.duration))
        multiplexed = measured(
            bank_pids, drive_bare_multiplexed(banks, people, args.concurrency, args.duration)
        )
        batched = measured(
            bank_pids, drive_bare_multiplexed(banks, people, args.concurrency, args.duration, batched=True)
        )
        for count in args.replicas:
            unions = Unions(args.work_dir, banks, args.database_url, count, f"r{count}", args.profile)
            try:
                unions.start()
                tokens = asyncio.run(verify_all(unions.addresses, unions.outbox, people))
                name = f"union ({count} replica{'s' if count > 1 else ''})"
                run = measured(
                    {"union": unions.pids, **bank_pids},
                    drive_union(unions.addresses, tokens, args.concurrency, args.duration, name),
                    postgres=postmaster,
                )
                by_replicas[count] = (run, [peak_rss_mb(pid) for pid in unions.pids])
            finally:
                unions.stop()
    finally:
        banks.stop()

    first, first_rss = by_replicas[args.replicas[0]]
    result["bare_per_call"] = per_call.summary()
    result["bare_multiplexed"] = multiplexed.summary()
    result["bare_batched"] = batched.summary()
    result["union"] = first.summary()  # the first count, as before --replicas took a list
    result["union_peak_rss_mb"] = round(max(first_rss), 1)
    result["union_by_replicas"] = {
        str(count): {
            **run.summary(),
            "peak_rss_mb": round(max(rss), 1),
            "peak_rss_mb_each": [round(mb, 1) for mb in rss],
        }
        for count, (run, rss) in by_replicas.items()
    }
    result["ratio_union_to_bare_multiplexed"] = ratio(first, multiplexed)
    result["ratio_union_to_bare_batched"] = ratio(first, batched)
    result["ratio_union_to_bare_per_call"] = ratio(first, per_call)
    result["ratio_multiplexed_to_per_call"] = ratio(multiplexed, per_call)
    result["ratio_batched_to_multiplexed"] = ratio(batched, multiplexed)
    if 1 in by_replicas and 2 in by_replicas:
        result["ratio_2_to_1_replicas"] = ratio(by_replicas[2][0], by_replicas[1][0])
    if args.bank_latency_ms:
        result["fanout_overhead_p50_ms"] = round(first.summary()["p50_ms"] - args.bank_latency_ms, 1)
    return [per_call, multiplexed, batched, *(run for run, _ in by_replicas.values())]


if __name__ == "__main__":
    # The load generator's own collector pauses (a full collection took ~90 ms) would land in the
    # latencies it measures: it runs with the servers' settings. (Here, not in main(): tests call
    # main() inside pytest's own process.)
    tune_garbage_collection()
    raise SystemExit(main())
