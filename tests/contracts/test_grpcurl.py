"""grpcurl alone, through server reflection: exactly the commands the README shows."""

from __future__ import annotations

import asyncio
import json
import shutil
import sys
from pathlib import Path

import pytest

from server.bank.bank_server import RunningBank
from server.union.sms import read_one_time_code
from server.union.union_server import UnionServer
from tests.conftest import ZHANG

GRPCURL = shutil.which("grpcurl") or str(Path(sys.executable).parent / "grpcurl")


async def grpcurl(*args: str) -> str:
    process = await asyncio.create_subprocess_exec(
        GRPCURL, *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    stdout, stderr = await process.communicate()
    assert process.returncode == 0, stderr.decode()
    return stdout.decode()


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
async def test_grpcurl_lists_checks_and_calls(union: UnionServer, banks: dict[str, RunningBank]) -> None:
    services = (await grpcurl("-plaintext", union.address, "list")).split()
    assert {
        "cardlookup.v1.CardLookupService",
        "cardlookup.v1.IdentityService",
        "cardlookup.v1.AdminService",
        "grpc.health.v1.Health",
        "grpc.reflection.v1alpha.ServerReflection",
    } <= set(services)
    bank_services = (await grpcurl("-plaintext", banks["ICBC"].address, "list")).split()
    assert "bankquery.v1.BankQueryService" in bank_services

    health = json.loads(await grpcurl("-plaintext", union.address, "grpc.health.v1.Health/Check"))
    assert health == {"status": "SERVING"}

    described = await grpcurl("-plaintext", union.address, "describe", "cardlookup.v1.CardLookupService")
    assert "rpc WatchLookup" in described
    assert "stream" in described

    started = json.loads(
        await grpcurl(
            "-plaintext",
            "-d",
            json.dumps(
                {
                    "name": ZHANG.name,
                    "resident_id_number": ZHANG.resident_id_number,
                    "mobile_number": ZHANG.mobile_number,
                },
                ensure_ascii=False,
            ),
            union.address,
            "cardlookup.v1.IdentityService/StartVerification",
        )
    )
    assert started["masked_mobile_number"] == ZHANG.mobile_number[:3] + "****" + ZHANG.mobile_number[-4:]

    banks_json = json.loads(
        await grpcurl(
            "-plaintext",
            "-H",
            "authorization: Bearer test-admin-token",
            union.address,
            "cardlookup.v1.AdminService/ListBanks",
        )
    )
    assert len(banks_json["banks"]) == 16


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
async def test_grpcurl_full_flow(union: UnionServer) -> None:
    """Verification, lookup, watch and report with grpcurl only, as in the README."""
    target = union.address
    start = json.dumps(
        {
            "name": ZHANG.name,
            "resident_id_number": ZHANG.resident_id_number,
            "mobile_number": ZHANG.mobile_number,
        },
        ensure_ascii=False,
    )
    started = json.loads(
        await grpcurl("-plaintext", "-d", start, target, "cardlookup.v1.IdentityService/StartVerification")
    )
    code = read_one_time_code(union.config.sms_sink_path, ZHANG.mobile_number)
    complete = json.dumps({"verification_id": started["verification_id"], "code": code})
    session = json.loads(
        await grpcurl(
            "-plaintext", "-d", complete, target, "cardlookup.v1.IdentityService/CompleteVerification"
        )
    )
    auth = f"authorization: Bearer {session['session_token']}"
    created = json.loads(
        await grpcurl(
            "-plaintext",
            "-H",
            auth,
            "-d",
            '{"request_id": "readme-1", "consent_terms_version": "2021-12"}',
            target,
            "cardlookup.v1.CardLookupService/CreateLookup",
        )
    )
    name = created["lookup"]["name"]
    watched = await grpcurl(
        "-plaintext",
        "-H",
        auth,
        "-d",
        json.dumps({"name": name}),
        target,
        "cardlookup.v1.CardLookupService/WatchLookup",
    )
    assert '"report_ready": true' in watched
    lookup = json.loads(
        await grpcurl(
            "-plaintext",
            "-H",
            auth,
            "-d",
            json.dumps({"name": name}),
            target,
            "cardlookup.v1.CardLookupService/GetLookup",
        )
    )
    report = json.loads(
        await grpcurl(
            "-plaintext",
            "-H",
            auth,
            "-d",
            json.dumps({"name": lookup["lookup"]["report"]}),
            target,
            "cardlookup.v1.CardLookupService/GetReport",
        )
    )
    assert report["report"]["total_card_count"] == 5
    assert all("****" in card["masked_number"] for card in report["report"]["cards"])
