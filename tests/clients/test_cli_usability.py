"""The CLI as people use it: unique prefixes, watch and status, confirmations, readable errors,
local times, progress, and verification input typed the way people type it.

Commands run through typer's CliRunner (in a worker thread: the CLI runs its own event loop, the
union serves on the test's), or in a subprocess, or on a real pseudo-terminal where a person
answers a question."""

from __future__ import annotations

import asyncio
import json
import os
import pty
import re
import socket
import sys
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from cardlookup.v1 import card_lookup_service_pb2 as lookup_pb
from google.protobuf.timestamp_pb2 import Timestamp
from typer.testing import CliRunner, Result

from clients import cli
from clients.client import TERMS_VERSION, CardLookupClient
from server.common import errors
from server.union.sms import read_one_time_code
from server.union.union_server import UnionServer
from tests.conftest import WANG, ZHANG, UnionFactory

BIN = Path(sys.executable).parent
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]|\x1b\][^\x07]*\x07")
FULL_WIDTH = str.maketrans("0123456789", "０１２３４５６７８９")
# Storage is not what these tests are about: SQLite alone.
SQLITE = pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)


class Cli:
    """`cardlookup …` through CliRunner, with one session file and the union as target."""

    def __init__(self, union: UnionServer, tmp_path: Path) -> None:
        self.union = union
        self.session = tmp_path / "session.json"
        self.runner = CliRunner()

    async def __call__(self, *args: str, answer: str | None = None, target: str | None = None) -> Result:
        env = {
            "CARDLOOKUP_SESSION_FILE": str(self.session),
            "CARDLOOKUP_TARGET": target or self.union.address,
            "CARDLOOKUP_ADMIN_TOKEN": "test-admin-token",
            "COLUMNS": "200",
        }
        return await asyncio.to_thread(self.runner.invoke, cli.app, list(args), input=answer, env=env)

    async def verify(self, *typed: str) -> None:
        name, resident_id, mobile = typed or (ZHANG.name, ZHANG.resident_id_number, ZHANG.mobile_number)
        outbox = str(self.union.config.sms_sink_path)
        result = await self(
            "verify", "--name", name, "--id", resident_id, "--mobile", mobile, "--sms-outbox", outbox
        )
        assert result.exit_code == 0, result.output

    def client(self) -> CardLookupClient:
        token = json.loads(self.session.read_text())["session_token"]
        return CardLookupClient(self.union.address, session_token=token)

    async def report(self) -> dict[str, Any]:
        result = await self("lookup", "--agree-terms", "--json")
        assert result.exit_code == 0, result.output
        report: dict[str, Any] = json.loads(result.stdout)
        return report


@pytest.fixture
def run(union: UnionServer, tmp_path: Path) -> Cli:
    return Cli(union, tmp_path)


def error_lines(result: Result) -> list[str]:
    return [line for line in result.stderr.splitlines() if line.strip()]


# -- 6: card refs and names by any unique prefix ---------------------------------------------------


def test_short_refs_grow_only_where_two_refs_share_a_prefix() -> None:
    refs = ["c517f9aa00", "c517f9ab11", "c0c750ffff", "c28617eeee"]
    shown = cli.short_refs(refs)
    assert shown == {
        "c517f9aa00": "c517f9aa",
        "c517f9ab11": "c517f9ab",
        "c0c750ffff": "c0c750f",
        "c28617eeee": "c28617e",
    }


@SQLITE
async def test_cards_and_reports_by_unique_prefix(run: Cli) -> None:
    await run.verify()
    report = await run.report()
    refs = {card["masked_number"][-4:]: card["card_ref"] for card in report["cards"]}

    table = await run("report", report["name"])
    assert table.exit_code == 0, table.output
    shown = cli.short_refs(list(refs.values()))
    for ref in refs.values():
        assert shown[ref] in table.stdout  # enough of each ref to be unique, not an ellipsis
        assert ref not in table.stdout or len(shown[ref]) == len(ref)

    # As the README writes it: the report by a prefix of its id, a card ref as shown, with its ellipsis.
    report_prefix = report["name"].removeprefix("reports/")[:6]
    closed = await run("close", report_prefix, shown[refs["1472"]] + "…", "--yes", "--json")
    assert closed.exit_code == 0, closed.output
    assert [item["card_ref"] for item in json.loads(closed.stdout)["items"]] == [refs["1472"]]

    ambiguous = await run("not-mine", report["name"], "c", "--yes")
    assert ambiguous.exit_code == 2
    lines = error_lines(ambiguous)
    assert len(lines) == 1
    assert "card ref c: 5 cards in this report start with it; type more of the ref" in lines[0]
    for card in report["cards"]:  # it lists no card
        assert card["card_ref"] not in ambiguous.output
        assert card["masked_number"][-4:] not in ambiguous.output

    missing = await run("close", report["name"], "zz", shown[refs["0918"]], "--yes")
    assert missing.exit_code == 2
    assert f"card ref #1 zz: no card in {report['name']} has this ref" in missing.stderr


# -- 7: watch and status ----------------------------------------------------------------------------


@SQLITE
async def test_status_and_watch_find_a_running_lookup(make_union: UnionFactory, tmp_path: Path) -> None:
    union = await make_union(lookups={"requery_cooldown": timedelta(0)})
    run = Cli(union, tmp_path)
    await run.verify()
    nothing = await run("watch")
    assert nothing.exit_code == 3
    assert "none of your lookups is running; `cardlookup status` lists them" in nothing.stderr

    await union.orchestrator.stop(0)  # the lookup stays in flight while we look at it
    async with run.client() as client:
        running = await client.create_lookup(request_id=uuid.uuid4().hex, consent_terms_version=TERMS_VERSION)
    status = await run("status")
    assert status.exit_code == 0, status.output
    assert running.name in status.stdout
    assert "running" in status.stdout
    assert "0/16 answered" in status.stdout
    listed = await run("status", "--json")
    assert [item["name"] for item in json.loads(listed.stdout)["lookups"]] == [running.name]
    one = await run("status", running.name.removeprefix("lookups/")[:5])
    assert one.exit_code == 0, one.output
    assert "(ICBC)" in one.stdout

    union.orchestrator.start()
    watched = await run("watch")  # no name: the newest running lookup
    assert watched.exit_code == 0, watched.output
    assert "16/16 answered" in watched.stdout
    assert "Cards" in watched.stdout  # then the report

    # The JSON-lines stream of a lookup: progress events, then the report as the last line.
    streamed = await run("lookup", "--agree-terms", "--json", "--stream")
    assert streamed.exit_code == 0, streamed.output
    lines = [json.loads(line) for line in streamed.stdout.splitlines()]
    progress, last = lines[:-1], lines[-1]
    assert progress
    assert all(line["event"] == "progress" and line["banks"] == 16 for line in progress)
    counts = [line["answered"] for line in progress]
    assert counts == sorted(counts)
    assert (progress[-1]["answered"], progress[-1]["state"]) == (16, "LOOKUP_STATE_COMPLETED")
    assert all(isinstance(line["elapsed_seconds"], int) for line in progress)
    assert last["event"] == "report"
    assert last["report"]["total_card_count"] == 5

    again = await run("watch", progress[-1]["lookup"], "--stream")  # --stream is JSON
    assert [json.loads(line)["event"] for line in again.stdout.splitlines()] == ["progress", "report"]


def _lookup(answered: int, failed: int, created: datetime) -> lookup_pb.Lookup:
    outcomes = (
        [lookup_pb.BANK_OUTCOME_ANSWERED] * answered
        + [lookup_pb.BANK_OUTCOME_FAILED] * failed
        + [lookup_pb.BANK_OUTCOME_PENDING] * (16 - answered - failed)
    )
    create_time = Timestamp()
    create_time.FromDatetime(created)
    return lookup_pb.Lookup(
        name="lookups/l" + "0" * 24,
        state=lookup_pb.LOOKUP_STATE_RUNNING,
        create_time=create_time,
        bank_progress=[lookup_pb.BankProgress(bank_code=f"B{i}", outcome=o) for i, o in enumerate(outcomes)],
    )


def test_progress_shows_banks_answered_and_elapsed_time() -> None:
    created = datetime(2026, 12, 5, 8, 0, tzinfo=UTC)
    lookup = _lookup(7, 1, created)
    assert (
        cli.progress_line(lookup, created + timedelta(seconds=42)) == "7/16 answered, 1 failed · 0:42 elapsed"
    )
    assert cli.progress_line(_lookup(0, 0, created), created + timedelta(hours=1, seconds=5)) == (
        "0/16 answered · 1:00:05 elapsed"
    )
    event = lookup_pb.WatchLookupResponse(lookup=lookup, bank_codes=["B6"])
    line = cli.progress_event(event, created + timedelta(seconds=42))
    assert (line["answered"], line["failed"], line["banks"], line["elapsed_seconds"]) == (7, 1, 16, 42)
    assert line["changed"] == ["B6"]


# -- 8: confirmation --------------------------------------------------------------------------------


@SQLITE
async def test_only_agree_terms_gives_consent(run: Cli) -> None:
    """--yes skips a confirmation; it must not accept the terms of a lookup for the person."""
    await run.verify()
    refused = await run("lookup")
    assert refused.exit_code == 2
    assert error_lines(refused) == [
        "error: this asks for confirmation, and there is no terminal to ask on: pass --agree-terms"
        " (INVALID_ARGUMENT)"
    ]
    unknown = await run("lookup", "--yes")
    assert unknown.exit_code == 2
    assert "No such option: --yes" in unknown.output
    assert json.loads((await run("status", "--json")).stdout).get("lookups", []) == []  # nothing was asked


@SQLITE
async def test_destructive_commands_ask_first(run: Cli, monkeypatch: pytest.MonkeyPatch) -> None:
    await run.verify()
    report = await run.report()
    name = report["name"]
    ref = report["cards"][0]["card_ref"]

    # No terminal and no --yes: refused before anything is sent, plainly, or as JSON.
    for command in (["delete", name], ["close", name, ref], ["not-mine", name, ref]):
        refused = await run(*command)
        assert refused.exit_code == 2
        assert error_lines(refused) == [
            "error: this asks for confirmation, and there is no terminal to ask on: pass --yes"
            " (INVALID_ARGUMENT)"
        ]
    as_json = await run("delete", name, "--json")
    assert json.loads(as_json.stdout)["error"]["problems"] == [
        "this asks for confirmation, and there is no terminal to ask on: pass --yes"
    ]

    monkeypatch.setattr(cli, "_interactive", lambda: True)
    declined = await run("close", name, ref, answer="n\n")
    assert declined.exit_code == 1
    assert "Ask the banks to close 1 card(s)?" in declined.stderr
    assert report["cards"][0]["masked_number"] in declined.stderr  # the person sees what they close
    assert "not confirmed; nothing was changed" in declined.stderr
    assert (await run("closures", "--json")).stdout.strip() == "[]"

    kept = await run("delete", name, answer="\n")  # the default is no
    assert kept.exit_code == 1
    assert (await run("report", name)).exit_code == 0

    deleted = await run("delete", name, answer="y\n")
    assert deleted.exit_code == 0, deleted.output
    assert f"deleted {name}" in deleted.stdout
    assert (await run("report", name)).exit_code == 3


# -- 9: errors ------------------------------------------------------------------------------------------


@SQLITE
async def test_errors_are_one_readable_line_or_json(run: Cli) -> None:
    await run.verify()
    bad = await run("reports", "--page-token", "not-a-token")
    assert bad.exit_code == 2
    assert error_lines(bad) == ["error: page_token: not a page token from this server (INVALID_ARGUMENT)"]

    bad_json = await run("reports", "--page-token", "not-a-token", "--json")
    assert bad_json.exit_code == 2
    error = json.loads(bad_json.stdout)["error"]
    assert error["code"] == "INVALID_ARGUMENT"
    assert error["field_violations"] == [
        {"field": "page_token", "description": "not a page token from this server"}
    ]
    assert error["problems"] == ["page_token: not a page token from this server"]

    await run.report()
    cooldown = await run("lookup", "--agree-terms", "--json")
    error = json.loads(cooldown.stdout)["error"]
    assert (cooldown.exit_code, error["code"], error["reason"]) == (
        6,
        "RESOURCE_EXHAUSTED",
        "REQUERY_COOLDOWN",
    )
    assert error["retry_after_seconds"] > 6 * 86400

    run.session.write_text(json.dumps({"session_token": "forged"}))
    forged = await run("reports")
    assert forged.exit_code == 4
    assert error_lines(forged) == [
        "error: invalid session credential; run `cardlookup verify` again (UNAUTHENTICATED)"
    ]


def _closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@SQLITE
async def test_an_unreachable_union_is_explained(run: Cli) -> None:
    target = f"127.0.0.1:{_closed_port()}"
    down = await run("admin", "banks", target=target)
    assert down.exit_code == 7
    lines = error_lines(down)
    assert len(lines) == 1
    assert f"cannot reach the union at {target}: nothing is listening there" in lines[0]
    assert "failed to connect" not in down.output.lower()
    assert "ipv4" not in down.output

    down_json = await run("admin", "regions", "--json", target=target)
    error = json.loads(down_json.stdout)["error"]
    assert (error["code"], error["reached_server"]) == ("UNAVAILABLE", False)


@SQLITE
async def test_admin_audit_takes_human_times_or_refuses_clearly(run: Cli) -> None:
    await run.verify()
    listed = await run("admin", "audit", "--since", "yesterday", "--json")
    assert listed.exit_code == 0, listed.output
    assert "verification.start" in {event["action"] for event in json.loads(listed.stdout)["events"]}
    hours = await run("admin", "audit", "--since", "2h", "--until", "now")
    assert hours.exit_code == 0, hours.output

    refused = await run("admin", "audit", "--since", "last tuesday")
    assert refused.exit_code == 2
    assert error_lines(refused) == [f"error: --since: not a time: use {cli.TIME_FORMS} (INVALID_ARGUMENT)"]
    assert "Traceback" not in refused.output


def test_parse_time_reads_what_people_type() -> None:
    now = datetime(2026, 12, 5, 10, 30, tzinfo=UTC)
    assert cli.parse_time("2h", now) == now - timedelta(hours=2)
    assert cli.parse_time("30m ago", now) == now - timedelta(minutes=30)
    assert cli.parse_time("7d", now) == now - timedelta(days=7)
    assert cli.parse_time("1w", now) == now - timedelta(days=7)
    assert cli.parse_time("now", now) == now
    assert cli.parse_time("2026-12-01T08:00+08:00", now) == datetime(2026, 12, 1, 0, 0, tzinfo=UTC)
    local_midnight = datetime(2026, 12, 1).astimezone()  # a date alone is local midnight
    assert cli.parse_time("2026-12-01", now) == local_midnight
    yesterday = cli.parse_time("yesterday", now)
    assert yesterday.astimezone() == now.astimezone().replace(
        hour=0, minute=0, second=0, microsecond=0
    ) - timedelta(days=1)
    for nonsense in ("last tuesday", "", "2026-13-01", "h2"):
        with pytest.raises(ValueError, match=r"^not a time: use "):
            cli.parse_time(nonsense, now)


# -- 10: wrong codes, closed regions, local times -----------------------------------------------


class Terminal:
    """A CLI process on a real pseudo-terminal: what it prints, and a person's answers."""

    def __init__(self, master: int) -> None:
        self.master = master
        self.seen = ""
        self._more = asyncio.Event()
        asyncio.get_running_loop().add_reader(master, self._read)

    def _read(self) -> None:
        try:
            chunk = os.read(self.master, 4096)
        except OSError:  # the process closed the terminal
            chunk = b""
        if not chunk:
            asyncio.get_running_loop().remove_reader(self.master)
        self.seen += ANSI.sub("", chunk.decode(errors="replace"))
        self._more.set()

    async def expect(self, text: str, after: int = 0) -> int:
        """Wait until `text` appears after position `after`; the position just past it."""
        async with asyncio.timeout(30):
            while (found := self.seen.find(text, after)) < 0:
                self._more.clear()
                await self._more.wait()
        return found + len(text)

    def type(self, line: str) -> None:
        os.write(self.master, line.encode() + b"\r")


@pytest.fixture
def terminal_env(tmp_path: Path) -> dict[str, str]:
    return {
        "CARDLOOKUP_SESSION_FILE": str(tmp_path / "session.json"),
        "COLUMNS": "200",
        "PATH": "/usr/bin:/bin",
        "TERM": "dumb",
        "TZ": "Asia/Shanghai",
    }


@SQLITE
async def test_a_wrong_code_shows_the_attempts_left_and_asks_again(
    union: UnionServer, terminal_env: dict[str, str]
) -> None:
    master, slave = pty.openpty()
    process = await asyncio.create_subprocess_exec(
        str(BIN / "cardlookup"),
        "verify",
        "--name",
        ZHANG.name,
        "--id",
        ZHANG.resident_id_number,
        "--mobile",
        ZHANG.mobile_number,
        "--target",
        union.address,
        stdin=slave,
        stdout=slave,
        stderr=slave,
        env=terminal_env,
    )
    os.close(slave)
    terminal = Terminal(master)
    try:
        asked = await terminal.expect(f"Code sent to {ZHANG.mobile_number[:3]}****{ZHANG.mobile_number[-4:]}")
        code = read_one_time_code(union.config.sms_sink_path, ZHANG.mobile_number)
        assert code is not None
        terminal.type(f"{(int(code) + 1) % 1_000_000:06d}")
        told = await terminal.expect("wrong code; 4 attempts left", asked)
        asked = await terminal.expect("Code sent to", told)
        terminal.type(code.translate(FULL_WIDTH))  # typed on a full-width keyboard: still the code
        await terminal.expect("verified", asked)
        assert await process.wait() == 0
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
        asyncio.get_running_loop().remove_reader(master)
        os.close(master)
    # The session ends at a local time, named by its zone.
    assert re.search(r"session until \d{4}-\d\d-\d\d \d\d:\d\d CST", terminal.seen), terminal.seen


@SQLITE
async def test_a_closed_region_is_one_clear_line(
    run: Cli, union: UnionServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    # What the union answers for a region that is not open, before any SMS is sent.
    async def region_not_open(*_: object) -> None:
        raise errors.FailedPrecondition(
            "the service is not open in your region yet",
            reason="REGION_NOT_OPEN",
            metadata={"region_code": "440000"},
        )

    monkeypatch.setattr(union.identity, "start_verification", region_not_open)
    refused = await run(
        "verify", "--name", WANG.name, "--id", WANG.resident_id_number, "--mobile", WANG.mobile_number
    )
    assert refused.exit_code == 5
    assert error_lines(refused) == [
        "error: the service is not open in your region yet (region 440000); no code was sent"
        " (FAILED_PRECONDITION)"
    ]


@SQLITE
async def test_times_are_local_with_the_zone_named(run: Cli, union: UnionServer, tmp_path: Path) -> None:
    await run.verify()
    report = await run.report()
    for zone, name in (("Asia/Shanghai", "CST"), ("UTC", "UTC")):
        process = await asyncio.create_subprocess_exec(
            str(BIN / "cardlookup"),
            "reports",
            "--target",
            union.address,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            env={
                "CARDLOOKUP_SESSION_FILE": str(run.session),
                "COLUMNS": "200",
                "TZ": zone,
                "PATH": "/usr/bin:/bin",
            },
        )
        stdout, _ = await process.communicate()
        expire = datetime.fromisoformat(report["expire_time"].replace("Z", "+00:00"))
        local = expire.astimezone(ZoneInfo(zone))
        assert f"{local:%Y-%m-%d %H:%M} {name}" in stdout.decode()


# -- 12: verification input as people type it ---------------------------------------------------


@SQLITE
async def test_verify_normalises_what_is_typed_and_names_the_failed_check(run: Cli) -> None:
    mobile = ZHANG.mobile_number
    await run.verify(
        f" {ZHANG.name}\u3000",
        ZHANG.resident_id_number.translate(FULL_WIDTH),
        f"+86 {mobile[:3]}-{mobile[3:7]}-{mobile[7:]}",
    )
    assert json.loads(run.session.read_text())["session_token"]

    # Refused before anything is sent (the target is closed: a call would say "cannot reach").
    wrong_check = ZHANG.resident_id_number[:17] + str((int(ZHANG.resident_id_number[17]) + 1) % 10)
    refused = await run(
        "verify",
        "--name",
        ZHANG.name,
        "--id",
        wrong_check,
        "--mobile",
        "139 1728",
        target=f"127.0.0.1:{_closed_port()}",
    )
    assert refused.exit_code == 2
    assert error_lines(refused) == [
        "error: --id: the check character (the last one) does not match the first 17 digits"
        " (INVALID_ARGUMENT)",
        "error: --mobile: must be 11 digits (spaces, dashes and a +86 or 0086 prefix are allowed)"
        " (INVALID_ARGUMENT)",
    ]
    assert wrong_check not in refused.output
