"""A 17th bank joins at run time: its certificate from the development CA, its server from its own
configuration, its registration through AdminService.CreateBank with mutual TLS on, and the next
lookup's report holds its cards, without restarting the union."""

from __future__ import annotations

import asyncio
import re
import shutil
import socket
import sys
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path

import grpc
import pytest
from cardlookup.v1 import admin_service_pb2 as admin_pb
from cardlookup.v1 import card_lookup_service_pb2 as lookup_pb
from cryptography import x509
from cryptography.x509.oid import NameOID
from typer.testing import CliRunner

from clients.cli import app as cli_app
from clients.client import CardLookupClient, CardLookupError
from server.bank.bank_server import RunningBank, start_all_banks, start_bank
from server.common.dev_ca import bank_tls_files, create_dev_pki, main, union_client_tls
from server.population.catalogue import BANKS, PILOT_REGIONS, BankInfo, Bin
from server.population.generator import Person, cards_at_joining_bank, cards_of, people
from server.union.domain.admin import UnknownBankCodes
from server.union.domain.ports import AdminRole
from server.union.union_server import UnionConfig, UnionServer
from tests.conftest import SEED, SIZE, UnionFactory, fast_policies, run_lookup, verified_client

BIN = Path(sys.executable).parent
ADMIN_TOKEN = "test-admin-token"
# A city commercial bank (上海银行, Bank of Shanghai) as its own configuration describes it.
BOSC = BankInfo("BOSC", "上海银行", "Bank of Shanghai", "325", (Bin("622892", 16),), (Bin("622279", 16),))


def _holder() -> tuple[Person, int]:
    """Someone in an open region who holds reportable cards at BOSC, and how many."""
    open_regions = {region.code for region in PILOT_REGIONS}
    for person in people(SEED, SIZE):
        held = [c for c in cards_at_joining_bank(SEED, person, BOSC) if c.status != "closed"]
        if held and person.region_code in open_regions:
            return person, len(held)
    raise AssertionError("nobody in the test population banks with BOSC")


@pytest.fixture
async def mtls_stack(
    seeded_banks_template: Path, tmp_path: Path, database_url: str
) -> AsyncIterator[tuple[UnionServer, Path, Path]]:
    """The 16 banks and a union, every union↔bank call over mutual TLS."""
    pki = tmp_path / "pki"
    create_dev_pki(pki)
    data_dir = tmp_path / "banks"
    shutil.copytree(seeded_banks_template, data_dir)
    banks = await start_all_banks(
        data_dir=data_dir,
        seed=SEED,
        size=SIZE,
        base_port=0,
        tls={bank.code: bank_tls_files(pki, bank.code) for bank in BANKS},
    )
    union = UnionServer(
        UnionConfig(
            listen="127.0.0.1:0",
            data_dir=tmp_path / "union",
            database_url=database_url,
            bank_addresses={bank.bank_code: bank.address for bank in banks},
            population_seed=SEED,
            population_size=SIZE,
            admin_token=ADMIN_TOKEN,
            bank_tls=union_client_tls(pki),
            **fast_policies(),
        )
    )
    await union.start()
    try:
        yield union, pki, data_dir
    finally:
        await union.stop(0)
        for bank in banks:
            await bank.stop(0)


async def test_a_seventeenth_bank_joins_without_a_restart(mtls_stack: tuple[UnionServer, Path, Path]) -> None:
    union, pki, data_dir = mtls_stack
    person, bosc_cards = _holder()
    national_cards = len([c for c in cards_of(SEED, person) if c.status != "closed"])
    client = await verified_client(union, person)
    async with client, CardLookupClient(union.address, admin_token=ADMIN_TOKEN) as operator:
        _, before = await run_lookup(client)
        assert "BOSC" not in {s.bank_code for s in before.bank_summaries} | {
            b.bank_code for b in before.unasked_banks
        }
        assert before.total_card_count == national_cards

        # The development CA issues the new bank's certificate from the CA every other party trusts.
        assert main([str(pki), "--bank", "BOSC"]) == 0
        certificate = x509.load_pem_x509_certificate((pki / "bosc.crt").read_bytes())
        certificate.verify_directly_issued_by(x509.load_pem_x509_certificate((pki / "ca.crt").read_bytes()))
        assert certificate.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "BOSC"
        bosc: RunningBank = await start_bank(
            "BOSC",
            data_dir=data_dir,
            seed=SEED,
            size=SIZE,
            tls=bank_tls_files(pki, "BOSC"),
            bank_info=BOSC,
        )
        try:
            request = admin_pb.CreateBankRequest(
                bank=admin_pb.Bank(
                    code="BOSC",
                    name="上海银行",
                    english_name="Bank of Shanghai",
                    interbank_code="325",
                    address=bosc.address,
                )
            )
            created = (await operator.admin("CreateBank", request)).bank
            assert (created.code, created.enabled, created.interbank_code) == ("BOSC", True, "325")
            assert created.tls_name == "bosc.bank.cardlookup.test"  # what the development CA certifies
            assert [b.code for b in await operator.list_banks()][-1] == "BOSC"  # joining order

            # The next lookup asks BOSC (the others answered a moment ago and are cooling down).
            _, after = await run_lookup(client)
            [summary] = after.bank_summaries
            assert (summary.bank_code, summary.bank_name, summary.outcome) == (
                "BOSC",
                "上海银行",
                lookup_pb.BANK_OUTCOME_ANSWERED,
            )
            assert after.total_card_count == bosc_cards
            assert {card.bank_code for card in after.cards} == {"BOSC"}
            assert all(card.masked_number.startswith(("6228", "6222")) for card in after.cards)
            assert {b.bank_code for b in after.unasked_banks} == {bank.code for bank in BANKS}

            # Registered once: the code (and the CNAPS code) stay taken, and the change is audited.
            again = await _refusal(operator.admin("CreateBank", request))
            assert (again.code, again.reason) == (grpc.StatusCode.ALREADY_EXISTS, "BANK_EXISTS")
            events = await operator.admin("ListAuditEvents", admin_pb.ListAuditEventsRequest())
            creations = [e for e in events.events if e.action == "admin.bank.create"]
            assert [(e.outcome, e.resource) for e in creations] == [
                ("refused:BANK_EXISTS", "banks/BOSC"),
                ("ok", "banks/BOSC"),
            ]
        finally:
            await bosc.stop(0)


async def _refusal(call: object) -> CardLookupError:
    with pytest.raises(CardLookupError) as refused:
        await call  # type: ignore[misc]
    return refused.value


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
async def test_create_bank_is_for_operators_and_validated(mtls_stack: tuple[UnionServer, Path, Path]) -> None:
    union, _, _ = mtls_stack
    _, viewer_token = await union.admin.create_credential("vera", AdminRole.VIEWER)
    good = admin_pb.Bank(
        code="NBCB",
        name="宁波银行",
        english_name="Bank of Ningbo",
        interbank_code="408",
        address="127.0.0.1:1",
    )
    async with CardLookupClient(union.address, admin_token=viewer_token) as viewer:
        denied = await _refusal(viewer.admin("CreateBank", admin_pb.CreateBankRequest(bank=good)))
        assert (denied.code, denied.reason) == (grpc.StatusCode.PERMISSION_DENIED, "ADMIN_ROLE_REQUIRED")
    async with CardLookupClient(union.address, admin_token=ADMIN_TOKEN) as operator:
        typed = "6222021234567890128"
        bad = admin_pb.Bank(
            code="nb cb", name="x", english_name="", interbank_code=typed, address="nowhere", tls_name="A B"
        )
        refused = await _refusal(operator.admin("CreateBank", admin_pb.CreateBankRequest(bank=bad)))
        assert refused.code == grpc.StatusCode.INVALID_ARGUMENT
        assert [field for field, _ in refused.field_violations] == [
            "bank.code",
            "bank.name",
            "bank.english_name",
            "bank.interbank_code",
            "bank.address",
            "bank.tls_name",
        ]
        assert typed not in str(refused)  # nothing typed is echoed
        # Taken CNAPS code (ICBC's 102) under a new bank code.
        taken = await _refusal(
            operator.admin(
                "CreateBank",
                admin_pb.CreateBankRequest(
                    bank=admin_pb.Bank(
                        code="FAKE",
                        name="假银行",
                        english_name="Fake",
                        interbank_code="102",
                        address="127.0.0.1:1",
                    )
                ),
            )
        )
        assert taken.code == grpc.StatusCode.ALREADY_EXISTS
        assert "FAKE" not in {b.code for b in await operator.list_banks()}

        # An operator adds a bank from the command line.
        base = ["--target", union.address, "--admin-token", ADMIN_TOKEN]
        added = await asyncio.to_thread(
            CliRunner().invoke,
            cli_app,
            [
                *("admin", "add-bank", "NBCB", "--name", "宁波银行", "--english-name", "Bank of Ningbo"),
                *("--interbank-code", "408", "--address", "127.0.0.1:1", *base),
            ],
        )
        assert added.exit_code == 0, added.output
        assert (
            "NBCB 宁波银行 joined at 127.0.0.1:1 (certificate name nbcb.bank.cardlookup.test)" in added.output
        )
        regions = await asyncio.to_thread(CliRunner().invoke, cli_app, ["admin", "regions", *base])
        assert regions.exit_code == 0, regions.output
        assert re.search(r"310000\W+上海市\W+open\W+batch 1, 2021-12", regions.output)
        assert re.search(r"460000\W+海南省\W+open\W+batch 2, 2022-03", regions.output)

        # A bank that leaves is disabled and kept: its code stays taken, its history stays readable.
        left = await operator.update_bank("NBCB", enabled=False)
        assert not left.enabled
        assert "NBCB" in {b.code for b in await operator.list_banks()}
        still = await _refusal(operator.admin("CreateBank", admin_pb.CreateBankRequest(bank=good)))
        assert still.code == grpc.StatusCode.ALREADY_EXISTS


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


async def test_bank_server_runs_a_bank_from_its_configuration(tmp_path: Path) -> None:
    """`cardlookup-bank serve --bank BOSC` needs the bank's names and BINs, then serves it."""

    async def bank_cli(*args: str) -> asyncio.subprocess.Process:
        return await asyncio.create_subprocess_exec(
            str(BIN / "cardlookup-bank"),
            "serve",
            "--data-dir",
            str(tmp_path),
            "--population",
            "200",
            *args,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )

    refused = await bank_cli("--bank", "BOSC")
    _, err = await refused.communicate()
    assert refused.returncode == 2
    assert "not one of the built-in 16" in err.decode()

    port = _free_port()
    served = await bank_cli(
        "--bank",
        "BOSC",
        "--port",
        str(port),
        "--name",
        "上海银行",
        "--english-name",
        "Bank of Shanghai",
        "--interbank-code",
        "325",
        "--debit-bin",
        "622892:16",
        "--credit-bin",
        "622279:16",
    )
    try:
        assert served.stdout is not None
        line = await asyncio.wait_for(served.stdout.readline(), timeout=60)
        assert f"BOSC   listening on 127.0.0.1:{port}" in line.decode()
    finally:
        served.terminate()
        await served.wait()
    assert (tmp_path / "bosc.sqlite3").exists()

    # Who the bank is can live in its configuration file, so it restarts like any other bank.
    config = tmp_path / "bosc.toml"
    config.write_text(
        '[bank]\nname = "上海银行"\nenglish_name = "Bank of Shanghai"\ninterbank_code = "325"\n'
        'debit_bins = ["622892:16"]\ncredit_bins = ["622279:16"]\n'
    )
    restarted = await bank_cli("--bank", "BOSC", "--port", str(port), "--config", str(config))
    try:
        assert restarted.stdout is not None
        line = await asyncio.wait_for(restarted.stdout.readline(), timeout=60)
        assert f"BOSC   listening on 127.0.0.1:{port}" in line.decode()
    finally:
        restarted.terminate()
        await restarted.wait()
    config.write_text(
        '[bank]\nname = "上海银行"\nenglish_name = "Bank of Shanghai"\ndebit_bins = ["6228:16"]\n'
    )
    malformed = await bank_cli("--bank", "BOSC", "--config", str(config))
    _, err = await malformed.communicate()
    assert malformed.returncode == 2
    assert f"cardlookup-bank: {config}: bank.debit_bins: " in err.decode()
    assert "PREFIX:LENGTH" in err.decode()
    # Held to what AdminService.CreateBank accepts; and a joining bank is served alone.
    config.write_text('[bank]\nname = "x"\nenglish_name = "Bank of Shanghai"\ndebit_bins = ["622892:16"]\n')
    misnamed = await bank_cli("--bank", "BOSC", "--config", str(config))
    _, err = await misnamed.communicate()
    assert misnamed.returncode == 2
    assert f"cardlookup-bank: {config}: bank.name: " in err.decode()
    everyone = await bank_cli("--all", "--name", "上海银行")
    _, err = await everyone.communicate()
    assert everyone.returncode == 2
    assert "serve it with --bank CODE" in " ".join(err.decode().replace("│", " ").split())  # a boxed message


async def test_a_joined_bank_outlives_a_restart_and_unknown_codes_are_refused(
    make_union: UnionFactory,
) -> None:
    first = await make_union()
    async with CardLookupClient(first.address, admin_token=ADMIN_TOKEN) as operator:
        bank = admin_pb.Bank(
            code="NBCB",
            name="宁波银行",
            english_name="Bank of Ningbo",
            interbank_code="408",
            address="127.0.0.1:9",
        )
        await operator.admin("CreateBank", admin_pb.CreateBankRequest(bank=bank))
    await first.stop(0)

    # The catalogue is in the database: after a restart the bank is there, and its address can be
    # configured like any other bank's.
    addresses = {**first.config.bank_addresses, "NBCB": "127.0.0.1:10"}
    again = await make_union(bank_addresses=addresses)
    async with CardLookupClient(again.address, admin_token=ADMIN_TOKEN) as operator:
        joined = next(b for b in await operator.list_banks() if b.code == "NBCB")
        assert (joined.address, joined.enabled, joined.interbank_code) == ("127.0.0.1:10", True, "408")
    await again.stop(0)

    # An address for a code nobody registered is refused at start-up, not ignored.
    unknown = UnionServer(replace(first.config, bank_addresses={**addresses, "NEWB": "127.0.0.1:11"}))
    try:
        with pytest.raises(UnknownBankCodes, match="NEWB"):
            await unknown.start()
    finally:
        await unknown.stop(0)
