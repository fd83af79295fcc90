"""The console entry points, and the person's CLI driven end to end against real servers."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path

import pytest

from server.union.union_server import UnionServer
from tests.conftest import ZHANG

BIN = Path(sys.executable).parent


@pytest.mark.parametrize("command", ["cardlookup-union", "cardlookup-bank", "cardlookup"])
def test_entry_points_have_help(command: str) -> None:
    result = subprocess.run([str(BIN / command), "--help"], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr
    assert "Usage" in result.stdout


async def cli(*args: str, env_session: Path) -> tuple[int, str, str]:
    process = await asyncio.create_subprocess_exec(
        str(BIN / "cardlookup"),
        *args,
        stdin=asyncio.subprocess.DEVNULL,  # no terminal: what asks for confirmation needs --yes
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env={"CARDLOOKUP_SESSION_FILE": str(env_session), "COLUMNS": "200", "PATH": "/usr/bin:/bin"},
    )
    stdout, stderr = await process.communicate()
    return process.returncode or 0, stdout.decode(), stderr.decode()


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
async def test_cli_verify_lookup_report(union: UnionServer, tmp_path: Path) -> None:
    session = tmp_path / "session.json"
    target = ["--target", union.address]
    code, out, err = await cli(
        "verify",
        "--name",
        ZHANG.name,
        "--id",
        ZHANG.resident_id_number,
        "--mobile",
        ZHANG.mobile_number,
        "--sms-outbox",
        str(union.config.sms_sink_path),
        *target,
        "--json",
        env_session=session,
    )
    assert code == 0, err
    assert json.loads(out)["verified"] is True
    assert session.stat().st_mode & 0o077 == 0  # the credential file is private

    code, out, err = await cli("lookup", "--agree-terms", *target, "--json", env_session=session)
    assert code == 0, err
    report = json.loads(out)
    assert report["total_card_count"] == 5

    code, out, err = await cli("report", report["name"], *target, env_session=session)
    assert code == 0, err
    for card in report["cards"]:
        assert card["masked_number"] in out  # the table shows what GetReport returned
    assert "dormant" in out

    # Inside the cooldown: one clear line with the server's hint, and exit code 6.
    code, out, err = await cli("lookup", "--agree-terms", *target, env_session=session)
    assert code == 6
    assert "RESOURCE_EXHAUSTED" in err
    assert "retry in" in err


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
async def test_cli_close_not_mine_and_activity(union: UnionServer, tmp_path: Path) -> None:
    session = tmp_path / "session.json"
    target = ["--target", union.address]
    code, _, err = await cli(
        "verify",
        "--name",
        ZHANG.name,
        "--id",
        ZHANG.resident_id_number,
        "--mobile",
        ZHANG.mobile_number,
        "--sms-outbox",
        str(union.config.sms_sink_path),
        *target,
        env_session=session,
    )
    assert code == 0, err
    code, out, err = await cli("lookup", "--agree-terms", *target, "--json", env_session=session)
    assert code == 0, err
    report = json.loads(out)
    cards = {card["masked_number"][-4:]: card["card_ref"] for card in report["cards"]}

    code, out, err = await cli(
        "close", report["name"], cards["1472"], cards["2353"], "--yes", *target, "--json", env_session=session
    )
    assert code == 0, err
    items = json.loads(out)["items"]
    assert [item["state"] for item in items] == [
        "CARD_CLOSURE_STATE_CLOSED",
        "CARD_CLOSURE_STATE_BRANCH_VISIT_REQUIRED",
    ]

    code, out, err = await cli(
        "not-mine", report["name"], cards["0918"], "--yes", *target, env_session=session
    )
    assert code == 0, err
    assert "case FR-CCB-" in out

    code, out, err = await cli("report", report["name"], *target, env_session=session)
    assert code == 0, err
    assert "not mine" in out
    assert "FR-CCB-" in out
    assert "T-ICBC-" in out

    code, out, err = await cli("closures", *target, env_session=session)
    assert code == 0, err
    assert "visit a branch" in out

    code, out, err = await cli("activity", *target, "--json", env_session=session)
    assert code == 0, err
    actions = {event["action"] for event in json.loads(out)["events"]}
    assert {"lookup.create", "card.close", "card.flag", "report.read"} <= actions
