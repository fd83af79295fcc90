"""grpcurl alone, through server reflection: exactly the commands the README shows."""

from __future__ import annotations

import asyncio
import json
import shutil
import sys
from pathlib import Path

import pytest

from server.bank.app import RunningBank
from server.union.app import UnionServer
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
