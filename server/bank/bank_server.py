"""Start simulated bank servers: one bank, or all 16 in one process.

Even when hosted in one process, every bank has its own gRPC server and port,
its own store and its own fault settings, so to the union they are separate
systems.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import grpc
from bankquery.v1 import bank_query_service_pb2_grpc as pb_grpc
from opentelemetry.trace import TracerProvider

from server.bank.faults import FaultControl, FaultSettings, control_file
from server.bank.service import SERVICE_NAME, BankQueryServicer
from server.bank.store import BankStore, default_database_url, seed_stores
from server.common import tracing
from server.common.grpc_runtime import GrpcServer, TlsFiles
from server.common.rpc_metrics import RpcMetrics, RpcObserver
from server.population.catalogue import BANKS, BANKS_BY_CODE, BankInfo

log = logging.getLogger(__name__)

# The seed and population size the demo uses everywhere (the pilot launched 2021-12-01).
DEFAULT_SEED = 20211201
DEFAULT_POPULATION = 20000
DEFAULT_DATA_DIR = Path("data/banks")
DEFAULT_BASE_PORT = 50061


@dataclass
class RunningBank:
    bank_code: str
    servicer: BankQueryServicer
    store: BankStore
    server: GrpcServer
    control: FaultControl | None = None

    @property
    def address(self) -> str:
        return self.server.address

    @property
    def port(self) -> int:
        return self.server.port

    async def stop(self, grace: float = 2.0) -> None:
        if self.control is not None:
            await self.control.stop()
        await self.server.stop(grace)
        self.store.close()


def _open_store(
    bank_code: str, database_url: str | None, data_dir: Path, joining: Mapping[str, BankInfo]
) -> BankStore:
    if bank_code not in BANKS_BY_CODE and bank_code not in joining:
        raise ValueError(f"unknown bank {bank_code!r}: give its name and BINs (a bank that joins later)")
    if database_url is None:
        data_dir.mkdir(parents=True, exist_ok=True)
        database_url = default_database_url(data_dir, bank_code)
    store = BankStore(bank_code, database_url)
    store.create_schema()
    return store


def _prepare_stores(
    bank_codes: list[str],
    database_urls: Mapping[str, str],
    data_dir: Path,
    seed: int,
    size: int,
    joining: Mapping[str, BankInfo] | None = None,
) -> dict[str, BankStore]:
    """Open every store and seed the empty ones together, in one pass over the population.
    `joining`: the banks outside the built-in 16 among them, as their configuration describes them."""
    joining = joining or {}
    stores = {code: _open_store(code, database_urls.get(code), data_dir, joining) for code in bank_codes}
    empty = {code: store for code, store in stores.items() if store.is_empty()}
    if empty:
        added = seed_stores(empty, seed, size, joining)
        log.info("seeded bank stores", extra={"customers": added, "seed": seed, "population": size})
    return stores


async def _start(
    store: BankStore,
    address: str,
    tls: TlsFiles | None,
    faults: FaultSettings | None,
    data_dir: Path,
    rpc_metrics: RpcMetrics | None = None,
    tracer_provider: TracerProvider | None = None,
) -> RunningBank:
    servicer = BankQueryServicer(store.bank_code, store, faults)
    servicer.tracer = tracing.tracer(tracer_provider)

    def register(server: grpc.aio.Server) -> None:
        pb_grpc.add_BankQueryServiceServicer_to_server(servicer, server)

    def apply(settings: FaultSettings) -> None:
        servicer.faults = settings

    # Run-time fault changes from another process arrive through the bank's control file.
    control = FaultControl(control_file(data_dir, store.bank_code), apply, servicer.faults)
    control.check()
    observer = RpcObserver(store.bank_code, rpc_metrics)
    server = GrpcServer(
        address,
        [SERVICE_NAME],
        register,
        tls=tls,
        observers=[observer, *tracing.server_interceptors(tracer_provider)],
    )
    # A bank in outage answers every call UNAVAILABLE; its own health says so while it lasts.
    server.follow_serving(lambda: not servicer.faults.outage)
    servicer.on_faults_changed(lambda _: server.serving_changed())
    await server.start()
    control.start()
    return RunningBank(
        bank_code=store.bank_code, servicer=servicer, store=store, server=server, control=control
    )


async def start_bank(
    bank_code: str,
    address: str = "127.0.0.1:0",
    database_url: str | None = None,
    data_dir: Path = DEFAULT_DATA_DIR,
    seed: int = DEFAULT_SEED,
    size: int = DEFAULT_POPULATION,
    tls: TlsFiles | None = None,
    faults: FaultSettings | None = None,
    rpc_metrics: RpcMetrics | None = None,
    bank_info: BankInfo | None = None,
    tracer_provider: TracerProvider | None = None,
) -> RunningBank:
    """Open (and seed, if empty) one bank's store and serve it at `address`; its calls are counted
    in `rpc_metrics` when given, and logged on the access log either way; traced with
    `tracer_provider` when given. `bank_info` describes a bank outside the built-in 16 (a bank that
    joins later: its names and BINs)."""
    urls = {bank_code: database_url} if database_url else {}
    joining = {bank_code: bank_info} if bank_info is not None else {}
    stores = await asyncio.to_thread(_prepare_stores, [bank_code], urls, data_dir, seed, size, joining)
    try:
        return await _start(stores[bank_code], address, tls, faults, data_dir, rpc_metrics, tracer_provider)
    except BaseException:
        stores[bank_code].close()
        raise


async def start_all_banks(
    data_dir: Path = DEFAULT_DATA_DIR,
    seed: int = DEFAULT_SEED,
    size: int = DEFAULT_POPULATION,
    host: str = "127.0.0.1",
    base_port: int = 0,
    tls: Mapping[str, TlsFiles] | None = None,
    faults: Mapping[str, FaultSettings] | None = None,
    bank_codes: list[str] | None = None,
    rpc_metrics: RpcMetrics | None = None,
    tracer_provider: TracerProvider | None = None,
) -> list[RunningBank]:
    """Every bank (in catalogue order) on its own port: base_port + i, or any free port if base_port is 0."""
    codes = bank_codes or [bank.code for bank in BANKS]
    stores = await asyncio.to_thread(_prepare_stores, codes, {}, data_dir, seed, size)
    running: list[RunningBank] = []
    try:
        for offset, code in enumerate(codes):
            port = base_port + offset if base_port else 0
            running.append(
                await _start(
                    stores[code],
                    f"{host}:{port}",
                    (tls or {}).get(code),
                    (faults or {}).get(code),
                    data_dir,
                    rpc_metrics,
                    tracer_provider,
                )
            )
    except BaseException:
        for bank in running:
            await bank.stop(0)
        for code in codes[len(running) :]:
            stores[code].close()
        raise
    return running
