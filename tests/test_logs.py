"""The log formatter's safety net (digit runs that could be card or ID numbers never reach output),
and what the union and bank processes write: JSON lines only, a start and a stop line, one access line
per call (method, status, duration, peer), nothing about a person."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import grpc
import pytest
from bankquery.v1 import bank_query_service_pb2 as bank_pb
from bankquery.v1 import bank_query_service_pb2_grpc as bank_grpc
from cardlookup.v1 import identity_service_pb2 as identity_pb
from cardlookup.v1 import identity_service_pb2_grpc as identity_grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from server.common.logs import configure_logging, redact
from server.population.generator import DEMO_PEOPLE


def test_redact_masks_card_and_id_shapes() -> None:
    assert redact("pan 6222021234567890123 id 31010419850312991X ok") == "pan [REDACTED] id [REDACTED] ok"
    assert redact("latency 1234 ms, lookup l12ab") == "latency 1234 ms, lookup l12ab"


def test_json_lines_are_redacted() -> None:
    stream = io.StringIO()
    root = logging.getLogger()
    level = root.level
    configure_logging("INFO", stream)
    try:
        logging.getLogger("server.test").info(
            "card %s", "6222021234567890123", extra={"id": "310104198503129915"}
        )
    finally:
        root.handlers.clear()
        root.setLevel(level)  # later tests capture at the level they set, not at this one
    entry = json.loads(stream.getvalue())
    assert entry["message"] == "card [REDACTED]"
    assert entry["id"] == "[REDACTED]"


# -- the servers' own log output, read from real processes ------------------------------------------


def _lines(path: Path) -> list[dict[str, Any]]:
    """Every line the process wrote, each of which must be a JSON object."""
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _wait_for(path: Path, message: str, process: subprocess.Popen[bytes]) -> dict[str, Any]:
    for _ in range(600):
        if process.poll() is not None:
            raise AssertionError(f"the process ended ({process.returncode}):\n{path.read_text()}")
        for entry in _lines(path):
            if entry["message"] == message:
                return entry
        time.sleep(0.1)
    raise AssertionError(f"no {message!r} line:\n{path.read_text()}")


def _start(arguments: list[str], log_path: Path) -> subprocess.Popen[bytes]:
    # JSON lines go to stderr; the bank also prints its ports to stdout for people.
    with log_path.open("wb") as log_file:
        return subprocess.Popen(
            [sys.executable, "-m", *arguments],
            stdout=subprocess.DEVNULL,
            stderr=log_file,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )


def _stop(process: subprocess.Popen[bytes]) -> None:
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=30) == 0


def _access_lines(entries: list[dict[str, Any]]) -> dict[tuple[str, str], dict[str, Any]]:
    return {
        (entry["method"], entry["code"]): entry for entry in entries if entry["logger"] == "cardlookup.access"
    }


def _assert_access_line(entry: dict[str, Any], server: str) -> None:
    assert entry["level"] == "info"
    assert entry["server"] == server
    assert entry["duration_ms"] >= 0
    assert entry["peer"].startswith(("ipv4:127.0.0.1:", "ipv6:"))
    assert set(entry) == {
        "time",
        "level",
        "logger",
        "message",
        "server",
        "method",
        "code",
        "duration_ms",
        "peer",
    }


def test_a_bank_process_logs_json_lines_a_start_an_access_line_per_call_and_a_stop(tmp_path: Path) -> None:
    person = DEMO_PEOPLE[0].person
    log_path = tmp_path / "bank.log"
    process = _start(
        [
            "server.bank",
            "serve",
            "--bank",
            "ICBC",
            "--port",
            "0",
            "--population",
            "50",
            "--data-dir",
            str(tmp_path / "banks"),
            "--metrics-listen",
            "127.0.0.1:0",
        ],
        log_path,
    )
    try:
        started = _wait_for(log_path, "bank process started", process)
        address = started["banks"]["ICBC"]

        async def calls() -> None:
            async with grpc.aio.insecure_channel(address) as channel:
                stub = bank_grpc.BankQueryServiceStub(channel)
                request = bank_pb.QueryCardsRequest(
                    query_id="q-1", resident_id_number=person.resident_id_number, name=person.name
                )
                assert [message async for message in stub.QueryCards(request)]
                with pytest.raises(grpc.aio.AioRpcError) as refused:
                    await stub.CloseCard(bank_pb.CloseCardRequest())
                assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
                await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest())

        asyncio.run(calls())
        with urllib.request.urlopen(f"http://{started['metrics']}/metrics", timeout=5) as response:
            page = bytes(response.read()).decode()
    finally:
        _stop(process)
    entries = _lines(log_path)
    assert entries[-1]["message"] == "bank process stopped"
    assert any(entry["message"] == "bank process stopping: draining calls" for entry in entries)
    access = _access_lines(entries)
    _assert_access_line(access[("/bankquery.v1.BankQueryService/QueryCards", "OK")], "ICBC")
    _assert_access_line(access[("/bankquery.v1.BankQueryService/CloseCard", "INVALID_ARGUMENT")], "ICBC")
    # Health probes are counted but logged only at DEBUG: they come several times a second.
    assert ("/grpc.health.v1.Health/Check", "OK") not in access
    assert 'grpc_code="OK",grpc_method="Check",grpc_service="grpc.health.v1.Health",server="ICBC"' in page
    assert 'grpc_method="QueryCards",grpc_service="bankquery.v1.BankQueryService"' in page
    assert "process_cpu_seconds_total" in page
    assert "python_gc_collections_total" in page
    text = log_path.read_text()
    assert person.resident_id_number not in text
    assert person.name not in text


def test_the_union_process_logs_a_start_an_access_line_per_call_and_a_stop(tmp_path: Path) -> None:
    person = DEMO_PEOPLE[0].person
    log_path = tmp_path / "union.log"
    process = _start(
        [
            "server.union",
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--data-dir",
            str(tmp_path / "union"),
            "--population-size",
            "50",
            "--bank-base-port",
            "1",  # no banks: the union starts without them
        ],
        log_path,
    )
    try:
        started = _wait_for(log_path, "union started", process)

        async def calls() -> None:
            async with grpc.aio.insecure_channel(started["address"]) as channel:
                stub = identity_grpc.IdentityServiceStub(channel)
                request = identity_pb.StartVerificationRequest(
                    name=person.name, resident_id_number=person.resident_id_number, mobile_number="139"
                )
                with pytest.raises(grpc.aio.AioRpcError) as refused:
                    await stub.StartVerification(request)
                assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT

        asyncio.run(calls())
    finally:
        _stop(process)
    entries = _lines(log_path)
    assert entries[-1]["message"] == "union stopped"
    access = _access_lines(entries)
    _assert_access_line(
        access[("/cardlookup.v1.IdentityService/StartVerification", "INVALID_ARGUMENT")], "union"
    )
    text = log_path.read_text()
    assert person.resident_id_number not in text
    assert person.name not in text
