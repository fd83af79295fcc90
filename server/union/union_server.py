"""Assembles the union server: configuration → store, keys, domain services, orchestrator, gRPC.

Where a request goes: `api/servicers.py` (proto ↔ domain) → `domain/*.py` (rules)
→ `storage/` (SQL, behind the ports of `domain/ports.py`). Bank calls: `domain/orchestrator.py` →
`bank_gateway.py` (bankquery.v1 client).
"""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import cast

import grpc
from cardlookup.v1 import admin_service_pb2_grpc as admin_grpc
from cardlookup.v1 import card_action_service_pb2_grpc as action_grpc
from cardlookup.v1 import card_lookup_service_pb2_grpc as lookup_grpc
from cardlookup.v1 import identity_service_pb2_grpc as identity_grpc
from opentelemetry.trace import TracerProvider

from server.common import tracing
from server.common.admission import AdmissionControl
from server.common.grpc_runtime import ClientTls, GrpcServer, TlsFiles
from server.common.prometheus import MetricsEndpoint
from server.common.rpc_metrics import RpcMetrics, RpcObserver
from server.population.catalogue import BANKS, REGIONS
from server.union.api import connect
from server.union.api.servicers import AdminServicer, CardActionServicer, CardLookupServicer, IdentityServicer
from server.union.api.web import DEFAULT_WEB_ROOT, PagePolicy, WebApp, WebEndpoint
from server.union.bank_gateway import GrpcBankGateway
from server.union.clock import Clock, SystemClock
from server.union.domain.admin import AdminService, check_bank_addresses
from server.union.domain.audit import AuditTrail
from server.union.domain.banks import BankGateway
from server.union.domain.card_actions import CardActionPolicy, CardActionService
from server.union.domain.events import LookupEvents
from server.union.domain.identity import IdentityPolicy, IdentityService
from server.union.domain.lookups import LookupPolicy, LookupService
from server.union.domain.orchestrator import Orchestrator, OrchestratorPolicy
from server.union.domain.retention import RetentionPolicy, RetentionSweep
from server.union.keyring import Keys
from server.union.notify import SmsNotifier
from server.union.prometheus_metrics import PrometheusMetrics
from server.union.sms import FileSmsSink, SmsSender
from server.union.storage.credentials import AdminCredentialRepository, SessionStore
from server.union.storage.database import Store, StoreUnavailable, open_store

log = logging.getLogger(__name__)

SERVICE_NAMES = (
    "cardlookup.v1.IdentityService",
    "cardlookup.v1.CardLookupService",
    "cardlookup.v1.CardActionService",
    "cardlookup.v1.AdminService",
)
# Health entry of each bank as the union sees it: "bank/ICBC" (see UnionServer._watch_health).
BANK_HEALTH_PREFIX = "bank/"
ADMIN_TOKEN_ENV = "CARDLOOKUP_ADMIN_TOKEN"  # noqa: S105 (a variable name, not a secret)
DEFAULT_POPULATION_SEED = 20211201
DEFAULT_POPULATION_SIZE = 20_000


@dataclass
class UnionConfig:
    listen: str = "127.0.0.1:50051"
    data_dir: Path = Path("data")
    database_url: str = ""  # default: SQLite under data_dir
    bank_addresses: dict[str, str] = field(default_factory=dict)
    population_seed: int = DEFAULT_POPULATION_SEED
    population_size: int = DEFAULT_POPULATION_SIZE
    admin_token: str = ""  # default: $CARDLOOKUP_ADMIN_TOKEN, else a file in data_dir
    identity: IdentityPolicy = field(default_factory=IdentityPolicy)
    lookups: LookupPolicy = field(default_factory=LookupPolicy)
    orchestration: OrchestratorPolicy = field(default_factory=OrchestratorPolicy)
    card_actions: CardActionPolicy = field(default_factory=CardActionPolicy)
    retention: RetentionPolicy = field(default_factory=RetentionPolicy)
    tls: TlsFiles | None = None  # for clients of the union
    bank_tls: ClientTls | None = None  # mutual TLS towards the banks
    health_interval: timedelta = timedelta(seconds=2)
    # Admission control: calls and watch streams in progress before RESOURCE_EXHAUSTED.
    max_concurrent_calls: int = 512
    max_concurrent_watches: int = 2048
    # host:port for Prometheus to scrape over HTTP ("": no endpoint; port 0: any free port).
    metrics_listen: str = ""
    # host:port for Connect/gRPC-Web and the person's web page ("": no HTTP port; port 0: any free port).
    http_listen: str = ""
    # Origins besides the page's own that may call the API from a browser (CORS).
    http_allowed_origins: tuple[str, ...] = ()
    web_root: Path | None = DEFAULT_WEB_ROOT  # the built page (make web); None: API only
    # Traces (server/common/tracing.py): gRPC server and bank client spans, SQL statements. None: off.
    tracer_provider: TracerProvider | None = None

    @property
    def quota_window(self) -> timedelta:
        """How long quota slots are kept: the longest window any quota uses."""
        return max(self.identity.start_window, self.card_actions.closure_window)

    @property
    def effective_database_url(self) -> str:
        return self.database_url or f"sqlite:///{(self.data_dir / 'union.db').resolve()}"

    @property
    def sms_sink_path(self) -> Path:
        return self.data_dir / "sms-outbox.jsonl"

    def resolve_admin_token(self) -> str:
        """Explicit setting, else the environment, else a per-installation token file (mode 0600)."""
        if self.admin_token:
            return self.admin_token
        if token := os.environ.get(ADMIN_TOKEN_ENV):
            return token
        path = self.data_dir / "admin.token"
        if not path.exists():
            self.data_dir.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as handle:
                handle.write(secrets.token_urlsafe(24))
        return path.read_text().strip()


def default_bank_addresses(host: str = "127.0.0.1", base_port: int = 50061) -> dict[str, str]:
    """Where the demo's banks listen: one port each from base_port, in bank order."""
    return {bank.code: f"{host}:{base_port + index}" for index, bank in enumerate(BANKS)}


async def seed_identity_registry(store: Store, keys: Keys, seed: int, size: int) -> None:
    """Fill the simulated national ID registry (hashes only) from the shared synthetic population."""
    from server.population.generator import people

    if await store.identity_count() >= size:
        return
    batch: list[tuple[str, str, str, str]] = []
    for person in people(seed, size):
        batch.append(
            (
                keys.person_hash(person.resident_id_number),
                keys.attribute_hash("name", person.name),
                keys.attribute_hash("mobile", person.mobile_number),
                person.region_code,
            )
        )
        if len(batch) >= 5000:
            await store.add_identities(batch)
            batch = []
    if batch:
        await store.add_identities(batch)


def traced_store(store: Store, provider: TracerProvider | None) -> Store:
    """With tracing on: the store's calls as spans ("db.create_lookup", ...) and its SQL statements
    as their children. The store runs statements in a thread pool of its own, which is handed the
    caller's trace context here; writes that share one transaction (SQLite batches them) show up
    under the call that started the batch, and each waiting call has its own db.* span."""
    tracer = tracing.tracer(provider)
    if tracer is None:
        return store
    tracing.trace_engine(store.engine, provider)
    store.runner.wrap_executor(tracing.ContextExecutor)
    return cast(Store, tracing.TracedCalls(store, tracer, "db"))


class UnionServer:
    def __init__(
        self,
        config: UnionConfig,
        clock: Clock | None = None,
        gateway: BankGateway | None = None,
        sms: SmsSender | None = None,
    ) -> None:
        self.config = config
        self.clock = clock or SystemClock()
        self.keys = Keys.load(config.data_dir)
        self.store = traced_store(open_store(config.effective_database_url), config.tracer_provider)
        self.gateway = gateway or GrpcBankGateway(config.bank_tls, tracer_provider=config.tracer_provider)
        self.sms = sms or FileSmsSink(config.sms_sink_path, self.clock.now)
        self.events = LookupEvents()
        self.metrics = PrometheusMetrics()
        self.audit = AuditTrail(self.store, self.clock, self.keys)
        self.retention = RetentionSweep(
            self.store,
            config.retention,
            config.quota_window,
            self.sms if isinstance(self.sms, FileSmsSink) else None,
            extra={"sessions": self._purge_expired_sessions},
        )
        self.orchestrator = Orchestrator(
            self.store,
            self.gateway,
            self.keys,
            self.clock,
            self.events,
            config.orchestration,
            notifier=SmsNotifier(self.sms, config.retention.report_days),
            audit=self.audit,
            metrics=self.metrics,
            retention=self.retention,
        )
        self.metrics.watch_live_state(
            self.orchestrator.bank_calls_in_flight,
            self.orchestrator.lookups_in_flight,
            self.events.watched_count,
        )
        self.identity = IdentityService(
            self.store, self.keys, self.sms, self.clock, config.identity, self.audit, SessionStore(self.store)
        )
        self.lookups = LookupService(
            self.store,
            self.keys,
            self.clock,
            self.events,
            self.orchestrator,
            config.lookups,
            self.audit,
            self.metrics,
        )
        self.card_actions = CardActionService(
            self.store, self.keys, self.clock, self.events, self.orchestrator, self.audit, config.card_actions
        )
        self.admin = AdminService(
            self.store, self.clock, self.keys, AdminCredentialRepository(self.store), self.audit
        )
        self.admission = AdmissionControl(config.max_concurrent_calls, config.max_concurrent_watches)
        # One observer for both ports: a call is counted alike whichever way it came.
        self.rpc_observer = RpcObserver("union", RpcMetrics(self.metrics.registry))
        self.grpc = GrpcServer(
            config.listen,
            SERVICE_NAMES,
            self._register,
            tls=config.tls,
            interceptors=[self.admission],
            observers=[
                self.rpc_observer,
                *tracing.server_interceptors(config.tracer_provider),
            ],
        )
        self._health_task: asyncio.Task[None] | None = None
        self._metrics_endpoint: MetricsEndpoint | None = None
        self._web: WebEndpoint | None = None
        self._stopped = False

    def _register(self, server: grpc.aio.Server) -> None:
        identity_grpc.add_IdentityServiceServicer_to_server(IdentityServicer(self.identity), server)
        lookup_grpc.add_CardLookupServiceServicer_to_server(
            CardLookupServicer(self.identity, self.lookups), server
        )
        action_grpc.add_CardActionServiceServicer_to_server(
            CardActionServicer(self.identity, self.card_actions), server
        )
        admin_grpc.add_AdminServiceServicer_to_server(AdminServicer(self.admin, self.audit), server)

    async def _purge_expired_sessions(self, now: datetime) -> int:
        return await self.identity.purge_expired_sessions(now)

    @property
    def address(self) -> str:
        return self.grpc.address

    @property
    def http_address(self) -> str | None:
        """host:port of the Connect/gRPC-Web API and the web page, if this union serves HTTP."""
        return self._web.address if self._web is not None else None

    async def _start_web(self) -> None:
        """The same servicers behind Connect on the HTTP port (AdminService stays gRPC-only)."""
        services = connect.applications(
            IdentityServicer(self.identity),
            CardLookupServicer(self.identity, self.lookups),
            CardActionServicer(self.identity, self.card_actions),
            self.admission,
            self.rpc_observer,
            tracing.tracer(self.config.tracer_provider),
        )
        policy = PagePolicy(self.config.retention.report_days, self.config.lookups.requery_cooldown)
        app = WebApp(services, self.config.web_root, self.config.http_allowed_origins, policy)
        self._web = WebEndpoint(app, self.config.http_listen)
        await self._web.start()

    @property
    def metrics_address(self) -> str | None:
        """Where Prometheus scrapes this union (host:port of `GET /metrics`), if it serves metrics."""
        return self._metrics_endpoint.address if self._metrics_endpoint is not None else None

    async def start(self) -> None:
        await asyncio.to_thread(self.store.migrate)
        await self.store.seed_catalogue(BANKS, self.config.bank_addresses, REGIONS, self.clock.now())
        if self.config.bank_addresses:
            check_bank_addresses(self.config.bank_addresses, await self.store.list_banks())
            await self.store.set_bank_addresses(self.config.bank_addresses)
        await seed_identity_registry(
            self.store, self.keys, self.config.population_seed, self.config.population_size
        )
        # The configured admin token keeps working: it is the operator credential "bootstrap".
        await self.admin.ensure_bootstrap_credential(self.config.resolve_admin_token())
        await self.grpc.start()
        self.metrics.watch_database(
            lambda: self.store.monitoring_totals(self.clock.now()), asyncio.get_running_loop()
        )
        if self.config.http_listen:
            await self._start_web()
        if self.config.metrics_listen:
            self._metrics_endpoint = MetricsEndpoint(self.metrics.registry, self.config.metrics_listen)
        self.orchestrator.start()
        self._health_task = asyncio.create_task(self._watch_health(), name="union-health")
        log.info(
            "union started",
            extra={
                "address": self.address,
                "database": self.store.engine.dialect.name,
                "metrics": self.metrics_address or "off",
                "http": self.http_address or "off",
            },
        )

    async def _watch_health(self) -> None:
        """Health follows the database: NOT_SERVING while it cannot be reached. Each bank has an
        entry of its own, `bank/<code>` (SERVING while the bank's own health check answers
        SERVING), and the `cardlookup_bank_up` gauge: a bank that is down makes reports partial,
        not the union unavailable, so it does not change the union's own status."""
        serving = True
        banks_up: dict[str, bool] = {}
        interval = self.config.health_interval.total_seconds()
        while True:
            await self._check_banks(banks_up, call_timeout=min(1.0, interval))
            await asyncio.sleep(interval)
            healthy = await self.store.ping()
            if healthy != serving:
                serving = healthy
                log.warning("database reachability changed", extra={"reachable": healthy})
                await self.grpc.set_serving(healthy)

    async def _check_banks(self, banks_up: dict[str, bool], call_timeout: float) -> None:
        try:
            banks = await self.store.list_banks()
        except StoreUnavailable:
            return  # the database check reports that
        results = await asyncio.gather(
            *(self.gateway.reachable(bank, call_timeout) for bank in banks), return_exceptions=True
        )
        for bank, result in zip(banks, results, strict=True):
            up = result is True  # a check that could not even be made (a bad address) is down
            self.metrics.bank_reachable(bank.code, up)
            if banks_up.get(bank.code) != up:
                if bank.code in banks_up or not up:
                    log.warning("bank reachability changed", extra={"bank": bank.code, "reachable": up})
                banks_up[bank.code] = up
                await self.grpc.set_status(f"{BANK_HEALTH_PREFIX}{bank.code}", up)

    async def stop(self, grace: float = 5.0) -> None:
        """Graceful: health NOT_SERVING, drain RPCs, let bank calls finish (or lapse), close.

        Safe to call twice (tests stop a union mid-lookup, and the fixture stops it again)."""
        if self._stopped:
            return
        self._stopped = True
        if self._health_task is not None:
            self._health_task.cancel()
            await asyncio.gather(self._health_task, return_exceptions=True)
        if self._web is not None:
            await self._web.stop(grace)
        await self.grpc.stop(grace)
        await self.orchestrator.stop(grace)
        await self.gateway.close()
        if self._metrics_endpoint is not None:
            await self._metrics_endpoint.close()
        await self.store.close()
