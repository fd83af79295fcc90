"""`make bench`: how fast is a lookup, end to end, through the real public API?

Starts the 16 banks (one process) and the union (its own process) on loopback,
verifies N simulated people once each, then keeps C lookups in flight for D
seconds (create → watch until the report is ready, person after person) and
measures completed lookups/s, time-to-report percentiles, errors by status
code, CPU per lookup of each process and the union's peak RSS. In the same run,
before the union, it measures two bare baselines: the same banks driven by a
minimal fan-out with no persistence, auth or masking, first with one QueryCards
call per bank per lookup ("bare per-call"), then with one long-lived
QuerySession stream per bank carrying every lookup's query ("bare
multiplexed"). It prints the ratios between the three. Timings are never
asserted: these machines are shared and noisy, so ratios against baselines
from the same run are what to compare.

    python -m bench.run --concurrency 32 --duration 20 [--bank-latency-ms 50] [--database-url ...]
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
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
from bankquery.v1 import bank_query_service_pb2 as bank_pb
from bankquery.v1 import bank_query_service_pb2_grpc as bank_grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from clients.client import CardLookupClient, CardLookupError
from server.population.catalogue import PILOT_REGIONS
from server.population.generator import Person, person_at
from server.union.sms import read_one_time_code

SEED = 20211201
OPEN = {r.code for r in PILOT_REGIONS}
STATUS_NAMES = {code.value[0]: code.name for code in grpc.StatusCode}


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


def peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return 0.0


def cpu_seconds(pid: int) -> float:
    """User + system CPU time a process has used so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


@dataclass
class Run:
    name: str
    completed: int = 0
    seconds: float = 0.0
    latencies_ms: list[float] = field(default_factory=list)
    errors: Counter[str] = field(default_factory=Counter)
    cpu_ms_per_lookup: dict[str, float] = field(default_factory=dict)

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
        }


class Stack:
    """The banks and the union as child processes."""

    def __init__(
        self,
        work: Path,
        population: int,
        bank_latency_ms: int,
        database_url: str,
        replicas: int,
        profile: bool = False,
    ) -> None:
        self.work = work
        self.base = free_block(16 + replicas + 2)
        self.bank_base = self.base + replicas + 1
        self.union_addresses = [f"127.0.0.1:{self.base + i}" for i in range(replicas)]
        self.population = population
        self.bank_latency_ms = bank_latency_ms
        self.database_url = database_url
        self.processes: list[subprocess.Popen[bytes]] = []
        self.union_pids: list[int] = []
        self.bank_pid = 0
        self.profile = profile

    def start(self) -> None:
        env = {**os.environ, "CARDLOOKUP_MASTER_KEY": "42" * 32, "CARDLOOKUP_ADMIN_TOKEN": "bench-admin"}
        union_env = dict(env)
        if self.profile:
            union_env["CARDLOOKUP_PROFILE"] = str(self.work / "union-profile.txt")
        logs = self.work / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        bank_cmd = [
            sys.executable,
            "-m",
            "server.bank.main",
            "serve",
            "--all",
            "--base-port",
            str(self.bank_base),
            "--data-dir",
            str(self.work / "banks"),
            "--population",
            str(self.population),
        ]
        if self.bank_latency_ms:
            bank_cmd += ["--fault", f"latency_ms={self.bank_latency_ms}"]
        self.bank_pid = self._spawn(bank_cmd, logs / "banks.log", env).pid
        for index, address in enumerate(self.union_addresses):
            union_cmd = [
                sys.executable,
                "-m",
                "server.union.main",
                "serve",
                "--listen",
                address,
                "--data-dir",
                str(self.work / "union"),
                "--bank-base-port",
                str(self.bank_base),
                "--population-size",
                str(self.population),
                "--requery-cooldown-hours",
                "0",
                "--log-level",
                "WARNING",
            ]
            if self.database_url:
                union_cmd += ["--database-url", self.database_url]
            process = self._spawn(union_cmd, logs / f"union-{index}.log", union_env if index == 0 else env)
            self.union_pids.append(process.pid)
            if index == 0:
                asyncio.run(wait_serving([address]))  # the first replica migrates; the others follow
        asyncio.run(
            wait_serving(self.union_addresses + [f"127.0.0.1:{self.bank_base + i}" for i in range(16)])
        )

    def _spawn(self, command: list[str], log: Path, env: dict[str, str]) -> subprocess.Popen[bytes]:
        with log.open("ab") as handle:
            process = subprocess.Popen(command, stdout=handle, stderr=subprocess.STDOUT, env=env)  # noqa: S603
        self.processes.append(process)
        return process

    def stop(self) -> None:
        for process in self.processes:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        for process in self.processes:
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                process.kill()


async def wait_serving(addresses: list[str]) -> None:
    async def one(address: str) -> None:
        async with grpc.aio.insecure_channel(address) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            for _ in range(600):
                try:
                    response = await stub.Check(health_pb2.HealthCheckRequest(), timeout=1)
                    if response.status == health_pb2.HealthCheckResponse.SERVING:
                        return
                except grpc.aio.AioRpcError:
                    pass
                await asyncio.sleep(0.2)
        raise SystemExit(f"{address} never became healthy")

    await asyncio.gather(*(one(a) for a in addresses))


async def verify_all(stack: Stack, people: list[Person]) -> list[str]:
    gate = asyncio.Semaphore(32)
    outbox = stack.work / "union" / "sms-outbox.jsonl"

    async def one(index: int, person: Person) -> str:
        async with (
            gate,
            CardLookupClient(stack.union_addresses[index % len(stack.union_addresses)]) as client,
        ):
            started = await client.start_verification(
                person.name, person.resident_id_number, person.mobile_number
            )
            code = read_one_time_code(outbox, person.mobile_number)
            assert code is not None
            await client.complete_verification(started.verification_id, code)
            assert client.session_token is not None
            return client.session_token

    return await asyncio.gather(*(one(i, p) for i, p in enumerate(people)))


async def drive_union(stack: Stack, tokens: list[str], concurrency: int, duration: float) -> Run:
    run = Run("union")
    deadline = time.monotonic() + duration
    clients = [
        CardLookupClient(stack.union_addresses[i % len(stack.union_addresses)], retries=0)
        for i in range(concurrency)
    ]

    async def worker(index: int) -> None:
        client = clients[index]
        mine = tokens[index::concurrency]
        turn = 0
        while time.monotonic() < deadline:
            client.session_token = mine[turn % len(mine)]
            turn += 1
            started = time.monotonic()
            try:
                lookup = await client.create_lookup(request_id=uuid.uuid4().hex)
                async for event in client.watch_lookup(lookup.name, stream_timeout=60):
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


async def drive_bare(stack: Stack, people: list[Person], concurrency: int, duration: float) -> Run:
    """The per-call floor: one QueryCards call to each of the 16 banks per lookup, waiting for
    every stream; nothing else."""
    run = Run("bare per-call fan-out")
    channels = [grpc.aio.insecure_channel(f"127.0.0.1:{stack.bank_base + i}") for i in range(16)]
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
    """One QuerySession stream to one bank: `ask` sends a query, a reader task resolves its answer.

    The requests go through a queue into the call's request iterator, so the stream has exactly
    one writer however many lookups are asking at once.
    """

    def __init__(self, stub: bank_grpc.BankQueryServiceAsyncStub) -> None:
        self._outbox: asyncio.Queue[bank_pb.QuerySessionRequest | None] = asyncio.Queue()
        self._waiting: dict[str, asyncio.Future[bank_pb.QuerySessionResponse]] = {}
        self._call = stub.QuerySession(self._requests())
        self._failure: grpc.aio.AioRpcError | None = None
        self._reader = asyncio.create_task(self._read())

    async def _requests(self) -> AsyncIterator[bank_pb.QuerySessionRequest]:
        while (request := await self._outbox.get()) is not None:
            yield request

    async def _read(self) -> None:
        try:
            async for response in self._call:
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
    stack: Stack, people: list[Person], concurrency: int, duration: float
) -> Run:
    """The floor with per-RPC cost taken out: one QuerySession stream per bank carries every
    lookup's query; a lookup sends its query to all 16 streams and waits for the 16 answers."""
    run = Run("bare multiplexed fan-out")
    channels = [grpc.aio.insecure_channel(f"127.0.0.1:{stack.bank_base + i}") for i in range(16)]
    streams = [SessionStream(bank_grpc.BankQueryServiceStub(c)) for c in channels]
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


def measured(stack: Stack, run_phase: Any) -> Run:
    """Run one phase and attribute the CPU each process spent to the lookups it completed."""
    pids = {"union": stack.union_pids, "banks": [stack.bank_pid], "load": [os.getpid()]}
    before = {name: sum(cpu_seconds(p) for p in group) for name, group in pids.items()}
    run: Run = asyncio.run(run_phase)
    after = {name: sum(cpu_seconds(p) for p in group) for name, group in pids.items()}
    if run.completed:
        run.cpu_ms_per_lookup = {
            name: round((after[name] - before[name]) * 1000 / run.completed, 2) for name in pids
        }
    return run


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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--concurrency", type=int, default=32, help="lookups in flight")
    parser.add_argument("--duration", type=float, default=20, help="seconds of load per measurement")
    parser.add_argument("--people", type=int, default=512, help="distinct verified people")
    parser.add_argument("--population", type=int, default=5000)
    parser.add_argument("--bank-latency-ms", type=int, default=0)
    parser.add_argument("--database-url", default="", help="default: SQLite in the work directory")
    parser.add_argument("--replicas", type=int, default=1, help="union processes sharing the database")
    parser.add_argument("--work-dir", type=Path, default=Path("data/bench"))
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    parser.add_argument(
        "--profile", action="store_true", help="profile the union (pyinstrument) into the work dir"
    )
    args = parser.parse_args(argv)
    if args.replicas > 1 and not args.database_url.startswith("postgresql"):
        raise SystemExit("several replicas need a shared PostgreSQL: --database-url postgresql+psycopg://…")

    shutil.rmtree(args.work_dir / "union", ignore_errors=True)
    stack = Stack(
        args.work_dir, args.population, args.bank_latency_ms, args.database_url, args.replicas, args.profile
    )
    people = [p for p in (person_at(SEED, i) for i in range(5, args.population)) if p.region_code in OPEN]
    people = people[: args.people]
    print(f"starting 16 banks and {args.replicas} union replica(s); {len(people)} people …", flush=True)
    stack.start()
    try:
        tokens = asyncio.run(verify_all(stack, people))
        per_call = measured(stack, drive_bare(stack, people, args.concurrency, args.duration))
        multiplexed = measured(stack, drive_bare_multiplexed(stack, people, args.concurrency, args.duration))
        union = measured(stack, drive_union(stack, tokens, args.concurrency, args.duration))
        rss = max(peak_rss_mb(pid) for pid in stack.union_pids)
    finally:
        stack.stop()

    result = {
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "platform": platform.platform(),
        },
        "settings": {
            "concurrency": args.concurrency,
            "duration_s": args.duration,
            "people": len(people),
            "bank_latency_ms": args.bank_latency_ms,
            "database": "postgresql" if args.database_url.startswith("postgresql") else "sqlite",
            "replicas": args.replicas,
        },
        "bare_per_call": per_call.summary(),
        "bare_multiplexed": multiplexed.summary(),
        "union": union.summary(),
        "union_peak_rss_mb": round(rss, 1),
        "ratio_union_to_bare_multiplexed": ratio(union, multiplexed),
        "ratio_union_to_bare_per_call": ratio(union, per_call),
        "ratio_multiplexed_to_per_call": ratio(multiplexed, per_call),
    }
    if args.bank_latency_ms:
        result["fanout_overhead_p50_ms"] = round(union.summary()["p50_ms"] - args.bank_latency_ms, 1)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "latest.json").write_text(json.dumps(result, indent=2, ensure_ascii=False) + "\n")
    plot([per_call, multiplexed, union], args.out / "latency.png")
    print(json.dumps(result, indent=2, ensure_ascii=False))
    for run in (per_call, multiplexed, union):
        print(f"{run.name:28} {rate(run):8.1f} lookups/s  cpu ms/lookup {run.cpu_ms_per_lookup}")
    print(f"wrote {args.out / 'latest.json'} and {args.out / 'latency.png'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
