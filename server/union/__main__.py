"""`cardlookup-union`: run the union server, purge expired data, manage admin credentials and keys."""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Awaitable, Callable
from dataclasses import replace
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer

from server.common import tracing
from server.common.config_file import ConfigError, load, nested
from server.common.dir_lock import DirectoryServing, serving_from
from server.common.errors import DomainError
from server.common.grpc_runtime import tune_garbage_collection, wait_for_shutdown_signal
from server.common.logs import configure_logging
from server.common.tracing import otlp_tracer_provider
from server.union.clock import SystemClock
from server.union.domain.admin import AdminService, UnknownBankCodes
from server.union.domain.audit import AuditTrail
from server.union.domain.ports import AdminRole
from server.union.domain.retention import RetentionSweep
from server.union.keyring import Keys
from server.union.sms import FileSmsSink
from server.union.storage.credentials import AdminCredentialRepository, SessionStore
from server.union.storage.database import Store, open_store
from server.union.union_server import UnionConfig, UnionServer, default_bank_addresses
from server.union.union_settings import UnionSettings

T = TypeVar("T")

log = logging.getLogger("server.union")

app = typer.Typer(help="The 一键查卡 union server.", no_args_is_help=True, add_completion=False)

ConfigFile = Annotated[
    Path | None,
    typer.Option(
        "--config",
        envvar="CARDLOOKUP_UNION_CONFIG",
        help="TOML configuration file (config/union.example.toml shows every key); "
        "CARDLOOKUP_UNION_<TABLE>__<KEY> variables override it, and flags override both.",
    ),
]
DataDir = Annotated[
    Path | None,
    typer.Option(
        help="Directory for the SQLite database, keys and the SMS outbox (config: server.data_dir)."
    ),
]
DatabaseUrl = Annotated[
    str | None,
    typer.Option(
        envvar="CARDLOOKUP_DATABASE_URL",
        help="SQLAlchemy URL; default sqlite under --data-dir (config: database.url).",
    ),
]

# Each flag and the configuration key it overrides (a bad flag is reported as the flag).
FLAG_KEYS = {
    "--listen": "server.listen",
    "--data-dir": "server.data_dir",
    "--database-url": "database.url",
    "--population-seed": "population.seed",
    "--population-size": "population.size",
    "--requery-cooldown-hours": "lookups.requery_cooldown_hours",
    "--deadline-hours": "orchestration.lookup_deadline_hours",
    "--report-retention-days": "retention.report_days",
    "--calendar-timezone": "retention.timezone",
    "--audit-retention-days": "retention.audit_days",
    "--call-timeout-seconds": "orchestration.call_timeout_seconds",
    "--lease-margin-seconds": "orchestration.lease_margin_seconds",
    "--log-level": "logging.level",
    "--tls-dir": "server.tls_dir",
    "--bank-tls-dir": "bank_tls.dir",
    "--metrics-listen": "metrics.listen",
    "--http-listen": "http.listen",
    "--http-allowed-origin": "http.allowed_origins",
}


def _bank_flags(values: list[str], base_port: int | None) -> dict[str, str]:
    """--bank-base-port (every catalogue bank on consecutive loopback ports), then each --bank."""
    addresses: dict[str, str] = {}
    if base_port is not None:
        addresses = default_bank_addresses(base_port=base_port)
    for value in values:
        code, sep, address = value.partition("=")
        if not sep:
            raise typer.BadParameter("expected CODE=host:port", param_hint="--bank")
        addresses[code.upper()] = address
    return addresses


def load_settings(
    config: Path | None, flags: dict[str, Any], banks: dict[str, str] | None = None
) -> tuple[UnionSettings, UnionConfig]:
    """The union's configuration from the file, the environment and `flags` ({"--listen": value},
    None for a flag not given); a problem is reported on stderr, one line each, and exits 2."""
    given = {flag: value for flag, value in flags.items() if value is not None}
    names = {FLAG_KEYS[flag]: flag for flag in given}
    overrides = nested({FLAG_KEYS[flag]: value for flag, value in given.items()})
    if banks:
        overrides["banks"] = {code: {"address": address} for code, address in banks.items()}
        names |= {f"banks.{code}.address": "--bank" for code in banks}

    def source(key: str) -> str:
        return names.get(key) or f"{config or 'defaults'}: {key}"

    try:
        settings = load(UnionSettings, config, overrides, names)
        return settings, settings.union_config(source)
    except ConfigError as error:
        for problem in error.problems:
            typer.echo(f"cardlookup-union: {problem}", err=True)
        raise typer.Exit(2) from None


def _console_config(
    config: Path | None, data_dir: Path | None, database_url: str | None = None
) -> UnionConfig:
    """What the one-off commands need of the configuration: the data directory and the database."""
    return load_settings(config, {"--data-dir": data_dir, "--database-url": database_url})[1]


@app.command()
def serve(
    config: ConfigFile = None,
    listen: Annotated[
        str | None, typer.Option(help="host:port to listen on (config: server.listen).")
    ] = None,
    data_dir: DataDir = None,
    database_url: DatabaseUrl = None,
    bank_base_port: Annotated[
        int | None,
        typer.Option(help="Every bank on 127.0.0.1, on consecutive ports from here (config: banks)."),
    ] = None,
    bank: Annotated[
        list[str], typer.Option(help="One bank's address: CODE=host:port (config: banks.CODE.address).")
    ] = [],  # noqa: B006
    population_seed: Annotated[
        int | None, typer.Option(help="Seed of the synthetic population (config: population.seed).")
    ] = None,
    population_size: Annotated[
        int | None, typer.Option(help="People in the identity registry (config: population.size).")
    ] = None,
    requery_cooldown_hours: Annotated[
        float | None,
        typer.Option(
            help="Hours before a person may look up again (config: lookups.requery_cooldown_hours)."
        ),
    ] = None,
    deadline_hours: Annotated[
        float | None,
        typer.Option(
            help="Lookup deadline (the SLA) in hours (config: orchestration.lookup_deadline_hours)."
        ),
    ] = None,
    report_retention_days: Annotated[
        int | None,
        typer.Option(
            help="Natural days a report is kept after the day it was made (config: retention.report_days)."
        ),
    ] = None,
    calendar_timezone: Annotated[
        str | None, typer.Option(help="Time zone of the retention calendar (config: retention.timezone).")
    ] = None,
    audit_retention_days: Annotated[
        int | None, typer.Option(help="Days the audit trail is kept (config: retention.audit_days).")
    ] = None,
    call_timeout_seconds: Annotated[
        float | None,
        typer.Option(help="Deadline of one call to a bank (config: orchestration.call_timeout_seconds)."),
    ] = None,
    lease_margin_seconds: Annotated[
        float | None,
        typer.Option(
            help="How long past the call deadline a dead replica's claim is held "
            "(config: orchestration.lease_margin_seconds)."
        ),
    ] = None,
    log_level: Annotated[str | None, typer.Option(help="Logging level (config: logging.level).")] = None,
    tls_dir: Annotated[
        Path | None,
        typer.Option(
            help="Serve clients over TLS with union-server.crt/.key from here (config: server.tls_dir)."
        ),
    ] = None,
    bank_tls_dir: Annotated[
        Path | None,
        typer.Option(
            help="Development PKI directory (ca.crt, union-client.crt/.key): mutual TLS towards the banks "
            "(config: bank_tls.dir)."
        ),
    ] = None,
    metrics_listen: Annotated[
        str | None,
        typer.Option(
            envvar="CARDLOOKUP_METRICS_LISTEN",
            help="host:port to serve Prometheus metrics on (GET /metrics); off when empty "
            "(config: metrics.listen).",
        ),
    ] = None,
    http_listen: Annotated[
        str | None,
        typer.Option(
            envvar="CARDLOOKUP_HTTP_LISTEN",
            help="host:port for Connect/gRPC-Web (browsers, curl) and the web page; off when empty "
            "(config: http.listen).",
        ),
    ] = None,
    http_allowed_origin: Annotated[
        list[str],
        typer.Option(
            help="A browser origin besides the page's own that may call the HTTP API "
            "(config: http.allowed_origins)."
        ),
    ] = [],  # noqa: B006
) -> None:
    """Run the union server until SIGINT/SIGTERM, then shut down gracefully."""
    settings, union_config = load_settings(
        config,
        {
            "--listen": listen,
            "--data-dir": data_dir,
            "--database-url": database_url,
            "--population-seed": population_seed,
            "--population-size": population_size,
            "--requery-cooldown-hours": requery_cooldown_hours,
            "--deadline-hours": deadline_hours,
            "--report-retention-days": report_retention_days,
            "--calendar-timezone": calendar_timezone,
            "--audit-retention-days": audit_retention_days,
            "--call-timeout-seconds": call_timeout_seconds,
            "--lease-margin-seconds": lease_margin_seconds,
            "--log-level": log_level,
            "--tls-dir": tls_dir,
            "--bank-tls-dir": bank_tls_dir,
            "--metrics-listen": metrics_listen,
            "--http-listen": http_listen,
            "--http-allowed-origin": tuple(http_allowed_origin) or None,
        },
        _bank_flags(bank, bank_base_port),
    )
    configure_logging(settings.logging.level)
    tracer_provider = otlp_tracer_provider(settings.tracing.tracing("cardlookup-union"))
    union_config = replace(union_config, tracer_provider=tracer_provider)

    async def run() -> None:
        # Marks the data directory as served from, so `make demo` / `make reset` leave it alone.
        try:
            with serving_from(union_config.data_dir):
                await serve_until_signalled()
        except DirectoryServing as error:
            raise typer.BadParameter(str(error), param_hint="--data-dir") from error

    async def serve_until_signalled() -> None:
        server = UnionServer(union_config)
        try:
            await server.start()
        except UnknownBankCodes as error:
            await server.stop(0)
            raise typer.BadParameter(str(error), param_hint="--bank") from error
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

    try:
        profile_to = os.environ.get("CARDLOOKUP_PROFILE")
        if not profile_to:
            asyncio.run(run())
            return
        # Profiling on request (make bench --profile): pyinstrument is a dev/bench dependency only.
        from pyinstrument import Profiler

        with Profiler(interval=0.001) as profiler:
            asyncio.run(run())
        Path(profile_to).write_text(profiler.output_text(unicode=True, show_all=False))
    finally:
        tracing.shutdown(tracer_provider)


@app.command()
def purge(config_file: ConfigFile = None, data_dir: DataDir = None, database_url: DatabaseUrl = None) -> None:
    """Run the retention sweep now: expired reports with their lookups, and every other kind of
    data past its retention (the server also does this periodically, with the same settings)."""
    config = _console_config(config_file, data_dir, database_url)

    async def run() -> dict[str, int]:
        store = open_store(config.effective_database_url)
        try:
            await asyncio.to_thread(store.migrate)
            sessions = SessionStore(store)
            sweep = RetentionSweep(
                store,
                config.retention,
                config.quota_window,
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


def _admin_console(config: UnionConfig) -> tuple[Store, AdminService]:
    """The admin domain on this installation's database and keys, acting as "admin:console"."""
    store = open_store(config.effective_database_url)
    keys = Keys.load(config.data_dir)
    clock = SystemClock()
    audit = AuditTrail(store, clock, keys)
    return store, AdminService(store, clock, keys, AdminCredentialRepository(store), audit)


def _console_run(config: UnionConfig, work: Callable[[AdminService], Awaitable[T]]) -> T:
    async def run() -> T:
        store, admin = _admin_console(config)
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
    config: ConfigFile = None,
    data_dir: DataDir = None,
    database_url: DatabaseUrl = None,
) -> None:
    """Create a named admin credential and print its token, once: only a keyed hash of it is kept."""
    credential, token = _console_run(
        _console_config(config, data_dir, database_url), lambda a: a.create_credential(name, role)
    )
    typer.echo(f"created {credential.role.value} credential {credential.name} (id {credential.id})", err=True)
    typer.echo(token)


@credential_app.command("list")
def credential_list(
    config: ConfigFile = None, data_dir: DataDir = None, database_url: DatabaseUrl = None
) -> None:
    """List the admin credentials (names, roles, ids; never tokens)."""
    console = _console_config(config, data_dir, database_url)
    for credential in _console_run(console, lambda a: a.list_credentials()):
        typer.echo(
            f"{credential.id}  {credential.role.value:<8}  {credential.name}  "
            f"created {credential.create_time.isoformat(timespec='seconds')}"
        )


@credential_app.command("revoke")
def credential_revoke(
    name: Annotated[str, typer.Option(help="The credential to revoke.")],
    config: ConfigFile = None,
    data_dir: DataDir = None,
    database_url: DatabaseUrl = None,
) -> None:
    """Revoke (delete) an admin credential; its changes stay in the audit trail under its id."""
    credential = _console_run(
        _console_config(config, data_dir, database_url), lambda a: a.revoke_credential(name)
    )
    typer.echo(f"revoked {credential.name} (id {credential.id})")


@app.command("rotate-key")
def rotate_key(config: ConfigFile = None, data_dir: DataDir = None) -> None:
    """Make a new key current (in the data directory's key file); restart the server to use it.

    Sessions, page tokens and sealed values made under older keys stay valid until they expire:
    the older keys stay in the keyring. Person hashes keep the first key, so nothing is re-keyed."""
    try:
        keys = Keys.rotate(_console_config(config, data_dir).data_dir)
    except RuntimeError as error:
        typer.echo(str(error), err=True)
        raise typer.Exit(1) from error
    typer.echo(f"current key is now {keys.current.id} ({len(keys.versions)} keys in the keyring)")


@app.command("admin-token")
def admin_token(config: ConfigFile = None, data_dir: DataDir = None) -> None:
    """Print the token of this installation's "bootstrap" operator credential (from
    $CARDLOOKUP_ADMIN_TOKEN or the data dir)."""
    typer.echo(_console_config(config, data_dir).resolve_admin_token())


@app.command()
def migrate(config: ConfigFile = None, data_dir: DataDir = None, database_url: DatabaseUrl = None) -> None:
    """Apply database migrations and exit."""
    store = open_store(_console_config(config, data_dir, database_url).effective_database_url)
    store.migrate()
    asyncio.run(store.close())
    typer.echo("database is at the newest schema")


if __name__ == "__main__":
    app()
