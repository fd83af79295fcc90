"""Invariant 1: the union never stores, logs or returns a full card number or resident ID number.

A whole flow runs (verification, a lookup with a failing bank, a wrong code, a
report read); then the raw SQLite files (database and WAL), every log record
and every RPC response are searched for the person's ID number and every one
of their card numbers, and for anything shaped like either.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

import pytest
from google.protobuf.json_format import MessageToJson

from clients.client import CardLookupClient, CardLookupError
from server.bank.bank_server import RunningBank
from server.bank.faults import FaultSettings
from server.common.checks import is_luhn_valid, is_valid_resident_id
from server.common.logs import record_fields
from server.population.generator import DEMO_PEOPLE, cards_of
from tests.conftest import SEED, UnionFactory, run_lookup, verified_client

DIGIT_RUN = re.compile(r"(?<![0-9A-Za-z])\d{13,19}(?![0-9A-Za-z])")
ID_SHAPE = re.compile(r"(?<![0-9A-Za-z])\d{17}[\dX](?![0-9A-Za-z])")


def secrets_in(text: str, forbidden: list[str]) -> list[str]:
    found = [value for value in forbidden if value in text]
    found += [run for run in DIGIT_RUN.findall(text) if is_luhn_valid(run)]
    found += [run for run in ID_SHAPE.findall(text) if is_valid_resident_id(run)]
    return found


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
async def test_no_pan_or_id_number_in_database_logs_or_responses(
    make_union: UnionFactory,
    banks: dict[str, RunningBank],
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO)  # what a production union logs
    banks["CCB"].servicer.faults = FaultSettings(lie="wrong_bank")
    union = await make_union()
    responses: list[str] = []
    forbidden: list[str] = []
    for demo in DEMO_PEOPLE[:4]:
        forbidden.append(demo.person.resident_id_number)
        forbidden += [card.number for card in cards_of(SEED, demo.person)]
    for demo in (DEMO_PEOPLE[0], DEMO_PEOPLE[3]):
        person = demo.person
        async with CardLookupClient(union.address) as stranger:
            with pytest.raises(CardLookupError):
                await stranger.start_verification("某人", person.resident_id_number, person.mobile_number)
        client = await verified_client(union, person)
        async with client:
            events, report = await run_lookup(client)
            responses += [MessageToJson(e) for e in events] + [MessageToJson(report)]
            responses.append(MessageToJson(await client.list_reports()))
            # Card actions carry the ID number to the banks too: closures and a flag.
            closure = await client.close_cards(report.name, [c.card_ref for c in report.cards[:3]])
            flag = await client.flag_not_mine(report.name, report.cards[-1].card_ref)
            responses += [MessageToJson(closure), MessageToJson(flag)]
            responses.append(MessageToJson(await client.get_report(report.name)))
            responses.append(MessageToJson(await client.my_audit_events()))
    assert any(len(r) > 1000 for r in responses)  # the 56-card report is in there

    raw_files = sorted((tmp_path / "union").glob("union.db*"))
    assert raw_files, "the union's SQLite files should exist"
    raw = "".join(path.read_bytes().decode("latin-1") for path in raw_files)
    assert secrets_in(raw, forbidden) == []

    # What each log line would say (message and fields), before the formatter's redaction safety net.
    log_text = "\n".join(str(record_fields(r)) for r in caplog.records)
    assert "bank answered" in log_text  # the union did log its work
    assert secrets_in(log_text, forbidden) == []

    assert secrets_in("\n".join(responses), forbidden) == []
