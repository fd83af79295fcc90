"""The banks' Prometheus metrics: every call counted per bank, method and status code in the one
registry of the process that serves them; a metrics address without a port is refused at start."""

from __future__ import annotations

import shutil
from pathlib import Path

import grpc
import pytest
from bankquery.v1 import bank_query_service_pb2 as pb
from bankquery.v1 import bank_query_service_pb2_grpc as pb_grpc
from prometheus_client import CollectorRegistry
from typer.testing import CliRunner

from server.bank.__main__ import app
from server.bank.bank_server import start_all_banks
from server.bank.faults import FaultSettings
from server.common.prometheus import process_registry
from server.common.rpc_metrics import RpcMetrics
from tests.conftest import SEED, SIZE, ZHANG


def _calls(registry: CollectorRegistry, bank: str, method: str, code: str) -> float | None:
    labels = {
        "server": bank,
        "grpc_service": "bankquery.v1.BankQueryService",
        "grpc_method": method,
        "grpc_code": code,
    }
    return registry.get_sample_value("cardlookup_rpc_duration_seconds_count", labels)


async def test_calls_to_each_bank_are_counted_by_bank_method_and_code(
    tmp_path: Path, seeded_banks_template: Path
) -> None:
    shutil.copytree(seeded_banks_template, tmp_path / "banks")
    registry = process_registry()
    banks = await start_all_banks(
        data_dir=tmp_path / "banks",
        seed=SEED,
        size=SIZE,
        bank_codes=["ICBC", "CMB"],
        faults={"CMB": FaultSettings(outage=True)},
        rpc_metrics=RpcMetrics(registry),
    )
    try:
        request = pb.QueryCardsRequest(
            query_id="q", resident_id_number=ZHANG.resident_id_number, name=ZHANG.name
        )
        for bank in banks:
            async with grpc.aio.insecure_channel(bank.address) as channel:
                stub = pb_grpc.BankQueryServiceStub(channel)
                if bank.bank_code == "ICBC":
                    assert [message async for message in stub.QueryCards(request)]
                else:
                    with pytest.raises(grpc.aio.AioRpcError) as refused:
                        _ = [message async for message in stub.QueryCards(request)]
                    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        for bank in banks:
            await bank.stop(0)
    assert _calls(registry, "ICBC", "QueryCards", "OK") == 1
    assert _calls(registry, "CMB", "QueryCards", "UNAVAILABLE") == 1
    assert _calls(registry, "CMB", "QueryCards", "OK") is None
    assert registry.get_sample_value("process_cpu_seconds_total") is not None


def test_the_cli_refuses_a_metrics_address_without_a_port(tmp_path: Path) -> None:
    for wrong in ("abc", "127.0.0.1", "127.0.0.1:http", "127.0.0.1:70000"):
        arguments = ["serve", "--bank", "ICBC", "--data-dir", str(tmp_path), "--metrics-listen", wrong]
        result = CliRunner().invoke(app, arguments)
        assert result.exit_code == 2, wrong
        assert "--metrics-listen" in result.output
