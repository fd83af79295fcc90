"""`cardlookup-bank`: run simulated bank servers and look after their data."""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import time
from datetime import date
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table
from sqlalchemy.exc import IntegrityError

from server.bank.actions import format_yuan
from server.bank.bank_server import (
    DEFAULT_DATA_DIR,
    RunningBank,
    start_all_banks,
    start_bank,
)
from server.bank.bank_settings import BankSettings, JoiningBankSettings
from server.bank.faults import control_file, write_control_file
from server.bank.masking import mask_number
from server.bank.store import BankStore, default_database_url
from server.common import tracing
from server.common.checks import is_luhn_valid, is_valid_resident_id, luhn_check_digit
from server.common.config_file import ConfigError, load, nested
from server.common.dev_ca import bank_tls_files
from server.common.grpc_runtime import TlsFiles, tune_garbage_collection, wait_for_shutdown_signal
from server.common.logs import configure_logging
from server.common.prometheus import MetricsEndpoint, process_registry
from server.common.rpc_metrics import RpcMetrics
from server.common.shapes import BANK_CODE
from server.common.tracing import otlp_tracer_provider
from server.population.catalogue import BANKS, BANKS_BY_CODE, BankInfo, Bin

log = logging.getLogger("server.bank")

app = typer.Typer(
    help="Simulated bank servers for 一键查卡 (bankquery.v1.BankQueryService).", no_args_is_help=True
)
console = Console()

DataDir = Annotated[Path, typer.Option(help="Directory holding each bank's SQLite file.")]
BankOption = Annotated[str, typer.Option("--bank", help="Bank code, e.g. ICBC.")]
IdOption = Annotated[str, typer.Option("--id", help="18-character resident ID number.")]
DatabaseUrl = Annotated[
    str | None,
    typer.Option(help="SQLAlchemy URL of the bank's database (default: a SQLite file in --data-dir)."),
]


def _bank_code(code: str, data_dir: Path | None = None, database_url: str | None = None) -> str:
    """A built-in bank's code, or (given where its data is) one of a bank that joined later and
    already has a store: a typo must not create an empty bank."""
    code = code.upper()
    if code in BANKS_BY_CODE:
        return code
    joined = BANK_CODE.fullmatch(code) and (
        database_url is not None
        or (
            data_dir is not None
            and Path(default_database_url(data_dir, code).removeprefix("sqlite:///")).exists()
        )
    )
    if not joined:
        raise typer.BadParameter(
            f"unknown bank {code!r}; known: {', '.join(BANKS_BY_CODE)}, or a bank served with "
            "`serve --bank CODE --name ... --debit-bin ...` in this --data-dir"
        )
    return code


def _bins(values: list[str]) -> tuple[Bin, ...]:
    # Already checked against BIN_SPEC with the rest of the configuration.
    return tuple(Bin(prefix, int(length)) for prefix, length in (value.split(":") for value in values))


def _joining_bank(code: str, joining: JoiningBankSettings) -> BankInfo | None:
    """Who a bank outside the built-in 16 is, from [bank] in its file or the flags (None for a
    built-in bank)."""
    given = joining.name or joining.english_name or joining.interbank_code
    if code in BANKS_BY_CODE:
        if given or joining.debit_bins or joining.credit_bins:
            raise typer.BadParameter(f"{code} is a built-in bank: its names and BINs are the catalogue's")
        return None
    if not BANK_CODE.fullmatch(code):
        raise typer.BadParameter("a bank code is 2-16 capital letters", param_hint="--bank")
    if not joining.name or not joining.english_name or not joining.debit_bins:
        raise typer.BadParameter(
            f"{code} is not one of the built-in 16: give its name, english_name and at least one debit "
            "BIN ([bank] in its configuration file, or --name, --english-name and --debit-bin)"
        )
    return BankInfo(
        code,
        joining.name,
        joining.english_name,
        joining.interbank_code,
        _bins(joining.debit_bins),
        _bins(joining.credit_bins),
    )


def _store(bank: str, data_dir: Path, database_url: str | None) -> BankStore:
    data_dir.mkdir(parents=True, exist_ok=True)
    store = BankStore(bank, database_url or default_database_url(data_dir, bank))
    store.create_schema()
    return store


def _tls_for(tls_dir: Path | None, bank: str) -> TlsFiles | None:
    """<code>.crt/<code>.key (lower-case bank code) and ca.crt from `tls_dir`: always mutual TLS.

    A missing file is an error (fail closed) rather than a silent fall-back to one-way TLS.
    """
    if tls_dir is None:
        return None
    try:
        return bank_tls_files(tls_dir, bank)
    except FileNotFoundError as error:
        raise typer.BadParameter(
            f"{error.filename} is missing (create a development PKI: python -m server.common.dev_ca DIR)",
            param_hint="--tls-dir",
        ) from error


# Each flag of `serve` and the configuration key it overrides (a bad flag is reported as the flag).
SERVE_FLAG_KEYS = {
    "--host": "server.host",
    "--port": "server.port",
    "--base-port": "server.base_port",
    "--data-dir": "server.data_dir",
    "--database-url": "database.url",
    "--seed": "population.seed",
    "--population": "population.size",
    "--tls-dir": "server.tls_dir",
    "--metrics-listen": "metrics.listen",
    "--log-level": "logging.level",
    "--name": "bank.name",
    "--english-name": "bank.english_name",
    "--interbank-code": "bank.interbank_code",
    "--debit-bin": "bank.debit_bins",
    "--credit-bin": "bank.credit_bins",
}


def load_settings(config: Path | None, flags: dict[str, Any]) -> BankSettings:
    """The bank process's configuration from the file, the environment and `flags` ({"--host":
    value}, None for a flag not given); a problem is reported on stderr, one line each, and exits 2."""
    given = {flag: value for flag, value in flags.items() if value is not None}
    names = {SERVE_FLAG_KEYS[flag]: flag for flag in given}
    try:
        return load(BankSettings, config, nested({SERVE_FLAG_KEYS[f]: v for f, v in given.items()}), names)
    except ConfigError as error:
        for problem in error.problems:
            typer.echo(f"cardlookup-bank: {problem}", err=True)
        raise typer.Exit(2) from None


@app.command()
def serve(
    bank: Annotated[str | None, typer.Option(help="Serve this one bank (code, e.g. ICBC).")] = None,
    all_banks: Annotated[bool, typer.Option("--all", help="Serve all 16 banks, one port each.")] = False,
    config: Annotated[
        Path | None,
        typer.Option(
            "--config",
            envvar="CARDLOOKUP_BANK_CONFIG",
            help="TOML configuration file (config/bank.example.toml shows every key); "
            "CARDLOOKUP_BANK_<TABLE>__<KEY> variables override it, and flags override both.",
        ),
    ] = None,
    host: Annotated[str | None, typer.Option(help="Interface to listen on (config: server.host).")] = None,
    port: Annotated[
        int | None, typer.Option(help="Port for --bank (0: any free port) (config: server.port).")
    ] = None,
    base_port: Annotated[
        int | None,
        typer.Option(
            help="First port for --all; banks take consecutive ports in catalogue order "
            "(config: server.base_port)."
        ),
    ] = None,
    data_dir: Annotated[
        Path | None, typer.Option(help="Directory holding each bank's SQLite file (config: server.data_dir).")
    ] = None,
    database_url: Annotated[
        str | None,
        typer.Option(
            help="SQLAlchemy URL of the bank's database (default: a SQLite file in --data-dir) "
            "(config: database.url)."
        ),
    ] = None,
    seed: Annotated[
        int | None, typer.Option(help="Seed of the synthetic population (config: population.seed).")
    ] = None,
    population: Annotated[
        int | None, typer.Option(help="Size of the synthetic population (config: population.size).")
    ] = None,
    fault: Annotated[
        list[str] | None,
        typer.Option(
            help="Fault knob key=value, repeatable (e.g. latency_ms=300, outage=1, query_session=0), "
            "over the file's [faults]."
        ),
    ] = None,
    tls_dir: Annotated[
        Path | None,
        typer.Option(
            help="Directory with <bank>.crt, <bank>.key and ca.crt (mutual TLS; see dev_ca) "
            "(config: server.tls_dir)."
        ),
    ] = None,
    metrics_listen: Annotated[
        str | None,
        typer.Option(
            envvar="CARDLOOKUP_BANK_METRICS_LISTEN",
            help="host:port to serve Prometheus metrics on (GET /metrics), one endpoint for every bank "
            "this process serves; off when empty (config: metrics.listen).",
        ),
    ] = None,
    log_level: Annotated[str | None, typer.Option(help="Logging level (config: logging.level).")] = None,
    name: Annotated[
        str | None, typer.Option(help="A bank outside the built-in 16: its Chinese name, e.g. 上海银行.")
    ] = None,
    english_name: Annotated[
        str | None, typer.Option(help="A bank outside the built-in 16: its English name.")
    ] = None,
    interbank_code: Annotated[
        str | None, typer.Option(help="A bank outside the built-in 16: its 3-digit CNAPS code.")
    ] = None,
    debit_bin: Annotated[
        list[str] | None,
        typer.Option(help="A bank outside the built-in 16: a debit BIN as PREFIX:LENGTH (repeatable)."),
    ] = None,
    credit_bin: Annotated[
        list[str] | None,
        typer.Option(help="A bank outside the built-in 16: a credit BIN as PREFIX:LENGTH (repeatable)."),
    ] = None,
) -> None:
    """Serve one bank (--bank) or all 16 built-in ones (--all) until SIGINT/SIGTERM, then drain and
    stop. A bank that joins later is served with --bank CODE and its --name, --english-name and
    BINs; its store is seeded from the same synthetic population."""
    if (bank is None) == (not all_banks):
        raise typer.BadParameter("give exactly one of --bank CODE or --all")
    settings = load_settings(
        config,
        {
            "--host": host,
            "--port": port,
            "--base-port": base_port,
            "--data-dir": data_dir,
            "--database-url": database_url,
            "--seed": seed,
            "--population": population,
            "--tls-dir": tls_dir,
            "--metrics-listen": metrics_listen,
            "--log-level": log_level,
            "--name": name,
            "--english-name": english_name,
            "--interbank-code": interbank_code,
            "--debit-bin": debit_bin or None,
            "--credit-bin": credit_bin or None,
        },
    )
    joining = _joining_bank(bank.upper(), settings.bank) if bank is not None else None
    if bank is None and settings.bank != JoiningBankSettings():
        raise typer.BadParameter(
            "[bank] (or --name, ...) describes one joining bank: serve it with --bank CODE"
        )
    try:
        faults = settings.fault_settings(fault or [])
    except ValueError as error:
        raise typer.BadParameter(str(error), param_hint="--fault") from error
    host, port, base_port = settings.server.host, settings.server.port, settings.server.base_port
    data_dir, tls_dir = settings.server.data_dir, settings.server.tls_dir
    database_url = settings.database.url or None
    seed, population = settings.population.seed, settings.population.size
    metrics_listen = settings.metrics.listen
    configure_logging(settings.logging.level)
    registry = process_registry()
    rpc_metrics = RpcMetrics(registry)
    tracer_provider = otlp_tracer_provider(settings.tracing.tracing("cardlookup-bank"))

    async def run() -> None:
        banks: list[RunningBank]
        if bank is not None:
            code = bank.upper() if joining is not None else _bank_code(bank)
            banks = [
                await start_bank(
                    code,
                    address=f"{host}:{port}",
                    database_url=database_url,
                    data_dir=data_dir,
                    seed=seed,
                    size=population,
                    tls=_tls_for(tls_dir, code),
                    faults=faults,
                    rpc_metrics=rpc_metrics,
                    bank_info=joining,
                    tracer_provider=tracer_provider,
                )
            ]
        else:
            banks = await start_all_banks(
                data_dir=data_dir,
                seed=seed,
                size=population,
                host=host,
                base_port=base_port,
                tls={b.code: tls for b in BANKS if (tls := _tls_for(tls_dir, b.code)) is not None},
                faults={b.code: faults for b in BANKS},
                rpc_metrics=rpc_metrics,
                tracer_provider=tracer_provider,
            )
        endpoint = MetricsEndpoint(registry, metrics_listen) if metrics_listen else None
        for running in banks:
            console.print(f"{running.bank_code:6} listening on {running.address}")
        log.info(
            "bank process started",
            extra={
                "pid": os.getpid(),
                "banks": {running.bank_code: running.address for running in banks},
                "metrics": endpoint.address if endpoint is not None else "off",
            },
        )
        stopping = 0.0
        try:
            tune_garbage_collection()
            await wait_for_shutdown_signal()
            stopping = time.monotonic()
            log.info("bank process stopping: draining calls", extra={"pid": os.getpid()})
        finally:
            await asyncio.gather(*(running.stop() for running in banks))
            if endpoint is not None:
                await endpoint.close()
            log.info(
                "bank process stopped",
                extra={
                    "pid": os.getpid(),
                    "drain_ms": round((time.monotonic() - stopping) * 1000) if stopping else 0,
                },
            )

    try:
        asyncio.run(run())
    finally:
        tracing.shutdown(tracer_provider)


@app.command()
def faults(
    bank: BankOption,
    set_: Annotated[
        list[str] | None,
        typer.Option(
            "--set", help="Fault knob key=value, repeatable (e.g. latency_ms=300, outage=1, query_session=0)."
        ),
    ] = None,
    clear: Annotated[bool, typer.Option(help="Back to the settings the bank started with.")] = False,
    data_dir: DataDir = DEFAULT_DATA_DIR,
) -> None:
    """Change a running bank's fault settings (it picks them up within a second)."""
    code = _bank_code(bank, data_dir)
    path = control_file(data_dir, code)
    if clear:
        path.unlink(missing_ok=True)
        console.print(f"{code}: fault settings cleared")
        return
    try:
        settings = write_control_file(path, set_ or [])
    except ValueError as error:
        raise typer.BadParameter(str(error)) from error
    console.print(f"{code}: {settings}")


@app.command()
def cards(
    bank: BankOption,
    resident_id: IdOption,
    data_dir: DataDir = DEFAULT_DATA_DIR,
    database_url: DatabaseUrl = None,
    include_closed: Annotated[bool, typer.Option(help="Also list closed cards.")] = True,
) -> None:
    """List a customer's cards at one bank, masked (first 4 + last 4 digits), with status and balance.

    A debit card's balance is the funds it holds; a credit card's is the amount owed.
    """
    store = _store(_bank_code(bank, data_dir, database_url), data_dir, database_url)
    try:
        found = store.cards_for_id(resident_id, include_closed=include_closed)
    finally:
        store.close()
    table = Table("card_ref", "number", "type", "status", "balance", "opened", "last activity")
    for card in found:
        status = card.status
        if card.closure_scheduled_on is not None and card.status != "closed":
            status += f" (closing {card.closure_scheduled_on.isoformat()})"
        balance = format_yuan(card.balance_cents)
        table.add_row(
            card.card_ref,
            mask_number(card.number),
            card.card_type,
            status,
            f"{balance} owed" if card.card_type == "credit" and card.balance_cents else balance,
            card.open_date.isoformat(),
            card.last_activity_date.isoformat(),
        )
    console.print(table)
    console.print(f"{len(found)} card(s)")


@app.command("add-customer")
def add_customer(
    bank: BankOption,
    resident_id: IdOption,
    name: Annotated[str, typer.Option(help="The customer's name.")],
    mobile: Annotated[str, typer.Option(help="11-digit mobile number.")],
    data_dir: DataDir = DEFAULT_DATA_DIR,
    database_url: DatabaseUrl = None,
) -> None:
    """Register a customer at one bank."""
    if not is_valid_resident_id(resident_id):
        raise typer.BadParameter("not a valid GB 11643 resident ID number", param_hint="--id")
    if not (mobile.isdigit() and len(mobile) == 11):
        raise typer.BadParameter("must be 11 digits", param_hint="--mobile")
    if not name.strip() or len(name) > 64:
        raise typer.BadParameter("must be 1-64 characters", param_hint="--name")
    store = _store(_bank_code(bank, data_dir, database_url), data_dir, database_url)
    try:
        store.add_customer(resident_id, name, mobile)
    finally:
        store.close()
    console.print("customer added")


@app.command("add-card")
def add_card(
    bank: BankOption,
    resident_id: IdOption,
    card_type: Annotated[str, typer.Option("--type", help="debit or credit.")] = "debit",
    number: Annotated[
        str | None,
        typer.Option(help="Full card number (Luhn-valid); default: a new number on the bank's BIN."),
    ] = None,
    status: Annotated[str, typer.Option(help="active, dormant, frozen or closed.")] = "active",
    open_date: Annotated[str | None, typer.Option(help="YYYY-MM-DD (default: today).")] = None,
    data_dir: DataDir = DEFAULT_DATA_DIR,
    database_url: DatabaseUrl = None,
) -> None:
    """Issue a card to an existing customer of one bank."""
    code = _bank_code(bank, data_dir, database_url)
    if card_type not in ("debit", "credit"):
        raise typer.BadParameter("must be debit or credit", param_hint="--type")
    if number is None and code not in BANKS_BY_CODE:
        raise typer.BadParameter("a bank outside the built-in 16 needs the card's --number")
    if number is None:
        number = _new_number(code, card_type)
    elif not (is_luhn_valid(number) and 16 <= len(number) <= 19):
        raise typer.BadParameter("must be 16-19 digits with a valid Luhn check digit", param_hint="--number")
    opened = date.fromisoformat(open_date) if open_date else None
    store = _store(code, data_dir, database_url)
    try:
        card = store.add_card(resident_id, number, card_type, status=status, open_date=opened)
    except (LookupError, ValueError) as error:
        raise typer.BadParameter(str(error)) from error
    except IntegrityError as error:
        raise typer.BadParameter("that card number is already issued", param_hint="--number") from error
    finally:
        store.close()
    console.print(f"card {mask_number(card.number)} added as {card.card_ref}")


def _new_number(bank_code: str, card_type: str) -> str:
    """A fresh random number on the bank's first BIN for this card type."""
    bank = BANKS_BY_CODE[bank_code]
    bin_ = (bank.credit_bins if card_type == "credit" else bank.debit_bins)[0]
    body_length = bin_.length - len(bin_.prefix) - 1
    partial = bin_.prefix + "".join(secrets.choice("0123456789") for _ in range(body_length))
    return partial + luhn_check_digit(partial)


if __name__ == "__main__":
    app()
