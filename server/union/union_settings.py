"""The union's configuration file (config/union.example.toml shows every key), mapped onto the
dataclasses the rest of the union already takes: UnionConfig and its policies.

Tables: [server] [http] [database] [population] [banks.<CODE>] [bank_tls] [identity] [lookups]
[orchestration] [card_actions] [retention] [metrics] [tracing] [logging]; environment variables
`CARDLOOKUP_UNION_<TABLE>__<KEY>` override the file, and `cardlookup-union serve`'s flags override
both (server/common/config_file.py). Regions are not configured here: the catalogue opens the pilot
regions at the first start, and operators open and close regions at run time (AdminService).
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Annotated, Any

from pydantic import AfterValidator, Field, PositiveFloat, PositiveInt, field_validator
from pydantic_settings import SettingsConfigDict
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError

from server.common.config_file import (
    ConfigError,
    FileSettings,
    HostPort,
    LoggingSettings,
    MetricsSettings,
    OptionalHostPort,
    Table,
    TracingSettings,
)
from server.common.dev_ca import union_client_tls, union_server_tls
from server.common.grpc_runtime import ClientTls, TlsFiles
from server.common.shapes import BANK_CODE, DNS_NAME, is_bank_address
from server.population.catalogue import BANKS
from server.union.domain.card_actions import CardActionPolicy
from server.union.domain.identity import IdentityPolicy
from server.union.domain.lookups import LookupPolicy
from server.union.domain.orchestrator import OrchestratorPolicy
from server.union.domain.retention import DEFAULT_RETENTION_DAYS, DEFAULT_TIMEZONE, RetentionPolicy
from server.union.union_server import DEFAULT_POPULATION_SEED, DEFAULT_POPULATION_SIZE, UnionConfig

ENV_PREFIX = "CARDLOOKUP_UNION_"
DEFAULT_BANK_HOST = "127.0.0.1"
DEFAULT_BANK_BASE_PORT = 50061


def _database_url(value: str) -> str:
    if value:
        try:
            make_url(value)
        except ArgumentError:
            raise ValueError("not a SQLAlchemy database URL (e.g. postgresql+psycopg://…)") from None
    return value


def _tls_name(value: str) -> str:
    if value and not DNS_NAME.fullmatch(value):
        raise ValueError("expected a lower-case DNS name, e.g. icbc.bank.cardlookup.test")
    return value


def _bank_address(value: str) -> str:
    if not is_bank_address(value):
        raise ValueError("expected host:port (a port 1-65535; an IPv6 host in brackets, [::1]:50061)")
    return value


class ServerSettings(Table):
    # gRPC: cardlookup.v1, health checking and reflection.
    listen: HostPort = "127.0.0.1:50051"
    # SQLite database (unless [database] url), keys, the admin token, the development SMS outbox.
    data_dir: Path = Path("data")
    # union-server.crt/.key (a development PKI: python -m server.common.dev_ca DIR): TLS for clients.
    tls_dir: Path | None = None
    # Calls and watch streams in progress before RESOURCE_EXHAUSTED (admission control).
    max_concurrent_calls: PositiveInt = 512
    max_concurrent_watches: PositiveInt = 2048
    # How often the database and every bank's health are checked.
    health_interval_seconds: PositiveFloat = 2


class HttpSettings(Table):
    # Connect and gRPC-Web (browsers, curl) and the person's web page; "" for none.
    listen: OptionalHostPort = ""
    # Browser origins besides the page's own that may call the API (CORS).
    allowed_origins: tuple[str, ...] = ()


class DatabaseSettings(Table):
    # SQLAlchemy URL, e.g. postgresql+psycopg://user:password@host/db; "" for SQLite in data_dir.
    url: Annotated[str, AfterValidator(_database_url)] = ""


class PopulationSettings(Table):
    # The synthetic national ID registry (keyed hashes only); must match the banks' population.
    seed: int = DEFAULT_POPULATION_SEED
    size: PositiveInt = DEFAULT_POPULATION_SIZE


class BankSettings(Table):
    # Where the bank's bankquery.v1 server listens (checked as AdminService.UpdateBank checks it).
    address: Annotated[str, AfterValidator(_bank_address)]
    # The name the bank's certificate must carry under mutual TLS; "" for <code>.bank.cardlookup.test.
    tls_name: Annotated[str, AfterValidator(_tls_name)] = ""


class BankTlsSettings(Table):
    # Mutual TLS towards the banks: ca.crt, union-client.crt/.key in this directory; none: plaintext.
    dir: Path | None = None


class IdentitySettings(Table):
    """Verification quotas (IdentityPolicy)."""

    code_ttl_seconds: PositiveFloat = 300
    max_code_attempts: PositiveInt = 5
    # One-time codes sent to one phone, and "does not match" answers for one identity, per window.
    max_starts_per_window: PositiveInt = 5
    max_mismatches_per_window: PositiveInt = 5
    start_window_seconds: PositiveFloat = 3600
    session_ttl_seconds: PositiveFloat = 1800


class LookupSettings(Table):
    """LookupPolicy."""

    # Hours before a person may look up again after a lookup completed (the pilot: 7 days).
    requery_cooldown_hours: float = Field(default=168, ge=0)
    watch_poll_interval_seconds: PositiveFloat = 1
    watch_coalesce_seconds: float = Field(default=0.005, ge=0)


class OrchestrationSettings(Table):
    """Deadlines and retries of the fan-out (OrchestratorPolicy)."""

    lookup_deadline_hours: PositiveFloat = 24
    call_timeout_seconds: PositiveFloat = 10
    lease_margin_seconds: float = Field(default=5, ge=0)
    backoff_base_seconds: PositiveFloat = 1
    backoff_max_seconds: PositiveFloat = 600
    truncated_answer_attempts: PositiveInt = 3
    max_concurrent_card_actions: PositiveInt = 256
    max_calls_per_bank: PositiveInt = 512
    poll_interval_seconds: PositiveFloat = 1


class CardActionSettings(Table):
    """CardActionPolicy."""

    answer_wait_seconds: float = Field(default=3, ge=0)
    deadline_hours: PositiveFloat = 24
    max_closures_per_hour: PositiveInt = 10


class RetentionSettings(Table):
    """How long each kind of data is kept (RetentionPolicy; docs/privacy-and-security.md)."""

    report_days: PositiveInt = DEFAULT_RETENTION_DAYS
    timezone: str = DEFAULT_TIMEZONE
    verifications_hours: PositiveFloat = 24
    card_actions_days: PositiveFloat = 30
    notifications_hours: PositiveFloat = 24
    audit_days: PositiveFloat = 180
    sms_outbox_hours: PositiveFloat = 24
    sweep_interval_minutes: PositiveFloat = 10

    @field_validator("timezone")
    @classmethod
    def _known_zone(cls, value: str) -> str:
        try:
            RetentionPolicy(timezone=value)
        except (ValueError, KeyError):  # ZoneInfoNotFoundError is a KeyError
            raise ValueError("not a known IANA time zone, e.g. Asia/Shanghai") from None
        return value


class UnionSettings(FileSettings):
    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX, env_nested_delimiter="__", extra="forbid", frozen=True
    )

    server: ServerSettings = ServerSettings()
    http: HttpSettings = HttpSettings()
    database: DatabaseSettings = DatabaseSettings()
    population: PopulationSettings = PopulationSettings()
    # [banks.ICBC] address = "…": every bank the union calls. None listed: the demo's loopback
    # ports (127.0.0.1:50061 onwards, in catalogue order).
    banks: dict[str, BankSettings] = Field(default_factory=dict)
    bank_tls: BankTlsSettings = BankTlsSettings()
    identity: IdentitySettings = IdentitySettings()
    lookups: LookupSettings = LookupSettings()
    orchestration: OrchestrationSettings = OrchestrationSettings()
    card_actions: CardActionSettings = CardActionSettings()
    retention: RetentionSettings = RetentionSettings()
    metrics: MetricsSettings = MetricsSettings()
    tracing: TracingSettings = TracingSettings()
    logging: LoggingSettings = LoggingSettings()

    @field_validator("banks", mode="before")
    @classmethod
    def _bank_codes(cls, value: Any) -> Any:
        if not isinstance(value, dict):
            return value
        # A bank that joined through AdminService.CreateBank is in the catalogue, not in BANKS_BY_CODE:
        # the shape is checked here, the catalogue itself when the union starts (UnknownBankCodes).
        malformed = [code for code in value if not BANK_CODE.fullmatch(str(code).upper())]
        if malformed:
            raise ValueError(f"{len(malformed)} key(s): not a bank code (2-16 letters, e.g. ICBC)")
        return {str(code).upper(): entry for code, entry in value.items()}

    def bank_addresses(self) -> dict[str, str]:
        if self.banks:
            return {code: bank.address for code, bank in self.banks.items()}
        return {
            bank.code: f"{DEFAULT_BANK_HOST}:{DEFAULT_BANK_BASE_PORT + index}"
            for index, bank in enumerate(BANKS)
        }

    def _bank_tls(self, source: Callable[[str], str]) -> ClientTls | None:
        if self.bank_tls.dir is None:
            return None
        try:
            tls = union_client_tls(self.bank_tls.dir)
        except FileNotFoundError as error:
            raise ConfigError([f"{source('bank_tls.dir')}: {error.filename} is missing"]) from None
        names = {code: bank.tls_name for code, bank in self.banks.items() if bank.tls_name}
        return ClientTls(tls.root_ca, tls.cert_chain, tls.private_key, names)

    def _server_tls(self, source: Callable[[str], str]) -> TlsFiles | None:
        if self.server.tls_dir is None:
            return None
        try:
            return union_server_tls(self.server.tls_dir)
        except FileNotFoundError as error:
            raise ConfigError([f"{source('server.tls_dir')}: {error.filename} is missing"]) from None

    def union_config(self, source: Callable[[str], str] = str) -> UnionConfig:
        """The UnionConfig these settings describe. TLS files are read here: ConfigError if one is
        missing, naming the key as `source` says (the flag that set it, or the file and the key)."""
        identity, lookups, orchestration = self.identity, self.lookups, self.orchestration
        retention = self.retention
        return UnionConfig(
            listen=self.server.listen,
            data_dir=self.server.data_dir,
            database_url=self.database.url,
            bank_addresses=self.bank_addresses(),
            population_seed=self.population.seed,
            population_size=self.population.size,
            identity=IdentityPolicy(
                code_ttl=timedelta(seconds=identity.code_ttl_seconds),
                max_code_attempts=identity.max_code_attempts,
                max_starts_per_window=identity.max_starts_per_window,
                max_mismatches_per_window=identity.max_mismatches_per_window,
                start_window=timedelta(seconds=identity.start_window_seconds),
                session_ttl=timedelta(seconds=identity.session_ttl_seconds),
            ),
            lookups=LookupPolicy(
                requery_cooldown=timedelta(hours=lookups.requery_cooldown_hours),
                watch_poll_interval=timedelta(seconds=lookups.watch_poll_interval_seconds),
                watch_coalesce=timedelta(seconds=lookups.watch_coalesce_seconds),
            ),
            orchestration=OrchestratorPolicy(
                lookup_deadline=timedelta(hours=orchestration.lookup_deadline_hours),
                call_timeout=timedelta(seconds=orchestration.call_timeout_seconds),
                lease_margin=timedelta(seconds=orchestration.lease_margin_seconds),
                backoff_base=timedelta(seconds=orchestration.backoff_base_seconds),
                backoff_max=timedelta(seconds=orchestration.backoff_max_seconds),
                truncated_answer_attempts=orchestration.truncated_answer_attempts,
                max_concurrent_calls=orchestration.max_concurrent_card_actions,
                max_calls_per_bank=orchestration.max_calls_per_bank,
                poll_interval=timedelta(seconds=orchestration.poll_interval_seconds),
            ),
            card_actions=CardActionPolicy(
                answer_wait=timedelta(seconds=self.card_actions.answer_wait_seconds),
                deadline=timedelta(hours=self.card_actions.deadline_hours),
                max_closures_per_window=self.card_actions.max_closures_per_hour,
            ),
            retention=RetentionPolicy(
                report_days=retention.report_days,
                timezone=retention.timezone,
                verifications=timedelta(hours=retention.verifications_hours),
                card_actions=timedelta(days=retention.card_actions_days),
                notifications=timedelta(hours=retention.notifications_hours),
                audit=timedelta(days=retention.audit_days),
                sms_outbox=timedelta(hours=retention.sms_outbox_hours),
                interval=timedelta(minutes=retention.sweep_interval_minutes),
            ),
            tls=self._server_tls(source),
            bank_tls=self._bank_tls(source),
            health_interval=timedelta(seconds=self.server.health_interval_seconds),
            max_concurrent_calls=self.server.max_concurrent_calls,
            max_concurrent_watches=self.server.max_concurrent_watches,
            metrics_listen=self.metrics.listen,
            http_listen=self.http.listen,
            http_allowed_origins=self.http.allowed_origins,
        )
