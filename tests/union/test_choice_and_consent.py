"""The person's choice of banks and consent, the per-bank re-query cooldown, asking again the banks
that failed, and the pilot's facts on regions: end to end through the public gRPC API and the CLI.
"""

from __future__ import annotations

import asyncio
import inspect
import json
import re
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

import grpc
import pytest
from cardlookup.v1 import admin_service_pb2 as admin_pb
from cardlookup.v1 import card_lookup_service_pb2 as lookup_pb
from google.protobuf import field_mask_pb2
from sqlalchemy import create_engine, text

from clients.client import TERMS_VERSION, CardLookupClient, CardLookupError
from clients.sync import lookup_report
from server.bank.bank_server import RunningBank
from server.bank.faults import FaultSettings
from server.union.domain.lookups import CURRENT_TERMS_VERSION
from server.union.storage.database import alembic_config
from server.union.union_server import UnionServer
from tests.conftest import ZHANG, run_lookup, verified_client

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
COOLDOWN = timedelta(days=7)
CHINA = timedelta(hours=8)

# The pilot as the source article tells it, written out here rather than read from the catalogue.
PILOT_BATCH_1 = {"上海市", "云南省"}  # December 2021
PILOT_BATCH_2 = {  # March 2022
    "北京市",
    "重庆市",
    "贵州省",
    "吉林省",
    "新疆维吾尔自治区",
    "陕西省",
    "福建省",
    "湖南省",
    "山西省",
    "浙江省",
    "河南省",
    "安徽省",
    "黑龙江省",
    "海南省",
}


def operator(union: UnionServer) -> CardLookupClient:
    return CardLookupClient(union.address, admin_token="test-admin-token")


async def _refusal(call: object) -> CardLookupError:
    with pytest.raises(CardLookupError) as refused:
        await call  # type: ignore[misc]
    return refused.value


def _time(value: object) -> datetime:
    moment: datetime = value.ToDatetime(tzinfo=UTC)  # type: ignore[attr-defined]
    return moment


# -- 4. the pilot's facts ---------------------------------------------------------------------------


async def test_regions_carry_their_pilot_batch_and_opening_date(union: UnionServer) -> None:
    async with operator(union) as admin:
        regions = await admin.list_regions()
        by_batch: dict[int, set[str]] = {}
        for region in regions:
            by_batch.setdefault(region.pilot_batch, set()).add(region.name)
        assert by_batch[1] == PILOT_BATCH_1
        assert by_batch[2] == PILOT_BATCH_2
        assert len(by_batch[1] | by_batch[2]) == 16
        opening = {_time(r.pilot_open_time) + CHINA for r in regions if r.pilot_batch == 1}
        assert opening == {datetime(2021, 12, 1, tzinfo=UTC)}  # midnight in China, 1 December 2021
        opening = {_time(r.pilot_open_time) + CHINA for r in regions if r.pilot_batch == 2}
        assert opening == {datetime(2022, 3, 1, tzinfo=UTC)}
        outside = [r for r in regions if r.pilot_batch == 0]
        assert outside
        assert not any(r.HasField("pilot_open_time") or r.open for r in outside)

        # History stays history: closing and reopening Shanghai changes open_time, not its batch.
        closed = await admin.admin(
            "UpdateRegion",
            admin_pb.UpdateRegionRequest(
                code="310000", open=False, update_mask=field_mask_pb2.FieldMask(paths=["open"])
            ),
        )
        assert (closed.region.open, closed.region.pilot_batch) == (False, 1)
        reopened = await admin.update_region("310000", True)
        assert reopened.pilot_batch == 1
        assert _time(reopened.pilot_open_time) + CHINA == datetime(2021, 12, 1, tzinfo=UTC)


def test_migration_gives_existing_regions_their_pilot_batch(database_url: str) -> None:
    """A database made before pilot batches were kept learns them when it is migrated."""
    from alembic import command

    if database_url.startswith("sqlite"):
        Path(database_url.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    engine = create_engine(database_url)

    def upgrade(revision: str) -> None:
        with engine.begin() as connection:
            config = alembic_config(database_url)
            config.attributes["connection"] = connection  # env.py then uses it and opens nothing
            command.upgrade(config, revision)

    try:
        upgrade("0005")
        with engine.begin() as connection:
            connection.execute(
                text("INSERT INTO regions (code, name, open) VALUES ('530000', '云南省', true)")
            )
            connection.execute(
                text("INSERT INTO regions (code, name, open) VALUES ('440000', '广东省', false)")
            )
            connection.execute(
                text(
                    "INSERT INTO banks (code, position, name, english_name, address, enabled) "
                    "VALUES ('CZB', 15, '浙商银行', 'China Zheshang Bank', '', true)"
                )
            )
        upgrade("head")
        with engine.connect() as connection:
            rows = dict(
                (code, (batch, str(opened) if opened else None))
                for code, batch, opened in connection.execute(
                    text("SELECT code, pilot_batch, pilot_open_date FROM regions")
                )
            )
            interbank = connection.execute(text("SELECT interbank_code FROM banks")).scalar()
        assert rows == {"530000": (1, "2021-12-01"), "440000": (None, None)}
        assert interbank == "316"
    finally:
        engine.dispose()


# -- 2. consent -------------------------------------------------------------------------------------


def test_the_python_library_never_consents_for_its_caller() -> None:
    """Consent is what a person gave, so the library has no default for it: a script that does not
    say which terms its user accepted fails before anything is sent."""
    for function in (CardLookupClient.create_lookup, lookup_report):
        consent = inspect.signature(function).parameters["consent_terms_version"]
        assert consent.default is inspect.Parameter.empty
        assert consent.kind is inspect.Parameter.KEYWORD_ONLY


async def test_a_lookup_needs_consent_to_the_current_terms(union: UnionServer) -> None:
    assert TERMS_VERSION == CURRENT_TERMS_VERSION  # the clients show the terms the union asks for
    for path in ("clients/typescript/src/lookup.ts", "clients/web/src/main.ts"):
        assert re.search(rf'TERMS_VERSION = "{re.escape(CURRENT_TERMS_VERSION)}"', (ROOT / path).read_text())
    person = await verified_client(union, ZHANG)
    async with person:
        for given in ("", "2020-01", "2021-12 ", "6222021234567890128"):
            refused = await _refusal(person.create_lookup(consent_terms_version=given))
            assert refused.code == grpc.StatusCode.FAILED_PRECONDITION
            assert refused.reason == "CONSENT_REQUIRED"
            assert refused.metadata == {"terms_version": CURRENT_TERMS_VERSION}
            if given:
                assert given.strip() not in refused.message  # never echoed
        assert not (await person.list_lookups()).lookups  # nothing was created

        lookup = await person.create_lookup(consent_terms_version=CURRENT_TERMS_VERSION)
        events = (await person.my_audit_events(page_size=50)).events
        consents = [e for e in events if e.action == "lookup.consent"]
        # One consent, recorded with the lookup it allowed (same transaction, same time): the terms
        # version and nothing about the person.
        assert [(e.resource, e.outcome) for e in consents] == [(f"terms/{CURRENT_TERMS_VERSION}", "ok")]
        [created] = [e for e in events if e.action == "lookup.create" and e.resource == lookup.name]
        assert consents[0].time == created.time


# -- 2. the choice of banks and the per-bank cooldown -----------------------------------------------


async def test_the_chosen_banks_are_asked_and_the_cooldown_runs_per_bank(union: UnionServer) -> None:
    person = await verified_client(union, ZHANG)
    async with person, operator(union) as admin:
        every_bank = [bank.code for bank in await admin.list_banks()]
        _, icbc_only = await run_lookup(person, bank_codes=["ICBC"])
        assert [s.bank_code for s in icbc_only.bank_summaries] == ["ICBC"]
        assert {c.bank_code for c in icbc_only.cards} == {"ICBC"}
        assert icbc_only.total_card_count == 2
        assert [b.bank_code for b in icbc_only.unasked_banks] == [c for c in every_bank if c != "ICBC"]
        assert {b.reason for b in icbc_only.unasked_banks} == {lookup_pb.UNASKED_REASON_NOT_CHOSEN}
        [summary] = icbc_only.bank_summaries
        assert _time(summary.next_query_time) == _time(icbc_only.generate_time) + COOLDOWN

        # ICBC answered: asking it again waits for its cooldown...
        again = await _refusal(
            person.create_lookup(bank_codes=["ICBC", "CMB"], consent_terms_version=TERMS_VERSION)
        )
        assert (again.code, again.reason) == (grpc.StatusCode.RESOURCE_EXHAUSTED, "REQUERY_COOLDOWN")
        assert again.metadata == {"bank_codes": "ICBC"}
        assert again.retry_after is not None
        assert again.retry_after > COOLDOWN - timedelta(minutes=5)
        # ...but it does not block asking another bank.
        _, cmb_only = await run_lookup(person, bank_codes=["CMB"])
        assert [s.bank_code for s in cmb_only.bank_summaries] == ["CMB"]
        assert cmb_only.total_card_count == 2

        # Asking every bank now asks those not cooling down, and says which were left out and until when.
        _, rest = await run_lookup(person)
        asked = [s.bank_code for s in rest.bank_summaries]
        assert asked == [c for c in every_bank if c not in ("ICBC", "CMB")]
        assert {c.bank_code for c in rest.cards} == {"CCB"}
        cooling = {b.bank_code: b for b in rest.unasked_banks}
        assert set(cooling) == {"ICBC", "CMB"}
        assert {b.reason for b in cooling.values()} == {lookup_pb.UNASKED_REASON_REQUERY_COOLDOWN}
        assert _time(cooling["ICBC"].next_query_time) == _time(icbc_only.generate_time) + COOLDOWN
        assert _time(cooling["CMB"].next_query_time) == _time(cmb_only.generate_time) + COOLDOWN

        # Every bank has answered within the cooldown: nothing is left to ask.
        none_left = await _refusal(person.create_lookup(consent_terms_version=TERMS_VERSION))
        assert none_left.reason == "REQUERY_COOLDOWN"
        assert none_left.metadata["bank_codes"].split(",") == every_bank


async def test_a_burst_of_lookups_for_one_bank_makes_one(union: UnionServer) -> None:
    """The per-bank cooldown and the in-progress check are one decision in the creating
    transaction: concurrent requests for the same bank create exactly one lookup."""
    person = await verified_client(union, ZHANG)
    async with person:
        outcomes = await asyncio.gather(
            *(
                person.create_lookup(bank_codes=["CMB"], consent_terms_version=TERMS_VERSION)
                for _ in range(8)
            ),
            return_exceptions=True,
        )
        created = [o for o in outcomes if isinstance(o, lookup_pb.Lookup)]
        refused = [o for o in outcomes if isinstance(o, CardLookupError)]
        assert (len(created), len(refused)) == (1, 7)
        # Refused while it runs, or (CMB answers quickly) once it has CMB's answer.
        assert {r.reason for r in refused} <= {"LOOKUP_IN_PROGRESS", "REQUERY_COOLDOWN"}
        events = [e async for e in person.watch_lookup(created[0].name, stream_timeout=60)]
        assert events[-1].report_ready
        outcomes = await asyncio.gather(
            *(
                person.create_lookup(bank_codes=["CMB"], consent_terms_version=TERMS_VERSION)
                for _ in range(8)
            ),
            return_exceptions=True,
        )
        assert {o.reason for o in outcomes if isinstance(o, CardLookupError)} == {"REQUERY_COOLDOWN"}
        assert not [o for o in outcomes if isinstance(o, lookup_pb.Lookup)]


# -- 3. asking again after a partial report ---------------------------------------------------------


async def _cli(*args: str, session: Path) -> tuple[int, str, str]:
    process = await asyncio.create_subprocess_exec(
        str(BIN / "cardlookup"),
        *args,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env={"CARDLOOKUP_SESSION_FILE": str(session), "COLUMNS": "200", "PATH": "/usr/bin:/bin"},
    )
    stdout, stderr = await process.communicate()
    return process.returncode or 0, stdout.decode(), stderr.decode()


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
async def test_banks_that_failed_are_asked_again_at_once_from_the_cli(
    union: UnionServer, banks: dict[str, RunningBank], tmp_path: Path
) -> None:
    # CMB refuses the query outright: a final failure, not one worth retrying within the lookup.
    banks["CMB"].servicer.faults = FaultSettings(error_rate=1.0, error_code=grpc.StatusCode.PERMISSION_DENIED)
    person = await verified_client(union, ZHANG)
    session = tmp_path / "session.json"
    session.write_text(json.dumps({"session_token": person.session_token}))
    target = ["--target", union.address]
    async with person:
        # Without a terminal the CLI does not guess the person's consent.
        code, out, err = await _cli("lookup", *target, session=session)
        assert code == 2
        assert "--agree-terms" in err  # consent has its own flag, never the generic --yes
        assert not (await person.list_lookups()).lookups

        code, out, err = await _cli("lookup", "--agree-terms", *target, "--json", session=session)
        assert code == 0, err
        partial = json.loads(out)
        outcomes = {s["bank_code"]: s for s in partial["bank_summaries"]}
        assert outcomes["CMB"]["outcome"] == "BANK_OUTCOME_FAILED"
        generated = datetime.fromisoformat(partial["generate_time"].replace("Z", "+00:00"))
        # The report says when each bank can be asked again: CMB at once, the others after the cooldown.
        assert datetime.fromisoformat(outcomes["CMB"]["next_query_time"].replace("Z", "+00:00")) == generated
        icbc_next = datetime.fromisoformat(outcomes["ICBC"]["next_query_time"].replace("Z", "+00:00"))
        assert icbc_next == generated + COOLDOWN
        code, out, err = await _cli("report", partial["name"], *target, session=session)
        assert code == 0, err
        assert f"cardlookup lookup --again {partial['name']}" in out

        banks["CMB"].servicer.faults = FaultSettings()  # CMB is back
        code, out, err = await _cli(
            "lookup", "--again", partial["name"], "--agree-terms", *target, "--json", session=session
        )
        assert code == 0, err
        again = json.loads(out)
        assert [s["bank_code"] for s in again["bank_summaries"]] == ["CMB"]
        assert again["bank_summaries"][0]["outcome"] == "BANK_OUTCOME_ANSWERED"
        assert again["total_card_count"] == 2
        assert {c["bank_code"] for c in again["cards"]} == {"CMB"}

        # The banks that answered keep their cooldown, now CMB too: nothing is left to ask again.
        code, out, err = await _cli(
            "lookup", "--again", again["name"], "--agree-terms", *target, session=session
        )
        assert code == 3
        assert "nothing to ask again" in err
        code, out, err = await _cli("lookup", "--bank", "ICBC", "--agree-terms", *target, session=session)
        assert code == 6
        assert "RESOURCE_EXHAUSTED" in err
