"""`cardlookup`: the command line for a person (verify, lookup, report) and an operator (admin).

Every command takes --json for scripts, errors included: a problem is one line on stderr
(`error: <field>: <rule>` or the server's explanation, with its hint: when to retry, attempts
left), or with --json one `{"error": {...}}` object on stdout. The exit code says what happened
(see EXIT_CODES; 1 also means a confirmation was declined). Times are shown in the local time
zone, named; commands that close, flag or delete ask first (--yes skips the question, and is
needed without a terminal).
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import sys
import unicodedata
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Annotated, Any, TypeVar
from zoneinfo import ZoneInfo

# Before gRPC loads: its core logs transport events (a failed TLS handshake, a GOAWAY) on stderr in
# its own words, and this CLI says what went wrong itself. GRPC_VERBOSITY=info brings them back.
os.environ.setdefault("GRPC_VERBOSITY", "NONE")

import grpc
import typer
from cardlookup.v1 import admin_service_pb2 as admin_pb
from cardlookup.v1 import card_action_service_pb2 as action_pb
from cardlookup.v1 import card_lookup_service_pb2 as lookup_pb
from google.protobuf.json_format import MessageToDict
from google.protobuf.message import Message
from google.protobuf.timestamp_pb2 import Timestamp
from rich.console import Console
from rich.live import Live
from rich.markup import escape
from rich.table import Table

from clients.client import TERMS_VERSION, CardLookupClient, CardLookupError, human_duration
from server.common import normalize

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
EXIT_DECLINED = 1

app = typer.Typer(
    help="一键查卡: find every bank card held in your name.", no_args_is_help=True, add_completion=False
)
admin_app = typer.Typer(help="Operator commands (need the admin credential).", no_args_is_help=True)
app.add_typer(admin_app, name="admin")

out = Console()
err = Console(stderr=True)


class _Output:
    """How this invocation reports, set while its options are parsed (see `Json`)."""

    json = False


OUTPUT = _Output()


def _remember_json(value: bool) -> bool:
    # Errors are printed far from the command's own code (in _run): every command's --json goes
    # through here, so each of them, admin ones included, gets JSON errors without passing it on.
    OUTPUT.json = value
    return value


Target = Annotated[str, typer.Option(envvar="CARDLOOKUP_TARGET", help="Union server host:port.")]
Json = Annotated[
    bool, typer.Option("--json", help="Print machine-readable JSON (errors too).", callback=_remember_json)
]
SessionFile = Annotated[
    Path,
    typer.Option(
        envvar="CARDLOOKUP_SESSION_FILE", help="Where the session credential is kept between commands."
    ),
]
AdminToken = Annotated[str, typer.Option(envvar="CARDLOOKUP_ADMIN_TOKEN", help="Admin credential.")]
Tls = Annotated[bool, typer.Option("--tls", help="Use TLS (system roots unless --ca is given).")]
CaFile = Annotated[Path | None, typer.Option("--ca", help="PEM file of the CA that signed the server.")]
Yes = Annotated[bool, typer.Option("--yes", "-y", help="Do it without asking (needed without a terminal).")]
Stream = Annotated[
    bool,
    typer.Option(
        "--stream", help="JSON lines (implies --json): one per progress event, then the report as the last."
    ),
]

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
# The pilot's opening dates are calendar days in China, wherever the operator sits.
CHINA = ZoneInfo("Asia/Shanghai")
UNASKED_REASONS = {
    lookup_pb.UNASKED_REASON_NOT_CHOSEN: "not chosen",
    lookup_pb.UNASKED_REASON_BANK_DISABLED: "not taking part now",
    lookup_pb.UNASKED_REASON_REQUERY_COOLDOWN: "answered recently",
}
OUTCOMES = {
    lookup_pb.BANK_OUTCOME_PENDING: "[cyan]pending[/]",
    lookup_pb.BANK_OUTCOME_ANSWERED: "[green]answered[/]",
    lookup_pb.BANK_OUTCOME_FAILED: "[red]failed[/]",
    lookup_pb.BANK_OUTCOME_NO_RESPONSE: "[red]no response[/]",
}
LOOKUP_STATES = {
    lookup_pb.LOOKUP_STATE_RUNNING: "[cyan]running[/]",
    lookup_pb.LOOKUP_STATE_COMPLETED: "[green]completed[/]",
}
# Session credential refusals: a new verification is the way out.
SIGN_IN_AGAIN = frozenset({"MISSING_CREDENTIAL", "INVALID_CREDENTIAL", "EXPIRED_CREDENTIAL"})
# verify's options, by the request field the union names in a refusal.
VERIFY_OPTIONS = {"name": "--name", "resident_id_number": "--id", "mobile_number": "--mobile"}
# A card ref is shown at least this long, and longer where two refs of a report share the prefix.
MIN_REF_CHARS = 7
# What the person typed, safe to repeat in an error (a ref or resource id, nothing else).
_ECHOABLE = re.compile(r"[A-Za-z0-9_-]{1,40}")
_FULL_ID = {"reports": re.compile(r"r[0-9a-f]{24}"), "lookups": re.compile(r"l[0-9a-f]{24}")}
_AGE = re.compile(r"([0-9]+)\s*(s|sec|m|min|h|d|w)\s*(?:ago)?")
_AGE_UNITS = {"s": "seconds", "sec": "seconds", "m": "minutes", "min": "minutes", "h": "hours"}
TIME_FORMS = (
    "an ISO date or time (2026-12-01, 2026-12-01T08:00, 2026-12-01T08:00+08:00; local time if no zone), "
    "now, today, yesterday, or an age such as 30m, 2h, 7d"
)


class Refusal(Exception):
    """A problem the CLI finds itself (bad input, an unanswered question): lines and an exit code."""

    def __init__(
        self,
        lines: Sequence[str],
        exit_code: int = 2,
        code: str = "INVALID_ARGUMENT",
        details: dict[str, Any] | None = None,
    ) -> None:
        super().__init__("; ".join(lines))
        self.lines = list(lines)
        self.exit_code = exit_code
        self.code = code
        self.details = details or {}


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


def error_lines(error: CardLookupError) -> list[str]:
    """One readable line per problem: each bad field with its rule, or the server's explanation
    with what to do about it. Never gRPC's own transport text (see CardLookupError)."""
    if error.field_violations:
        return [f"{field}: {description}" for field, description in error.field_violations]
    line = error.message or error.code.name.lower().replace("_", " ")
    if error.reason == "REGION_NOT_OPEN" and (region := error.metadata.get("region_code")):
        line += f" (region {region})"
    if error.reason in SIGN_IN_AGAIN:
        line += "; run `cardlookup verify` again"
    if "attempts_left" in error.metadata:
        line += f"; {error.metadata['attempts_left']} attempts left"
    if error.retry_after is not None:
        line += f"; retry in {human_duration(error.retry_after)}"
    return [line]


def _fail(lines: Sequence[str], code: str, exit_code: int, details: dict[str, Any]) -> typer.Exit:
    if OUTPUT.json:
        body = {"code": code, "message": "; ".join(lines), "problems": list(lines), **details}
        print(json.dumps({"error": body}, ensure_ascii=False), flush=True)
    else:
        for line in lines:
            # soft_wrap: one problem stays one line, however narrow the terminal.
            err.print(f"[red]error:[/] {escape(line)} [dim]({code})[/]", highlight=False, soft_wrap=True)
    return typer.Exit(exit_code)


def _run(work: Callable[[], Awaitable[T]]) -> T:
    """Run a coroutine; turn a server error or a refusal into clear lines and a meaningful exit code."""
    try:
        return asyncio.run(work())  # type: ignore[arg-type]
    except CardLookupError as error:
        raise _fail(error_lines(error), error.code.name, _exit_code(error), _details(error)) from None
    except Refusal as refusal:
        raise _fail(refusal.lines, refusal.code, refusal.exit_code, refusal.details) from None


def _exit_code(error: CardLookupError) -> int:
    return EXIT_CODES.get(error.code, 1)


def _details(error: CardLookupError) -> dict[str, Any]:
    """What --json adds to an error's lines: the server's reason and hints, for scripts."""
    details: dict[str, Any] = {"reason": error.reason, "reached_server": error.reached_server}
    if error.field_violations:
        details["field_violations"] = [
            {"field": field, "description": description} for field, description in error.field_violations
        ]
    if error.retry_after is not None:
        details["retry_after_seconds"] = int(error.retry_after.total_seconds())
    if error.metadata:
        details["metadata"] = error.metadata
    return details


def _refuse(refusal: Refusal) -> typer.Exit:
    """A refusal found before any call: printed like the errors of _run."""
    return _fail(refusal.lines, refusal.code, refusal.exit_code, {})


def _as_json(message: Message) -> dict[str, Any]:
    return MessageToDict(message, preserving_proto_field_name=True)


def _print_json(value: Any) -> None:
    out.print_json(json.dumps(value, ensure_ascii=False))


def _json_line(value: Any) -> None:
    print(json.dumps(value, ensure_ascii=False), flush=True)


def _load_session(path: Path) -> str:
    try:
        return str(json.loads(path.read_text())["session_token"])
    except (OSError, ValueError, KeyError):
        raise Refusal(["no session; run `cardlookup verify` first"], 4, "UNAUTHENTICATED") from None


def _interactive() -> bool:
    """Whether a person is there to answer a question (stdin is a terminal)."""
    return sys.stdin.isatty()


def _confirm(question: str, yes: bool, flag: str = "--yes") -> None:
    """Ask before acting; `flag` (--yes) answers for the person. Without a terminal, refuse rather
    than guess."""
    if yes:
        return
    if not _interactive():
        raise Refusal([f"this asks for confirmation, and there is no terminal to ask on: pass {flag}"], 2)
    if not typer.confirm(question, default=False, err=True):
        raise Refusal(["not confirmed; nothing was changed"], EXIT_DECLINED, "CANCELLED")


def _ask_early(yes: bool, flag: str = "--yes") -> None:
    """Refuse before any call when nobody can answer the question asked later."""
    if not yes and not _interactive():
        raise _refuse(
            Refusal([f"this asks for confirmation, and there is no terminal to ask on: pass {flag}"])
        )


def local_time(value: Timestamp | datetime, seconds: bool = False) -> str:
    """A moment in the local time zone, with the zone named (TZ decides, as for `date`)."""
    moment = value if isinstance(value, datetime) else value.ToDatetime(tzinfo=UTC)
    return moment.astimezone().strftime("%Y-%m-%d %H:%M:%S %Z" if seconds else "%Y-%m-%d %H:%M %Z")


def parse_time(text: str, now: datetime | None = None) -> datetime:
    """A moment from what a person types (see TIME_FORMS); ValueError says what is accepted."""
    now = now or datetime.now(UTC)
    value = unicodedata.normalize("NFKC", text).strip().lower()
    if value == "now":
        return now
    if value in ("today", "yesterday"):
        midnight = now.astimezone().replace(hour=0, minute=0, second=0, microsecond=0)
        return midnight - timedelta(days=1 if value == "yesterday" else 0)
    if age := _AGE.fullmatch(value):
        amount, unit = int(age.group(1)), age.group(2)
        if unit in ("d", "w"):
            return now - timedelta(days=amount * (7 if unit == "w" else 1))
        return now - timedelta(**{_AGE_UNITS[unit]: amount})
    try:
        moment = datetime.fromisoformat(value.upper())
    except ValueError:
        raise ValueError(f"not a time: use {TIME_FORMS}") from None
    return moment if moment.tzinfo else moment.astimezone()  # a naive time is local time


def _elapsed(lookup: lookup_pb.Lookup, now: datetime) -> timedelta:
    return max(now - lookup.create_time.ToDatetime(tzinfo=UTC), timedelta(0))


def _clock(delta: timedelta) -> str:
    seconds = int(delta.total_seconds())
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}" if hours else f"{rest // 60}:{rest % 60:02d}"


def answered(lookup: lookup_pb.Lookup) -> tuple[int, int, int]:
    """(banks answered, banks failed or silent, banks asked)."""
    outcomes = [bank.outcome for bank in lookup.bank_progress]
    done = outcomes.count(lookup_pb.BANK_OUTCOME_ANSWERED)
    failed = outcomes.count(lookup_pb.BANK_OUTCOME_FAILED) + outcomes.count(
        lookup_pb.BANK_OUTCOME_NO_RESPONSE
    )
    return done, failed, len(outcomes)


def progress_line(lookup: lookup_pb.Lookup, now: datetime | None = None) -> str:
    """`7/16 answered · 0:04 elapsed` (with failures, when there are some)."""
    done, failed, total = answered(lookup)
    line = f"{done}/{total} answered"
    if failed:
        line += f", {failed} failed"
    if lookup.state == lookup_pb.LOOKUP_STATE_RUNNING:
        line += f" · {_clock(_elapsed(lookup, now or datetime.now(UTC)))} elapsed"
    return line


def short_refs(refs: Sequence[str]) -> dict[str, str]:
    """Each card ref cut to the shortest prefix (at least MIN_REF_CHARS) no other ref starts with,
    as git shortens commit ids: what `close` and `not-mine` accept back."""
    shown = {}
    for ref in refs:
        length = MIN_REF_CHARS
        while length < len(ref) and any(o != ref and o.startswith(ref[:length]) for o in refs):
            length += 1
        shown[ref] = ref[:length]
    return shown


def _typed_id(text: str) -> str:
    """What was typed, without the ellipsis a shortened id is shown with."""
    return unicodedata.normalize("NFKC", text).strip().removesuffix("…").removesuffix("...")


def _label(position: int, typed: str, what: str) -> str:
    shown = f" {typed}" if _ECHOABLE.fullmatch(typed) else ""
    return f"{what} #{position}{shown}" if position else f"{what}{shown}"


def resolve_card_refs(report: lookup_pb.Report, typed: Sequence[str]) -> list[lookup_pb.ReportCard]:
    """The report's cards for refs typed whole or as any unique prefix; Refusal naming each that
    matches no card or several (it lists no card: only how many match)."""
    chosen: list[lookup_pb.ReportCard] = []
    problems = []
    for position, text in enumerate(typed, 1):
        prefix = _typed_id(text)
        label = _label(position if len(typed) > 1 else 0, prefix, "card ref")
        matches = [card for card in report.cards if card.card_ref == prefix] or [
            card for card in report.cards if prefix and card.card_ref.startswith(prefix)
        ]
        if not matches:
            problems.append(f"{label}: no card in {report.name} has this ref")
        elif len(matches) > 1:
            problems.append(
                f"{label}: {len(matches)} cards in this report start with it; type more of the ref"
            )
        elif matches[0] not in chosen:
            chosen.append(matches[0])
    if problems:
        raise Refusal(problems, 2)
    return chosen


async def resolve_name(collection: str, typed: str, names: Callable[[], Awaitable[Sequence[str]]]) -> str:
    """`reports/{id}` (or `lookups/{id}`) for a name typed whole, as a bare id, or as any unique
    prefix of one of the caller's own; `names` lists theirs, asked only for a prefix."""
    text = _typed_id(typed).removeprefix(f"{collection}/")
    if _FULL_ID[collection].fullmatch(text):
        return f"{collection}/{text}"
    singular = collection.removesuffix("s")
    label = _label(0, text, singular)
    matches = [
        name for name in await names() if text and name.removeprefix(f"{collection}/").startswith(text)
    ]
    if not matches:
        raise Refusal([f"{label}: none of your {collection} has this name"], 3, "NOT_FOUND")
    if len(matches) > 1:
        raise Refusal(
            [f"{label}: {len(matches)} of your {collection} start with it; type more of the name"], 2
        )
    return matches[0]


async def _report_names(client: CardLookupClient) -> list[str]:
    return [report.name for report in (await client.list_reports(page_size=100)).reports]


async def _lookup_names(client: CardLookupClient) -> list[str]:
    return [lookup.name for lookup in (await client.list_lookups(page_size=100)).lookups]


def _card_label(card: lookup_pb.ReportCard) -> str:
    kind = CARD_TYPES.get(card.card_type, "?").split(" ")[-1]
    return f"{card.bank_code} {card.masked_number} ({kind})"


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
        f"{report.total_credit_card_count} credit · expires {local_time(report.expire_time)}"
    )
    # Sized for an 80-column terminal: the bank's full name is in the table above.
    cards = Table(title="Cards", title_justify="left")
    cards.add_column("Bank", no_wrap=True)
    cards.add_column("Type", no_wrap=True)
    cards.add_column("Number", no_wrap=True)
    cards.add_column("Status", no_wrap=True)
    cards.add_column("Ref", style="dim", no_wrap=True)
    refs = short_refs([card.card_ref for card in report.cards])
    for card in report.cards:
        cards.add_row(
            card.bank_code,
            CARD_TYPES.get(card.card_type, "?"),
            card.masked_number,
            CARD_STATUSES.get(card.status, "?"),
            refs[card.card_ref],
        )
    retry = [
        summary.bank_code
        for summary in report.bank_summaries
        if summary.outcome in (lookup_pb.BANK_OUTCOME_FAILED, lookup_pb.BANK_OUTCOME_NO_RESPONSE)
    ]
    tables = [banks]
    if retry:
        # Its own line, so a terminal copies the command whole.
        hint = Table.grid()
        hint.add_row(
            f"{', '.join(retry)} did not answer and can be asked again now: "
            f"cardlookup lookup --again {report.name}"
        )
        tables.append(hint)
    if report.unasked_banks:
        unasked = Table(title="Banks not asked", title_justify="left")
        unasked.add_column("Bank")
        unasked.add_column("Why")
        for skipped in report.unasked_banks:
            why = UNASKED_REASONS.get(skipped.reason, "?")
            if skipped.HasField("next_query_time"):
                why += f" until {local_time(skipped.next_query_time)}"
            unasked.add_row(f"{skipped.bank_name} ({skipped.bank_code})", why)
        tables.append(unasked)
    tables.append(cards)
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


def progress_table(lookup: lookup_pb.Lookup, now: datetime | None = None) -> Table:
    title = f"{lookup.name} — {LOOKUP_STATES.get(lookup.state, '?')} · {progress_line(lookup, now)}"
    table = Table(title=title, title_justify="left")
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


class LiveProgress:
    """The progress table as rich redraws it: the elapsed time moves on between events."""

    def __init__(self, lookup: lookup_pb.Lookup) -> None:
        self.lookup = lookup

    def __rich__(self) -> Table:
        return progress_table(self.lookup)


def progress_event(event: lookup_pb.WatchLookupResponse, now: datetime | None = None) -> dict[str, Any]:
    """One JSON line of `lookup --json --stream`."""
    lookup = event.lookup
    done, failed, total = answered(lookup)
    return {
        "event": "progress",
        "lookup": lookup.name,
        "state": lookup_pb.LookupState.Name(lookup.state),
        "answered": done,
        "failed": failed,
        "banks": total,
        "elapsed_seconds": int(_elapsed(lookup, now or datetime.now(UTC)).total_seconds()),
        "changed": list(event.bank_codes),
        "report": lookup.report,
    }


async def _follow(
    client: CardLookupClient, first: lookup_pb.Lookup, as_json: bool, stream: bool
) -> lookup_pb.Report:
    """Follow a lookup until its report is ready, showing progress as asked; return the report."""
    events: AsyncIterator[lookup_pb.WatchLookupResponse] = client.watch_lookup(
        first.name, group_bank_changes=True
    )
    if as_json:
        async for event in events:
            if stream:
                _json_line(progress_event(event))
            if event.report_ready:
                return await client.get_report(event.lookup.report)
    else:
        view = LiveProgress(first)
        with Live(view, console=out, transient=False, refresh_per_second=2):
            async for event in events:
                view.lookup = event.lookup
                if event.report_ready:
                    return await client.get_report(event.lookup.report)
    raise CardLookupError(grpc.StatusCode.UNAVAILABLE, "the watch ended before the report was ready")


def _show_report(report: lookup_pb.Report, as_json: bool, stream: bool = False) -> None:
    if as_json and stream:
        _json_line({"event": "report", "report": _as_json(report)})
    elif as_json:
        _print_json(_as_json(report))
    else:
        for table in report_table(report):
            out.print(table)


def _one_time_code(text: str) -> str:
    return "".join(unicodedata.normalize("NFKC", text).split())


@app.command()
def verify(
    name: Annotated[str, typer.Option(help="Your name as registered.")],
    id_number: Annotated[
        str, typer.Option("--id", help="Your 18-character resident ID number (a lowercase x is fine).")
    ],
    mobile: Annotated[
        str, typer.Option(help="Your registered mobile number (spaces, dashes, +86 are fine).")
    ],
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
    """Real-name verification: sends a one-time code by SMS, then stores the session credential.

    What you type is normalised first, as the union does (server/common/normalize.py): surrounding
    spaces, full-width digits, a lowercase x, and +86/0086, spaces or dashes in the mobile number."""
    typed = normalize.identity(name, id_number, mobile)
    if typed.problems:
        raise _refuse(Refusal([f"{VERIFY_OPTIONS[field]}: {problem}" for field, problem in typed.problems]))

    async def work() -> dict[str, Any]:
        async with _client(target, tls, ca) as client:
            try:
                started = await client.start_verification(
                    typed.name, typed.resident_id_number, typed.mobile_number
                )
            except CardLookupError as error:
                if error.reason != "REGION_NOT_OPEN":
                    raise
                line = error_lines(error)[0] + "; no code was sent"
                raise Refusal([line], _exit_code(error), error.code.name, _details(error)) from None
            asked = code is None and sms_outbox is None
            one_time = code
            if one_time is None and sms_outbox is not None:
                from server.union.sms import read_one_time_code

                one_time = read_one_time_code(sms_outbox, typed.mobile_number)
            while True:
                if one_time is None:
                    one_time = typer.prompt(f"Code sent to {started.masked_mobile_number}", err=True)
                    asked = True
                try:
                    done = await client.complete_verification(
                        started.verification_id, _one_time_code(one_time)
                    )
                    break
                except CardLookupError as error:
                    # A mistyped code is asked for again, while attempts are left and someone is there.
                    retry = error.reason == "WRONG_CODE" or error.code == grpc.StatusCode.INVALID_ARGUMENT
                    if not retry or not (asked or _interactive()):
                        raise
                    err.print(f"[yellow]{escape(error_lines(error)[0])}[/]", highlight=False)
                    one_time = None
            session_file.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(session_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w") as handle:
                json.dump({"session_token": done.session_token, "target": target}, handle)
            return {
                "verified": True,
                "masked_mobile_number": started.masked_mobile_number,
                "region_code": done.region_code,
                "expire_time": done.expire_time.ToJsonString(),
                "local_expire_time": local_time(done.expire_time),
            }

    result = _run(work)
    if as_json:
        _print_json(result)
    else:
        out.print(
            f"[green]verified[/] · code went to {result['masked_mobile_number']} · "
            f"session until {result['local_expire_time']}"
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


TERMS = (
    f"Terms {TERMS_VERSION}: to find the cards in your name, the card union sends your name and "
    "resident ID number to the banks you ask; it keeps only a masked report (first 4 and last 4 "
    "digits of each card) for 7 days."
)


@app.command()
def lookup(
    bank: Annotated[
        list[str], typer.Option(help="Ask only these banks, by code (repeatable); default: every bank.")
    ] = [],  # noqa: B006
    again: Annotated[
        str | None,
        typer.Option(
            help="reports/{id} (or a unique prefix): ask again the banks that failed or did not answer there."
        ),
    ] = None,
    agree_terms: Annotated[
        bool,
        # Consent is its own flag: the generic --yes (skip a confirmation) must never give it.
        typer.Option("--agree-terms", help=f"You accept the union's terms ({TERMS_VERSION})."),
    ] = False,
    request_id: Annotated[
        str | None, typer.Option(help="Idempotency key; a retry with it returns the same lookup.")
    ] = None,
    target: Target = DEFAULT_TARGET,
    session_file: SessionFile = DEFAULT_SESSION,
    tls: Tls = False,
    ca: CaFile = None,
    as_json: Json = False,
    stream: Stream = False,
) -> None:
    """Look up every card in your name (or at the banks you choose): live per-bank progress, then
    the masked report. You are asked to accept the terms first (--agree-terms accepts them)."""
    as_json = _remember_json(as_json or stream)
    if again is not None and bank:
        raise _refuse(Refusal(["--again asks the banks that failed in a report: leave out --bank"]))
    _ask_early(agree_terms, "--agree-terms")

    async def work() -> lookup_pb.Report:
        async with _client(target, tls, ca, session=_load_session(session_file)) as client:
            chosen = list(bank)
            if again is not None:
                report = await client.get_report(
                    await resolve_name("reports", again, lambda: _report_names(client))
                )
                chosen = [
                    summary.bank_code
                    for summary in report.bank_summaries
                    if summary.outcome in (lookup_pb.BANK_OUTCOME_FAILED, lookup_pb.BANK_OUTCOME_NO_RESPONSE)
                ]
                if not chosen:
                    raise Refusal([f"every bank answered in {report.name}: there is nothing to ask again"], 3)
            _confirm(f"{TERMS}\nDo you accept these terms?", agree_terms, "--agree-terms")
            created = await client.create_lookup(chosen, request_id, consent_terms_version=TERMS_VERSION)
            return await _follow(client, created, as_json, stream)

    _show_report(_run(work), as_json, stream)


@app.command()
def watch(
    name: Annotated[
        str | None,
        typer.Argument(
            help="lookups/{id}, or any unique prefix of its id; default: your newest running one."
        ),
    ] = None,
    target: Target = DEFAULT_TARGET,
    session_file: SessionFile = DEFAULT_SESSION,
    tls: Tls = False,
    ca: CaFile = None,
    as_json: Json = False,
    stream: Stream = False,
) -> None:
    """Go back to a lookup: live per-bank progress until its report is ready, then the report."""
    as_json = _remember_json(as_json or stream)

    async def work() -> lookup_pb.Report:
        async with _client(target, tls, ca, session=_load_session(session_file)) as client:
            if name is None:
                listed = (await client.list_lookups(page_size=100)).lookups
                running = [item for item in listed if item.state == lookup_pb.LOOKUP_STATE_RUNNING]
                if not running:
                    raise Refusal(
                        ["none of your lookups is running; `cardlookup status` lists them"], 3, "NOT_FOUND"
                    )
                chosen = running[0]
            else:
                chosen = await client.get_lookup(
                    await resolve_name("lookups", name, lambda: _lookup_names(client))
                )
            return await _follow(client, chosen, as_json, stream)

    _show_report(_run(work), as_json, stream)


@app.command()
def status(
    name: Annotated[
        str | None, typer.Argument(help="lookups/{id} (or a unique prefix); without it, list your lookups.")
    ] = None,
    page_size: Annotated[int, typer.Option(help="Lookups per page.")] = 10,
    page_token: Annotated[str, typer.Option(help="Token from the previous page.")] = "",
    target: Target = DEFAULT_TARGET,
    session_file: SessionFile = DEFAULT_SESSION,
    tls: Tls = False,
    ca: CaFile = None,
    as_json: Json = False,
) -> None:
    """Your lookups, newest first (running ones, and those whose report is still kept), or one in full."""

    async def work() -> lookup_pb.ListLookupsResponse:
        async with _client(target, tls, ca, session=_load_session(session_file)) as client:
            if name is None:
                return await client.list_lookups(page_size, page_token)
            one = await client.get_lookup(await resolve_name("lookups", name, lambda: _lookup_names(client)))
            return lookup_pb.ListLookupsResponse(lookups=[one])

    result = _run(work)
    if as_json:
        _print_json(_as_json(result.lookups[0]) if name is not None else _as_json(result))
        return
    if name is not None:
        out.print(progress_table(result.lookups[0]))
        return
    table = Table("Lookup", "State", "Progress", "Started", "Report")
    for item in result.lookups:
        table.add_row(
            item.name,
            LOOKUP_STATES.get(item.state, "?"),
            progress_line(item),
            local_time(item.create_time),
            item.report,
        )
    out.print(table)
    if result.next_page_token:
        out.print(f"next page: --page-token {result.next_page_token}")


@app.command()
def report(
    name: Annotated[str, typer.Argument(help="reports/{id}, or any unique prefix of its id")],
    target: Target = DEFAULT_TARGET,
    session_file: SessionFile = DEFAULT_SESSION,
    tls: Tls = False,
    ca: CaFile = None,
    as_json: Json = False,
) -> None:
    """Show one of your reports."""

    async def work() -> lookup_pb.Report:
        async with _client(target, tls, ca, session=_load_session(session_file)) as client:
            return await client.get_report(await resolve_name("reports", name, lambda: _report_names(client)))

    _show_report(_run(work), as_json)


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
    table = Table("Report", "Generated", "Expires", "Cards")
    for item in result.reports:
        table.add_row(
            item.name,
            local_time(item.generate_time),
            local_time(item.expire_time),
            str(item.total_card_count),
        )
    out.print(table)
    if result.next_page_token:
        out.print(f"next page: --page-token {result.next_page_token}")


@app.command()
def delete(
    name: Annotated[str, typer.Argument(help="reports/{id}, or any unique prefix of its id")],
    yes: Yes = False,
    target: Target = DEFAULT_TARGET,
    session_file: SessionFile = DEFAULT_SESSION,
    tls: Tls = False,
    ca: CaFile = None,
    as_json: Json = False,
) -> None:
    """Delete one of your reports now instead of waiting for it to expire (asks first)."""
    _ask_early(yes)

    async def work() -> str:
        async with _client(target, tls, ca, session=_load_session(session_file)) as client:
            full = await resolve_name("reports", name, lambda: _report_names(client))
            _confirm(f"Delete {full} and its cards for good?", yes)
            await client.delete_report(full)
            return full

    deleted = _run(work)
    if as_json:
        _print_json({"deleted": deleted})
    else:
        out.print(f"deleted {deleted}")


@app.command()
def close(
    report_name: Annotated[str, typer.Argument(metavar="REPORT", help="reports/{id}, or a unique prefix")],
    card_refs: Annotated[
        list[str],
        typer.Argument(metavar="CARD_REF...", help="Card refs from the report, or unique prefixes."),
    ],
    request_id: Annotated[
        str | None, typer.Option(help="Idempotency key; a retry returns the same request.")
    ] = None,
    yes: Yes = False,
    target: Target = DEFAULT_TARGET,
    session_file: SessionFile = DEFAULT_SESSION,
    tls: Tls = False,
    ca: CaFile = None,
    as_json: Json = False,
) -> None:
    """Ask the banks to close cards from one of your reports (each bank decides; asks first)."""
    _ask_early(yes)

    async def work() -> action_pb.CardClosure:
        async with _client(target, tls, ca, session=_load_session(session_file)) as client:
            full = await resolve_name("reports", report_name, lambda: _report_names(client))
            cards = resolve_card_refs(await client.get_report(full), card_refs)
            listed = "\n".join(f"  {_card_label(card)}" for card in cards)
            _confirm(f"Ask the banks to close {len(cards)} card(s)?\n{listed}\n", yes)
            return await client.close_cards(full, [card.card_ref for card in cards], request_id)

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
    report_name: Annotated[str, typer.Argument(metavar="REPORT", help="reports/{id}, or a unique prefix")],
    card_ref: Annotated[str, typer.Argument(help="The card's ref in that report, or a unique prefix.")],
    yes: Yes = False,
    target: Target = DEFAULT_TARGET,
    session_file: SessionFile = DEFAULT_SESSION,
    tls: Tls = False,
    ca: CaFile = None,
    as_json: Json = False,
) -> None:
    """Flag a card you do not recognise: its bank freezes it and opens a fraud case (asks first)."""
    _ask_early(yes)

    async def work() -> action_pb.CardFlag:
        async with _client(target, tls, ca, session=_load_session(session_file)) as client:
            full = await resolve_name("reports", report_name, lambda: _report_names(client))
            (card,) = resolve_card_refs(await client.get_report(full), [card_ref])
            consequence = f"{card.bank_code} will freeze it and open a fraud case"
            _confirm(f"Flag {_card_label(card)} as not yours? {consequence}.", yes)
            return await client.flag_not_mine(full, card.card_ref)

    result = _run(work)
    if as_json:
        _print_json(_as_json(result))
    else:
        case = result.case_number or "(pending)"
        out.print(f"{result.bank_code}: {FLAG_STATES.get(result.state, '?')} · case {case}")


def _events_table(events: list[action_pb.AuditEvent]) -> Table:
    table = Table("Time", "Action", "Outcome", "Resource")
    for event in events:
        table.add_row(local_time(event.time, seconds=True), event.action, event.outcome, event.resource)
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


@admin_app.command("add-bank")
def admin_add_bank(
    code: Annotated[str, typer.Argument(help="The joining bank's code, e.g. BOSC.")],
    name: Annotated[str, typer.Option(help="Chinese name, e.g. 上海银行.")],
    english_name: Annotated[str, typer.Option(help="English name, e.g. Bank of Shanghai.")],
    interbank_code: Annotated[str, typer.Option(help="3-digit CNAPS code, e.g. 325.")],
    address: Annotated[str, typer.Option(help="host:port of its BankQueryService.")],
    tls_name: Annotated[
        str,
        typer.Option(help="DNS name its certificate carries (default: <code>.bank.cardlookup.test)."),
    ] = "",
    target: Target = DEFAULT_TARGET,
    admin_token: AdminToken = "",
    tls: Tls = False,
    ca: CaFile = None,
    as_json: Json = False,
) -> None:
    """Register a bank that joins the service: the next lookup asks it, no restart."""
    bank = admin_pb.Bank(
        code=code,
        name=name,
        english_name=english_name,
        interbank_code=interbank_code,
        address=address,
        tls_name=tls_name,
    )
    result = _admin_call(target, tls, ca, admin_token, "CreateBank", admin_pb.CreateBankRequest(bank=bank))
    if as_json:
        _print_json(_as_json(result))
    else:
        added = result.bank
        out.print(f"{added.code} {added.name} joined at {added.address} (certificate name {added.tls_name})")


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
    table = Table("Code", "Name", "Open", "Pilot")
    for region in result.regions:
        pilot = (
            f"batch {region.pilot_batch}, {region.pilot_open_time.ToDatetime(tzinfo=CHINA):%Y-%m}"
            if region.pilot_batch
            else ""
        )
        table.add_row(region.code, region.name, "[green]open[/]" if region.open else "closed", pilot)
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
    since: Annotated[
        str,
        typer.Option(help="Only events at or after this time: ISO (local if no zone), yesterday, 2h, 7d."),
    ] = "",
    until: Annotated[str, typer.Option(help="Only events before this time (same forms as --since).")] = "",
    page_size: Annotated[int, typer.Option(help="Events per page.")] = 100,
    target: Target = DEFAULT_TARGET,
    admin_token: AdminToken = "",
    tls: Tls = False,
    ca: CaFile = None,
    as_json: Json = False,
) -> None:
    """Audit events, newest first, by actor and time range."""
    request = admin_pb.ListAuditEventsRequest(actor=actor, page_size=page_size)
    for option, text, field in (("--since", since, request.start_time), ("--until", until, request.end_time)):
        if text:
            try:
                field.FromDatetime(parse_time(text))
            except ValueError as problem:
                raise _refuse(Refusal([f"{option}: {problem}"])) from None
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
