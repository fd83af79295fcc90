"""`cardlookup`: the command line for a person (verify, lookup, report) and an operator (admin).

Every command takes --json for scripts; errors are one line on stderr with the
server's hint, and the exit code says what happened (see EXIT_CODES).
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any, TypeVar

import grpc
import typer
from cardlookup.v1 import admin_service_pb2 as admin_pb
from cardlookup.v1 import card_action_service_pb2 as action_pb
from cardlookup.v1 import card_lookup_service_pb2 as lookup_pb
from google.protobuf.json_format import MessageToDict
from google.protobuf.message import Message
from rich.console import Console
from rich.live import Live
from rich.table import Table

from clients.client import CardLookupClient, CardLookupError

T = TypeVar("T")

EXIT_CODES = {
    grpc.StatusCode.INVALID_ARGUMENT: 2,
    grpc.StatusCode.NOT_FOUND: 3,
    grpc.StatusCode.UNAUTHENTICATED: 4,
    grpc.StatusCode.FAILED_PRECONDITION: 5,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 6,
    grpc.StatusCode.UNAVAILABLE: 7,
    grpc.StatusCode.DEADLINE_EXCEEDED: 7,
}

app = typer.Typer(
    help="一键查卡: find every bank card held in your name.", no_args_is_help=True, add_completion=False
)
admin_app = typer.Typer(help="Operator commands (need the admin credential).", no_args_is_help=True)
app.add_typer(admin_app, name="admin")

out = Console()
err = Console(stderr=True)

Target = Annotated[str, typer.Option(envvar="CARDLOOKUP_TARGET", help="Union server host:port.")]
Json = Annotated[bool, typer.Option("--json", help="Print machine-readable JSON.")]
SessionFile = Annotated[
    Path,
    typer.Option(
        envvar="CARDLOOKUP_SESSION_FILE", help="Where the session credential is kept between commands."
    ),
]
AdminToken = Annotated[str, typer.Option(envvar="CARDLOOKUP_ADMIN_TOKEN", help="Admin credential.")]
Tls = Annotated[bool, typer.Option("--tls", help="Use TLS (system roots unless --ca is given).")]
CaFile = Annotated[Path | None, typer.Option("--ca", help="PEM file of the CA that signed the server.")]

DEFAULT_TARGET = "127.0.0.1:50051"
DEFAULT_SESSION = Path.home() / ".config" / "cardlookup" / "session.json"

CARD_TYPES = {lookup_pb.CARD_TYPE_DEBIT: "借记 debit", lookup_pb.CARD_TYPE_CREDIT: "信用 credit"}
CARD_STATUSES = {
    lookup_pb.CARD_STATUS_ACTIVE: "active",
    lookup_pb.CARD_STATUS_DORMANT: "[bold yellow]dormant 久悬[/]",
    lookup_pb.CARD_STATUS_FROZEN: "[bold red]frozen 冻结[/]",
}
CLOSURE_STATES = {
    action_pb.CARD_CLOSURE_STATE_PENDING: "[cyan]pending[/]",
    action_pb.CARD_CLOSURE_STATE_CLOSED: "[green]closed 已销户[/]",
    action_pb.CARD_CLOSURE_STATE_SCHEDULED: "[green]scheduled 待销户[/]",
    action_pb.CARD_CLOSURE_STATE_BRANCH_VISIT_REQUIRED: "[yellow]visit a branch 需到网点[/]",
    action_pb.CARD_CLOSURE_STATE_REJECTED: "[red]rejected 拒绝[/]",
    action_pb.CARD_CLOSURE_STATE_FAILED: "[red]failed[/]",
}
FLAG_STATES = {
    action_pb.CARD_FLAG_STATE_PENDING: "[cyan]pending[/]",
    action_pb.CARD_FLAG_STATE_FROZEN: "[bold red]frozen 已冻结[/]",
    action_pb.CARD_FLAG_STATE_FAILED: "[red]failed[/]",
}
OUTCOMES = {
    lookup_pb.BANK_OUTCOME_PENDING: "[cyan]pending[/]",
    lookup_pb.BANK_OUTCOME_ANSWERED: "[green]answered[/]",
    lookup_pb.BANK_OUTCOME_FAILED: "[red]failed[/]",
    lookup_pb.BANK_OUTCOME_NO_RESPONSE: "[red]no response[/]",
}


def _client(
    target: str, tls: bool, ca: Path | None, session: str | None = None, admin: str | None = None
) -> CardLookupClient:
    return CardLookupClient(
        target,
        session_token=session,
        admin_token=admin,
        tls=tls,
        root_certificates=ca.read_bytes() if ca else None,
    )


def _run(work: Callable[[], Awaitable[T]]) -> T:
    """Run a coroutine; turn a server error into one clear line and a meaningful exit code."""
    try:
        return asyncio.run(work())  # type: ignore[arg-type]
    except CardLookupError as error:
        err.print(f"[red]error:[/] {error}", markup=True, highlight=False)
        raise typer.Exit(EXIT_CODES.get(error.code, 1)) from None


def _as_json(message: Message) -> dict[str, Any]:
    return MessageToDict(message, preserving_proto_field_name=True)


def _print_json(value: Any) -> None:
    out.print_json(json.dumps(value, ensure_ascii=False))


def _load_session(path: Path) -> str:
    try:
        return str(json.loads(path.read_text())["session_token"])
    except (OSError, ValueError, KeyError):
        err.print("[red]error:[/] no session; run `cardlookup verify` first")
        raise typer.Exit(4) from None


def report_table(report: lookup_pb.Report) -> list[Table]:
    """The report as people read it: per-bank counts, then the masked cards."""
    banks = Table(title=f"一键查卡 report {report.name}", title_justify="left")
    banks.add_column("Bank")
    banks.add_column("Debit 借记卡", justify="right")
    banks.add_column("Credit 信用卡", justify="right")
    banks.add_column("Outcome")
    for summary in report.bank_summaries:
        banks.add_row(
            f"{summary.bank_name} ({summary.bank_code})",
            str(summary.debit_card_count),
            str(summary.credit_card_count),
            OUTCOMES.get(summary.outcome, "?"),
        )
    banks.caption = (
        f"{report.total_card_count} cards: {report.total_debit_card_count} debit, "
        f"{report.total_credit_card_count} credit · "
        f"expires {report.expire_time.ToDatetime():%Y-%m-%d %H:%M} UTC"
    )
    # Sized for an 80-column terminal: the bank's full name is in the table above.
    cards = Table(title="Cards", title_justify="left")
    cards.add_column("Bank", no_wrap=True)
    cards.add_column("Type", no_wrap=True)
    cards.add_column("Number", no_wrap=True)
    cards.add_column("Status", no_wrap=True)
    cards.add_column("Ref", style="dim", overflow="ellipsis", no_wrap=True, max_width=12)
    for card in report.cards:
        cards.add_row(
            card.bank_code,
            CARD_TYPES.get(card.card_type, "?"),
            card.masked_number,
            CARD_STATUSES.get(card.status, "?"),
            card.card_ref,
        )
    tables = [banks, cards]
    acted = [c for c in report.cards if c.HasField("not_mine_flag") or c.HasField("closure")]
    if acted:
        actions = Table(title="Your requests on these cards", title_justify="left")
        actions.add_column("Card", no_wrap=True)
        actions.add_column("Request")
        actions.add_column("State")
        actions.add_column("Ticket / case", no_wrap=True)
        for card in acted:
            label = f"{card.bank_code} {card.masked_number[-4:]}"
            if card.HasField("not_mine_flag"):
                flag = card.not_mine_flag
                actions.add_row(label, "not mine 非本人", FLAG_STATES.get(flag.state, "?"), flag.case_number)
            if card.HasField("closure"):
                item = card.closure
                actions.add_row(label, "close 销户", CLOSURE_STATES.get(item.state, "?"), item.ticket_id)
        tables.append(actions)
    return tables


def closure_table(closure: action_pb.CardClosure) -> Table:
    table = Table(title=f"{closure.name} (from {closure.report})", title_justify="left")
    table.add_column("Card", no_wrap=True)
    table.add_column("State")
    table.add_column("Ticket", no_wrap=True)
    table.add_column("Reason")
    for item in closure.items:
        table.add_row(
            f"{item.bank_code} {item.masked_number}",
            CLOSURE_STATES.get(item.state, "?"),
            item.ticket_id,
            item.reason,
        )
    return table


def progress_table(lookup: lookup_pb.Lookup) -> Table:
    table = Table(title=f"{lookup.name} — {lookup_pb.LookupState.Name(lookup.state)}", title_justify="left")
    table.add_column("Bank")
    table.add_column("Outcome")
    table.add_column("Cards", justify="right")
    table.add_column("Attempts", justify="right")
    table.add_column("Note", style="dim")
    for bank in lookup.bank_progress:
        table.add_row(
            f"{bank.bank_name} ({bank.bank_code})",
            OUTCOMES.get(bank.outcome, "?"),
            str(bank.card_count) if bank.outcome == lookup_pb.BANK_OUTCOME_ANSWERED else "",
            str(bank.attempt_count),
            bank.failure_reason,
        )
    return table


@app.command()
def verify(
    name: Annotated[str, typer.Option(help="Your name as registered.")],
    id_number: Annotated[str, typer.Option("--id", help="Your 18-character resident ID number.")],
    mobile: Annotated[str, typer.Option(help="Your registered mobile number.")],
    code: Annotated[str | None, typer.Option(help="The one-time code; asked for if not given.")] = None,
    sms_outbox: Annotated[
        Path | None, typer.Option(help="Development only: read the code from the union's SMS outbox file.")
    ] = None,
    target: Target = DEFAULT_TARGET,
    session_file: SessionFile = DEFAULT_SESSION,
    tls: Tls = False,
    ca: CaFile = None,
    as_json: Json = False,
) -> None:
    """Real-name verification: sends a one-time code by SMS, then stores the session credential."""

    async def work() -> dict[str, Any]:
        async with _client(target, tls, ca) as client:
            started = await client.start_verification(name, id_number, mobile)
            one_time = code
            if one_time is None and sms_outbox is not None:
                from server.union.sms import read_one_time_code

                one_time = read_one_time_code(sms_outbox, mobile)
            if one_time is None:
                one_time = typer.prompt(f"Code sent to {started.masked_mobile_number}")
            done = await client.complete_verification(started.verification_id, one_time)
            session_file.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(session_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w") as handle:
                json.dump({"session_token": done.session_token, "target": target}, handle)
            return {
                "verified": True,
                "masked_mobile_number": started.masked_mobile_number,
                "region_code": done.region_code,
                "expire_time": done.expire_time.ToJsonString(),
            }

    result = _run(work)
    if as_json:
        _print_json(result)
    else:
        out.print(
            f"[green]verified[/] · code went to {result['masked_mobile_number']} · "
            f"session until {result['expire_time']}"
        )


@app.command("sign-out")
def sign_out(
    target: Target = DEFAULT_TARGET,
    session_file: SessionFile = DEFAULT_SESSION,
    tls: Tls = False,
    ca: CaFile = None,
) -> None:
    """Revoke your session on the server and delete the stored session credential."""

    async def work() -> None:
        async with _client(target, tls, ca, session=_load_session(session_file)) as client:
            await client.sign_out()

    _run(work)
    session_file.unlink(missing_ok=True)
    out.print("signed out")


@app.command()
def lookup(
    bank: Annotated[list[str], typer.Option(help="Only these bank codes (repeatable).")] = [],  # noqa: B006
    request_id: Annotated[
        str | None, typer.Option(help="Idempotency key; a retry with it returns the same lookup.")
    ] = None,
    target: Target = DEFAULT_TARGET,
    session_file: SessionFile = DEFAULT_SESSION,
    tls: Tls = False,
    ca: CaFile = None,
    as_json: Json = False,
) -> None:
    """Look up every card in your name: live per-bank progress, then the masked report."""

    async def work() -> lookup_pb.Report:
        async with _client(target, tls, ca, session=_load_session(session_file)) as client:
            created = await client.create_lookup(bank, request_id)
            if as_json:
                async for event in client.watch_lookup(created.name, group_bank_changes=True):
                    if event.report_ready:
                        return await client.get_report(event.lookup.report)
            else:
                with Live(progress_table(created), console=out, transient=False) as live:
                    async for event in client.watch_lookup(created.name, group_bank_changes=True):
                        live.update(progress_table(event.lookup))
                        if event.report_ready:
                            return await client.get_report(event.lookup.report)
            raise CardLookupError(grpc.StatusCode.UNAVAILABLE, "the watch ended before the report was ready")

    report = _run(work)
    if as_json:
        _print_json(_as_json(report))
    else:
        for table in report_table(report):
            out.print(table)


@app.command()
def report(
    name: Annotated[str, typer.Argument(help="reports/{id}")],
    target: Target = DEFAULT_TARGET,
    session_file: SessionFile = DEFAULT_SESSION,
    tls: Tls = False,
    ca: CaFile = None,
    as_json: Json = False,
) -> None:
    """Show one of your reports."""

    async def work() -> lookup_pb.Report:
        async with _client(target, tls, ca, session=_load_session(session_file)) as client:
            return await client.get_report(name)

    result = _run(work)
    if as_json:
        _print_json(_as_json(result))
    else:
        for table in report_table(result):
            out.print(table)


@app.command()
def reports(
    page_size: Annotated[int, typer.Option(help="Reports per page.")] = 10,
    page_token: Annotated[str, typer.Option(help="Token from the previous page.")] = "",
    target: Target = DEFAULT_TARGET,
    session_file: SessionFile = DEFAULT_SESSION,
    tls: Tls = False,
    ca: CaFile = None,
    as_json: Json = False,
) -> None:
    """List your unexpired reports, newest first."""

    async def work() -> lookup_pb.ListReportsResponse:
        async with _client(target, tls, ca, session=_load_session(session_file)) as client:
            return await client.list_reports(page_size, page_token)

    result = _run(work)
    if as_json:
        _print_json(_as_json(result))
        return
    table = Table("Report", "Generated (UTC)", "Expires (UTC)", "Cards")
    for item in result.reports:
        table.add_row(
            item.name,
            f"{item.generate_time.ToDatetime():%Y-%m-%d %H:%M}",
            f"{item.expire_time.ToDatetime():%Y-%m-%d %H:%M}",
            str(item.total_card_count),
        )
    out.print(table)
    if result.next_page_token:
        out.print(f"next page: --page-token {result.next_page_token}")


@app.command()
def delete(
    name: Annotated[str, typer.Argument(help="reports/{id}")],
    target: Target = DEFAULT_TARGET,
    session_file: SessionFile = DEFAULT_SESSION,
    tls: Tls = False,
    ca: CaFile = None,
    as_json: Json = False,
) -> None:
    """Delete one of your reports now instead of waiting for it to expire."""

    async def work() -> None:
        async with _client(target, tls, ca, session=_load_session(session_file)) as client:
            await client.delete_report(name)

    _run(work)
    if as_json:
        _print_json({"deleted": name})
    else:
        out.print(f"deleted {name}")


@app.command()
def close(
    report_name: Annotated[str, typer.Argument(metavar="REPORT", help="reports/{id}")],
    card_refs: Annotated[list[str], typer.Argument(metavar="CARD_REF...", help="Card refs from the report.")],
    request_id: Annotated[
        str | None, typer.Option(help="Idempotency key; a retry returns the same request.")
    ] = None,
    target: Target = DEFAULT_TARGET,
    session_file: SessionFile = DEFAULT_SESSION,
    tls: Tls = False,
    ca: CaFile = None,
    as_json: Json = False,
) -> None:
    """Ask the banks to close cards from one of your reports (each bank decides)."""

    async def work() -> action_pb.CardClosure:
        async with _client(target, tls, ca, session=_load_session(session_file)) as client:
            return await client.close_cards(report_name, card_refs, request_id)

    result = _run(work)
    if as_json:
        _print_json(_as_json(result))
    else:
        out.print(closure_table(result))


@app.command()
def closures(
    name: Annotated[
        str | None, typer.Argument(help="closures/{id}; without it, list your closure requests.")
    ] = None,
    target: Target = DEFAULT_TARGET,
    session_file: SessionFile = DEFAULT_SESSION,
    tls: Tls = False,
    ca: CaFile = None,
    as_json: Json = False,
) -> None:
    """Show one closure request, or list yours, newest first."""

    async def work() -> list[action_pb.CardClosure]:
        async with _client(target, tls, ca, session=_load_session(session_file)) as client:
            if name:
                return [await client.get_closure(name)]
            return list((await client.list_closures(page_size=100)).closures)

    result = _run(work)
    if as_json:
        _print_json([_as_json(c) for c in result])
    else:
        for closure in result:
            out.print(closure_table(closure))


@app.command("not-mine")
def not_mine(
    report_name: Annotated[str, typer.Argument(metavar="REPORT", help="reports/{id}")],
    card_ref: Annotated[str, typer.Argument(help="The card's ref in that report.")],
    target: Target = DEFAULT_TARGET,
    session_file: SessionFile = DEFAULT_SESSION,
    tls: Tls = False,
    ca: CaFile = None,
    as_json: Json = False,
) -> None:
    """Flag a card you do not recognise: its bank freezes it and opens a fraud case."""

    async def work() -> action_pb.CardFlag:
        async with _client(target, tls, ca, session=_load_session(session_file)) as client:
            return await client.flag_not_mine(report_name, card_ref)

    result = _run(work)
    if as_json:
        _print_json(_as_json(result))
    else:
        case = result.case_number or "(pending)"
        out.print(f"{result.bank_code}: {FLAG_STATES.get(result.state, '?')} · case {case}")


def _events_table(events: list[action_pb.AuditEvent]) -> Table:
    table = Table("Time (UTC)", "Action", "Outcome", "Resource")
    for event in events:
        table.add_row(
            f"{event.time.ToDatetime():%Y-%m-%d %H:%M:%S}", event.action, event.outcome, event.resource
        )
    return table


@app.command()
def activity(
    target: Target = DEFAULT_TARGET,
    session_file: SessionFile = DEFAULT_SESSION,
    tls: Tls = False,
    ca: CaFile = None,
    as_json: Json = False,
) -> None:
    """Your own audit trail: verifications, lookups, report reads and deletions, closures, flags."""

    async def work() -> action_pb.ListMyAuditEventsResponse:
        async with _client(target, tls, ca, session=_load_session(session_file)) as client:
            return await client.my_audit_events(page_size=200)

    result = _run(work)
    if as_json:
        _print_json(_as_json(result))
    else:
        out.print(_events_table(list(result.events)))


def _admin_call(target: str, tls: bool, ca: Path | None, token: str, method: str, request: Message) -> Any:
    async def work() -> Any:
        async with _client(target, tls, ca, admin=token) as client:
            return await client.admin(method, request)

    return _run(work)


@admin_app.command("banks")
def admin_banks(
    target: Target = DEFAULT_TARGET,
    admin_token: AdminToken = "",
    tls: Tls = False,
    ca: CaFile = None,
    as_json: Json = False,
) -> None:
    """List participating banks."""
    result = _admin_call(target, tls, ca, admin_token, "ListBanks", admin_pb.ListBanksRequest())
    if as_json:
        _print_json(_as_json(result))
        return
    table = Table("Code", "Name", "English name", "Address", "Enabled")
    for bank in result.banks:
        table.add_row(
            bank.code, bank.name, bank.english_name, bank.address, "yes" if bank.enabled else "[red]no[/]"
        )
    out.print(table)


@admin_app.command("set-bank")
def admin_set_bank(
    code: Annotated[str, typer.Argument(help="Bank code, e.g. ICBC.")],
    enabled: Annotated[
        bool | None,
        typer.Option("--enable/--disable", help="Query this bank in new lookups? (kept if not given)"),
    ] = None,
    address: Annotated[str | None, typer.Option(help="New host:port (kept if not given).")] = None,
    target: Target = DEFAULT_TARGET,
    admin_token: AdminToken = "",
    tls: Tls = False,
    ca: CaFile = None,
    as_json: Json = False,
) -> None:
    """Enable or disable a bank, or change its address: only what is given changes."""
    if enabled is None and address is None:
        raise typer.BadParameter("give --enable/--disable, --address, or both")
    request = admin_pb.UpdateBankRequest(code=code, enabled=bool(enabled), address=address or "")
    # The update mask names what changes (AIP-134): an address alone leaves the bank enabled.
    request.update_mask.paths.extend(
        path for path, value in (("enabled", enabled), ("address", address)) if value is not None
    )
    result = _admin_call(target, tls, ca, admin_token, "UpdateBank", request)
    if as_json:
        _print_json(_as_json(result))
    else:
        out.print(
            f"{result.bank.code}: {'enabled' if result.bank.enabled else 'disabled'} at {result.bank.address}"
        )


@admin_app.command("regions")
def admin_regions(
    target: Target = DEFAULT_TARGET,
    admin_token: AdminToken = "",
    tls: Tls = False,
    ca: CaFile = None,
    as_json: Json = False,
) -> None:
    """List regions and whether each is open."""
    result = _admin_call(target, tls, ca, admin_token, "ListRegions", admin_pb.ListRegionsRequest())
    if as_json:
        _print_json(_as_json(result))
        return
    table = Table("Code", "Name", "Open")
    for region in result.regions:
        table.add_row(region.code, region.name, "[green]open[/]" if region.open else "closed")
    out.print(table)


@admin_app.command("set-region")
def admin_set_region(
    code: Annotated[str, typer.Argument(help="GB/T 2260 region code, e.g. 440000.")],
    is_open: Annotated[bool, typer.Option("--open/--close", help="Open or close the region.")],
    target: Target = DEFAULT_TARGET,
    admin_token: AdminToken = "",
    tls: Tls = False,
    ca: CaFile = None,
    as_json: Json = False,
) -> None:
    """Open or close a region for new lookups."""
    request = admin_pb.UpdateRegionRequest(code=code, open=is_open)
    request.update_mask.paths.append("open")  # so that --close closes (false is no value without a mask)
    result = _admin_call(target, tls, ca, admin_token, "UpdateRegion", request)
    if as_json:
        _print_json(_as_json(result))
    else:
        out.print(f"{result.region.code} {result.region.name}: {'open' if result.region.open else 'closed'}")


@admin_app.command("stats")
def admin_stats(
    target: Target = DEFAULT_TARGET,
    admin_token: AdminToken = "",
    tls: Tls = False,
    ca: CaFile = None,
    as_json: Json = False,
) -> None:
    """Service statistics: people served, reports, per-bank success and latency."""
    result = _admin_call(target, tls, ca, admin_token, "GetServiceStats", admin_pb.GetServiceStatsRequest())
    if as_json:
        _print_json(_as_json(result))
        return
    out.print(
        f"people verified {result.people_verified} · lookups {result.lookups_created} · "
        f"reports {result.reports_generated}"
    )
    table = Table("Bank", "Answered", "Failed", "Mean latency (ms)")
    for bank in result.bank_stats:
        table.add_row(
            bank.bank_code, str(bank.answered_count), str(bank.failed_count), f"{bank.mean_latency_ms:.1f}"
        )
    out.print(table)


@admin_app.command("audit")
def admin_audit(
    actor: Annotated[
        str,
        typer.Option(
            help="Only this actor: a person's hash, admin:<credential id>, admin:console (the union's "
            "own command line), or admin (events from before admin credentials had names)."
        ),
    ] = "",
    since: Annotated[str, typer.Option(help="Only events at or after this ISO time (UTC if no zone).")] = "",
    until: Annotated[str, typer.Option(help="Only events before this ISO time.")] = "",
    page_size: Annotated[int, typer.Option(help="Events per page.")] = 100,
    target: Target = DEFAULT_TARGET,
    admin_token: AdminToken = "",
    tls: Tls = False,
    ca: CaFile = None,
    as_json: Json = False,
) -> None:
    """Audit events, newest first, by actor and time range."""
    request = admin_pb.ListAuditEventsRequest(actor=actor, page_size=page_size)
    for text, field in ((since, request.start_time), (until, request.end_time)):
        if text:
            moment = datetime.fromisoformat(text)
            field.FromDatetime(moment if moment.tzinfo else moment.replace(tzinfo=UTC))
    result = _admin_call(target, tls, ca, admin_token, "ListAuditEvents", request)
    if as_json:
        _print_json(_as_json(result))
        return
    full = Table("Time (UTC)", "Actor", "Action", "Outcome", "Resource")
    for event in result.events:
        full.add_row(
            f"{event.time.ToDatetime():%Y-%m-%d %H:%M:%S}",
            # Admin actors are short and name a credential; a person's hash is shown in part.
            event.actor if event.actor.startswith("admin") else event.actor[:12] + "…",
            event.action,
            event.outcome,
            event.resource,
        )
    out.print(full)


def main() -> None:  # pragma: no cover - console entry point convenience
    sys.exit(app())


if __name__ == "__main__":
    app()
