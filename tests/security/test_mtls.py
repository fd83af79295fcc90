"""Union↔bank mutual TLS with the development PKI: the right peers talk, every wrong one is refused."""

from __future__ import annotations

import stat
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import replace
from pathlib import Path

import grpc
import pytest
import typer
from bankquery.v1 import bank_query_service_pb2 as pb
from bankquery.v1 import bank_query_service_pb2_grpc as pb_grpc
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from typer.testing import CliRunner

from server.bank.__main__ import _tls_for
from server.bank.bank_server import RunningBank, start_bank
from server.common.dev_ca import bank_tls_files, create_dev_pki, main, union_client_tls, union_server_tls
from server.common.grpc_runtime import ClientTls, TlsFiles
from server.common.shapes import bank_tls_name
from server.population.catalogue import BANKS, BANKS_BY_CODE, BankInfo, Bin
from server.population.generator import DEMO_PEOPLE
from server.union.__main__ import app as union_app
from server.union.bank_gateway import GrpcBankGateway
from server.union.domain.banks import BankCallFailed, ReportedCard
from server.union.domain.model import Bank, CardStatus, CardType

SEED = 20211201
SIZE = 50
ZHANG = DEMO_PEOPLE[0].person  # two reportable ICBC cards (a third, closed, is not reported)
TIMEOUT = 5.0

BankStarter = Callable[[str, TlsFiles | None], Awaitable[RunningBank]]


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("pki")
    create_dev_pki(directory)
    return directory


@pytest.fixture(scope="module")
def rogue_pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A second, unrelated CA issuing certificates with exactly the same names."""
    directory = tmp_path_factory.mktemp("rogue-pki")
    create_dev_pki(directory)
    return directory


@pytest.fixture
async def start(tmp_path: Path) -> AsyncIterator[BankStarter]:
    running: list[RunningBank] = []

    async def starter(code: str, tls: TlsFiles | None) -> RunningBank:
        bank = await start_bank(code, data_dir=tmp_path / "banks", seed=SEED, size=SIZE, tls=tls)
        running.append(bank)
        return bank

    yield starter
    for bank in running:
        await bank.stop(0)


@pytest.fixture
async def icbc(start: BankStarter, pki: Path) -> RunningBank:
    return await start("ICBC", bank_tls_files(pki, "ICBC"))


def _bank(code: str, address: str) -> Bank:
    info = BANKS_BY_CODE[code]
    return Bank(info.code, info.name, info.english_name, address, enabled=True, position=0)


async def _query(tls: ClientTls | None, bank: Bank) -> list[ReportedCard]:
    gateway = GrpcBankGateway(tls)
    try:
        return await gateway.query_cards(
            bank, "q-tls", ZHANG.resident_id_number, ZHANG.name, call_timeout=TIMEOUT
        )
    finally:
        await gateway.close()


# --- the PKI itself ------------------------------------------------------------------------


def test_pki_files_names_and_modes(pki: Path) -> None:
    expected = {"ca", "union-client", "union-server", *(b.code.lower() for b in BANKS)}
    assert {p.stem for p in pki.glob("*.crt")} == expected
    assert {p.stem for p in pki.glob("*.key")} == expected
    for key in pki.glob("*.key"):
        assert stat.S_IMODE(key.stat().st_mode) == 0o600, key
    ca = x509.load_pem_x509_certificate((pki / "ca.crt").read_bytes())
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca

    icbc = x509.load_pem_x509_certificate((pki / "icbc.crt").read_bytes())
    icbc.verify_directly_issued_by(ca)
    assert icbc.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "ICBC"
    san = icbc.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == [bank_tls_name("ICBC")]
    eku = icbc.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert set(eku) == {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH}
    assert 360 <= (icbc.not_valid_after_utc - icbc.not_valid_before_utc).days <= 366
    assert (ca.not_valid_after_utc - ca.not_valid_before_utc).days >= 3600

    client = x509.load_pem_x509_certificate((pki / "union-client.crt").read_bytes())
    client.verify_directly_issued_by(ca)
    eku = client.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.CLIENT_AUTH]

    server = x509.load_pem_x509_certificate((pki / "union-server.crt").read_bytes())
    san = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert set(san.get_values_for_type(x509.DNSName)) == {"localhost", "union.cardlookup.test"}
    assert [str(ip) for ip in san.get_values_for_type(x509.IPAddress)] == ["127.0.0.1"]


def test_pki_is_idempotent_unless_overwritten(tmp_path: Path) -> None:
    assert main([str(tmp_path / "pki")]) == 0
    before = {p.name: p.read_bytes() for p in (tmp_path / "pki").iterdir()}
    create_dev_pki(tmp_path / "pki")
    assert {p.name: p.read_bytes() for p in (tmp_path / "pki").iterdir()} == before

    # A missing leaf is re-issued by the existing CA; everything else stays.
    (tmp_path / "pki" / "cmb.key").unlink()
    create_dev_pki(tmp_path / "pki")
    after = {p.name: p.read_bytes() for p in (tmp_path / "pki").iterdir()}
    assert {n for n in after if after[n] != before[n]} == {"cmb.crt", "cmb.key"}

    create_dev_pki(tmp_path / "pki", overwrite=True)
    replaced = {p.name: p.read_bytes() for p in (tmp_path / "pki").iterdir()}
    assert all(replaced[n] != before[n] for n in before)


def test_helpers_read_the_right_files(pki: Path) -> None:
    files = bank_tls_files(pki, "icbc")
    assert files.cert_chain == (pki / "icbc.crt").read_bytes()
    assert files.client_ca == (pki / "ca.crt").read_bytes()  # client certificates required
    client = union_client_tls(pki)
    assert client.cert_chain == (pki / "union-client.crt").read_bytes()
    assert client.root_ca == files.client_ca
    assert union_server_tls(pki).client_ca is None
    assert _tls_for(pki, "ICBC") == files
    assert _tls_for(None, "ICBC") is None


def test_clis_refuse_an_incomplete_pki_directory(tmp_path: Path) -> None:
    with pytest.raises(typer.BadParameter):
        _tls_for(tmp_path, "ICBC")
    result = CliRunner().invoke(union_app, ["serve", "--bank-tls-dir", str(tmp_path)])
    assert result.exit_code == 2
    assert "--bank-tls-dir" in result.output


# --- handshakes -------------------------------------------------------------------------------


async def test_union_with_the_right_pki_gets_the_cards(icbc: RunningBank, pki: Path) -> None:
    cards = await _query(union_client_tls(pki), _bank("ICBC", icbc.address))
    assert sorted((c.card_type, c.status, c.last_four) for c in cards) == [
        (CardType.CREDIT, CardStatus.ACTIVE, "2353"),
        (CardType.DEBIT, CardStatus.ACTIVE, "1472"),
    ]
    assert {c.bank_code for c in cards} == {"ICBC"}


async def test_client_without_a_certificate_is_refused(icbc: RunningBank, pki: Path) -> None:
    credentials = grpc.ssl_channel_credentials((pki / "ca.crt").read_bytes())
    options = [("grpc.ssl_target_name_override", bank_tls_name("ICBC"))]
    async with grpc.aio.secure_channel(icbc.address, credentials, options=options) as channel:
        stub = pb_grpc.BankQueryServiceStub(channel)
        request = pb.QueryCardsRequest(
            query_id="q-anon", resident_id_number=ZHANG.resident_id_number, name=ZHANG.name
        )
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            async for _ in stub.QueryCards(request, timeout=TIMEOUT):
                pass
    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE


async def test_bank_presenting_another_banks_certificate_is_refused(start: BankStarter, pki: Path) -> None:
    impostor = await start("CMB", bank_tls_files(pki, "ICBC"))
    with pytest.raises(BankCallFailed) as refused:
        await _query(union_client_tls(pki), _bank("CMB", impostor.address))
    assert "UNAVAILABLE" in refused.value.reason
    # Called as ICBC, the handshake passes but the answer names CMB: still refused.
    with pytest.raises(BankCallFailed, match="another bank"):
        await _query(union_client_tls(pki), _bank("ICBC", impostor.address))


async def test_bank_certified_by_another_ca_is_refused(
    start: BankStarter, pki: Path, rogue_pki: Path
) -> None:
    rogue = await start("ICBC", bank_tls_files(rogue_pki, "ICBC"))
    with pytest.raises(BankCallFailed, match="UNAVAILABLE"):
        await _query(union_client_tls(pki), _bank("ICBC", rogue.address))


async def test_a_joining_bank_is_held_to_the_name_in_the_catalogue(tmp_path: Path) -> None:
    """A bank that joins later, certified by the development CA on request under a name of its own:
    the union accepts it under that name (the catalogue's tls_name) and under no other."""
    pki = tmp_path / "pki"
    create_dev_pki(pki)
    assert main([str(pki), "--bank", "BOSC", "--tls-name", "gateway.bosc.example"]) == 0
    bosc_info = BankInfo("BOSC", "上海银行", "Bank of Shanghai", "325", (Bin("622892", 16),), ())
    bosc = await start_bank(
        "BOSC",
        data_dir=tmp_path / "banks",
        seed=SEED,
        size=SIZE,
        tls=bank_tls_files(pki, "BOSC"),
        bank_info=bosc_info,
    )
    try:
        registered = Bank(
            "BOSC", "上海银行", "Bank of Shanghai", bosc.address, True, 16, "325", "gateway.bosc.example"
        )
        assert (
            await _query(union_client_tls(pki), registered) == []
        )  # 张伟 banks elsewhere; the call went through
        with pytest.raises(BankCallFailed, match="UNAVAILABLE"):  # the default name is not what it holds
            await _query(union_client_tls(pki), replace(registered, tls_name=""))
    finally:
        await bosc.stop(0)
    with pytest.raises(SystemExit):  # no CA there to issue from: refused, nothing written
        main([str(tmp_path / "empty"), "--bank", "BOSC"])
    assert not (tmp_path / "empty" / "bosc.crt").exists()


async def test_plaintext_union_cannot_reach_a_tls_bank(icbc: RunningBank) -> None:
    with pytest.raises(BankCallFailed, match="UNAVAILABLE") as refused:
        await _query(None, _bank("ICBC", icbc.address))
    assert refused.value.retryable


async def test_tls_union_cannot_reach_a_plaintext_bank(start: BankStarter, pki: Path) -> None:
    plain = await start("ICBC", None)
    with pytest.raises(BankCallFailed, match="UNAVAILABLE"):
        await _query(union_client_tls(pki), _bank("ICBC", plain.address))


async def test_client_certificate_from_another_ca_is_refused(
    icbc: RunningBank, pki: Path, rogue_pki: Path
) -> None:
    rogue_client = union_client_tls(rogue_pki)
    tls = ClientTls(
        root_ca=(pki / "ca.crt").read_bytes(),  # trusts the real bank…
        cert_chain=rogue_client.cert_chain,  # …but presents a certificate the bank does not trust
        private_key=rogue_client.private_key,
    )
    with pytest.raises(BankCallFailed, match="UNAVAILABLE"):
        await _query(tls, _bank("ICBC", icbc.address))
