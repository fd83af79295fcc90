"""`cardlookup-union`: run the union server, purge expired data, manage admin credentials and keys."""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Awaitable, Callable
from datetime import timedelta
from pathlib import Path
from typing import Annotated, TypeVar

import typer

from server.common.dev_ca import union_client_tls, union_server_tls
from server.common.errors import DomainError
from server.common.grpc_runtime import TlsFiles, tune_garbage_collection, wait_for_shutdown_signal
from server.common.logs import configure_logging
from server.union.app import (
    DEFAULT_POPULATION_SEED,
    DEFAULT_POPULATION_SIZE,
    UnionConfig,
    UnionServer,
    default_bank_addresses,
)
from server.union.bank_gateway import ClientTls
from server.union.clock import SystemClock
from server.union.domain.admin import AdminService
from server.union.domain.audit import AuditTrail
from server.union.domain.lookups import LookupPolicy
from server.union.domain.orchestrator import OrchestratorPolicy
from server.union.domain.ports import AdminRole
from server.union.domain.retention import (
    DEFAULT_RETENTION_DAYS,
    DEFAULT_TIMEZONE,
    RetentionPolicy,
    RetentionSweep,
)
from server.union.keyring import Keys
from server.union.sms import FileSmsSink
from server.union.storage.credentials import AdminCredentialRepository, SessionStore
from server.union.storage.database import Store, open_store

T = TypeVar("T")

log = logging.getLogger("server.union")

app = typer.Typer(help="The 一键查卡 union server.", no_args_is_help=True, add_completion=False)

DataDir = Annotated[Path, typer.Option(help="Directory for the SQLite database, keys and the SMS outbox.")]
DatabaseUrl = Annotated[
    str,
    typer.Option(envvar="CARDLOOKUP_DATABASE_URL", help="SQLAlchemy URL; default sqlite under --data-dir."),
]


def _parse_bank_addresses(values: list[str], base_port: int) -> dict[str, str]:
    addresses = default_bank_addresses(base_port=base_port)
    for value in values:
        code, sep, address = value.partition("=")
        if not sep:
            raise typer.BadParameter(f"expected CODE=host:port, got {value!r}")
        addresses[code.upper()] = address
    return addresses


@app.command()
def serve(
    listen: Annotated[str, typer.Option(help="host:port to listen on.")] = "127.0.0.1:50051",
    data_dir: DataDir = Path("data"),
    database_url: DatabaseUrl = "",
    bank_base_port: Annotated[int, typer.Option(help="Banks listen on consecutive ports from here.")] = 50061,
    bank: Annotated[list[str], typer.Option(help="Override one bank's address: CODE=host:port.")] = [],  # noqa: B006
    population_seed: Annotated[
        int, typer.Option(help="Seed of the synthetic population.")
    ] = DEFAULT_POPULATION_SEED,
    population_size: Annotated[
        int, typer.Option(help="People in the identity registry.")
    ] = DEFAULT_POPULATION_SIZE,
    requery_cooldown_hours: Annotated[
        float, typer.Option(help="Hours before a person may look up again.")
    ] = 168,
    deadline_hours: Annotated[float, typer.Option(help="Lookup deadline (the SLA) in hours.")] = 24,
    report_retention_days: Annotated[
        int,
        typer.Option(min=1, help="Natural days a report (and its lookup) is kept after the day it was made."),
    ] = DEFAULT_RETENTION_DAYS,
    calendar_timezone: Annotated[
        str, typer.Option(help="Time zone whose calendar days count for report retention.")
    ] = DEFAULT_TIMEZONE,
    audit_retention_days: Annotated[
        int, typer.Option(min=1, help="Days the audit trail (PII-free) is kept.")
    ] = 180,
    call_timeout_seconds: Annotated[float, typer.Option(help="Deadline of one call to a bank.")] = 10,
    lease_margin_seconds: Annotated[
        float, typer.Option(help="How long past the call deadline a dead replica's claim is held.")
    ] = 5,
    log_level: Annotated[str, typer.Option(help="Logging level.")] = "INFO",
    tls_dir: Annotated[
        Path | None,
        typer.Option(help="Serve clients over TLS with union-server.crt/.key from this PKI directory."),
    ] = None,
    bank_tls_dir: Annotated[
        Path | None,
        typer.Option(
            help="Development PKI directory (ca.crt, union-client.crt/.key): mutual TLS towards the banks."
        ),
    ] = None,
    metrics_listen: Annotated[
        str,
        typer.Option(
            envvar="CARDLOOKUP_METRICS_LISTEN",
            help="host:port to serve Prometheus metrics on (GET /metrics); off when empty.",
        ),
    ] = "",
    http_listen: Annotated[
        str,
        typer.Option(
            envvar="CARDLOOKUP_HTTP_LISTEN",
            help="host:port for Connect/gRPC-Web (browsers, curl) and the web page; off when empty.",
        ),
    ] = "",
    http_allowed_origin: Annotated[
        list[str],
        typer.Option(help="A browser origin besides the page's own that may call the HTTP API (CORS)."),
    ] = [],  # noqa: B006
) -> None:
    """Run the union server until SIGINT/SIGTERM, then shut down gracefully."""
    bank_tls: ClientTls | None = None
    if bank_tls_dir is not None:
        try:
            bank_tls = union_client_tls(bank_tls_dir)
        except FileNotFoundError as error:
            raise typer.BadParameter(f"{error.filename} is missing", param_hint="--bank-tls-dir") from error
    server_tls: TlsFiles | None = None
    if tls_dir is not None:
        try:
            server_tls = union_server_tls(tls_dir)
        except FileNotFoundError as error:
            raise typer.BadParameter(f"{error.filename} is missing", param_hint="--tls-dir") from error
    _, _, metrics_port = metrics_listen.rpartition(":")
    if metrics_listen and not (metrics_port.isdigit() and int(metrics_port) <= 65535):
        raise typer.BadParameter(f"expected host:port, got {metrics_listen!r}", param_hint="--metrics-listen")
    try:
        retention = RetentionPolicy(
            report_days=report_retention_days,
            timezone=calendar_timezone,
            audit=timedelta(days=audit_retention_days),
        )
    except (ValueError, KeyError) as error:  # ZoneInfoNotFoundError is a KeyError
        raise typer.BadParameter("not a known IANA time zone", param_hint="--calendar-timezone") from error
    _, _, http_port = http_listen.rpartition(":")
    if http_listen and not (http_port.isdigit() and int(http_port) <= 65535):
        raise typer.BadParameter(f"expected host:port, got {http_listen!r}", param_hint="--http-listen")
    configure_logging(log_level)
    config = UnionConfig(
        listen=listen,
        data_dir=data_dir,
        database_url=database_url,
        bank_addresses=_parse_bank_addresses(bank, bank_base_port),
        population_seed=population_seed,
        population_size=population_size,
        lookups=LookupPolicy(requery_cooldown=timedelta(hours=requery_cooldown_hours)),
        orchestration=OrchestratorPolicy(
            lookup_deadline=timedelta(hours=deadline_hours),
            call_timeout=timedelta(seconds=call_timeout_seconds),
            lease_margin=timedelta(seconds=lease_margin_seconds),
        ),
        bank_tls=bank_tls,
        tls=server_tls,
        metrics_listen=metrics_listen,
        retention=retention,
        http_listen=http_listen,
        http_allowed_origins=tuple(http_allowed_origin),
    )

    async def run() -> None:
        server = UnionServer(config)
        await server.start()
        stopping = 0.0
        try:
            tune_garbage_collection()
            await wait_for_shutdown_signal()
            stopping = time.monotonic()
            log.info("union stopping: draining calls", extra={"pid": os.getpid()})
        finally:
            await server.stop()
            log.info(
                "union stopped",
                extra={
                    "pid": os.getpid(),
                    "drain_ms": round((time.monotonic() - stopping) * 1000) if stopping else 0,
                },
            )

    profile_to = os.environ.get("CARDLOOKUP_PROFILE")
    if not profile_to:
        asyncio.run(run())
        return
    # Profiling on request (make bench --profile): pyinstrument is a dev/bench dependency only.
    from pyinstrument import Profiler

    with Profiler(interval=0.001) as profiler:
        asyncio.run(run())
    Path(profile_to).write_text(profiler.output_text(unicode=True, show_all=False))


@app.command()
def purge(data_dir: DataDir = Path("data"), database_url: DatabaseUrl = "") -> None:
    """Run the retention sweep now: expired reports with their lookups, and every other kind of
    data past its retention (the server also does this periodically)."""
    config = UnionConfig(data_dir=data_dir, database_url=database_url)

    async def run() -> dict[str, int]:
        store = open_store(config.effective_database_url)
        try:
            await asyncio.to_thread(store.migrate)
            sessions = SessionStore(store)
            sweep = RetentionSweep(
                store,
                config.retention,
                FileSmsSink(config.sms_sink_path),
                extra={"sessions": lambda now: sessions.purge_expired_sessions(now, limit=1_000_000)},
            )
            return await sweep.sweep(SystemClock().now())
        finally:
            await store.close()

    purged = asyncio.run(run())
    typer.echo(", ".join(f"{kind}: {count}" for kind, count in purged.items()))


credential_app = typer.Typer(
    help="Named admin credentials (viewer: read-only Admin RPCs; operator: changes too).",
    no_args_is_help=True,
)
app.add_typer(credential_app, name="admin-credential")


def _admin_console(data_dir: Path, database_url: str) -> tuple[Store, AdminService]:
    """The admin domain on this installation's database and keys, acting as "admin:console"."""
    config = UnionConfig(data_dir=data_dir, database_url=database_url)
    store = open_store(config.effective_database_url)
    keys = Keys.load(config.data_dir)
    clock = SystemClock()
    audit = AuditTrail(store, clock, keys)
    return store, AdminService(store, clock, keys, AdminCredentialRepository(store), audit)


def _console_run(data_dir: Path, database_url: str, work: Callable[[AdminService], Awaitable[T]]) -> T:
    async def run() -> T:
        store, admin = _admin_console(data_dir, database_url)
        try:
            await asyncio.to_thread(store.migrate)
            return await work(admin)
        finally:
            await store.close()

    try:
        return asyncio.run(run())
    except DomainError as error:
        typer.echo(error.message, err=True)
        raise typer.Exit(1) from error


@credential_app.command("create")
def credential_create(
    name: Annotated[str, typer.Option(help="Who holds it: 1-32 lowercase letters, digits, - or _.")],
    role: Annotated[AdminRole, typer.Option(help="viewer: read only; operator: changes too.")],
    data_dir: DataDir = Path("data"),
    database_url: DatabaseUrl = "",
) -> None:
    """Create a named admin credential and print its token, once: only a keyed hash of it is kept."""
    credential, token = _console_run(data_dir, database_url, lambda a: a.create_credential(name, role))
    typer.echo(f"created {credential.role.value} credential {credential.name} (id {credential.id})", err=True)
    typer.echo(token)


@credential_app.command("list")
def credential_list(data_dir: DataDir = Path("data"), database_url: DatabaseUrl = "") -> None:
    """List the admin credentials (names, roles, ids; never tokens)."""
    for credential in _console_run(data_dir, database_url, lambda a: a.list_credentials()):
        typer.echo(
            f"{credential.id}  {credential.role.value:<8}  {credential.name}  "
            f"created {credential.create_time.isoformat(timespec='seconds')}"
        )


@credential_app.command("revoke")
def credential_revoke(
    name: Annotated[str, typer.Option(help="The credential to revoke.")],
    data_dir: DataDir = Path("data"),
    database_url: DatabaseUrl = "",
) -> None:
    """Revoke (delete) an admin credential; its changes stay in the audit trail under its id."""
    credential = _console_run(data_dir, database_url, lambda a: a.revoke_credential(name))
    typer.echo(f"revoked {credential.name} (id {credential.id})")


@app.command("rotate-key")
def rotate_key(data_dir: DataDir = Path("data")) -> None:
    """Make a new key current (in the data directory's key file); restart the server to use it.

    Sessions, page tokens and sealed values made under older keys stay valid until they expire:
    the older keys stay in the keyring. Person hashes keep the first key, so nothing is re-keyed."""
    try:
        keys = Keys.rotate(data_dir)
    except RuntimeError as error:
        typer.echo(str(error), err=True)
        raise typer.Exit(1) from error
    typer.echo(f"current key is now {keys.current.id} ({len(keys.versions)} keys in the keyring)")


@app.command("admin-token")
def admin_token(data_dir: DataDir = Path("data")) -> None:
    """Print the token of this installation's "bootstrap" operator credential (from
    $CARDLOOKUP_ADMIN_TOKEN or the data dir)."""
    typer.echo(UnionConfig(data_dir=data_dir).resolve_admin_token())


@app.command()
def migrate(data_dir: DataDir = Path("data"), database_url: DatabaseUrl = "") -> None:
    """Apply database migrations and exit."""
    store = open_store(UnionConfig(data_dir=data_dir, database_url=database_url).effective_database_url)
    store.migrate()
    asyncio.run(store.close())
    typer.echo("database is at the newest schema")


if __name__ == "__main__":
    app()
