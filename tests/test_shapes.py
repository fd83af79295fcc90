"""One shape per shared name: the admin API, the union's configuration, the bank's command line and
the development CA accept the same bank codes, addresses and TLS names."""

from __future__ import annotations

from pathlib import Path

import pytest
from cardlookup.v1 import admin_service_pb2 as admin_pb
from google.protobuf import field_mask_pb2

from clients.client import CardLookupClient, CardLookupError
from server.common.config_file import ConfigError, load
from server.common.dev_ca import create_dev_pki, issue_bank_certificate
from server.common.shapes import BANK_CODE, DNS_NAME, is_bank_address
from server.union.union_server import UnionServer
from server.union.union_settings import UnionSettings

ADDRESSES = {
    "127.0.0.1:50061": True,
    "bosc.bank.example:443": True,
    "[::1]:50061": True,
    "localhost:1": True,
    "127.0.0.1:0": False,  # a port to dial, not to listen on
    "a:99999": False,
    "::1:50061": False,  # IPv6 without brackets: which colon ends the host?
    "[::zz]:1": False,
    "bank:https": False,
    "bank:٣": False,  # a digit, but not an ASCII one
    "bank name:80": False,
    ":80": False,
    "bank": False,
}
TLS_NAMES = {
    "bosc.bank.cardlookup.test": True,
    "icbc.bank.example": True,
    "localhost": False,  # no dot: not a name a bank's certificate is issued for
    "ICBC.bank.example": False,
    "bosc bank.test": False,
    "-bosc.test": False,
}
CODES = {"BOSC": True, "IC": True, "A": False, "bosc": False, "IC-BK": False, "ABCDEFGHIJKLMNOPQ": False}


@pytest.mark.parametrize(("address", "valid"), ADDRESSES.items())
def test_a_bank_address_is_host_and_a_port_to_dial(address: str, valid: bool) -> None:
    assert is_bank_address(address) is valid


@pytest.mark.parametrize(("name", "valid"), TLS_NAMES.items())
def test_a_tls_name_is_a_lower_case_dns_name(name: str, valid: bool) -> None:
    assert bool(DNS_NAME.fullmatch(name)) is valid


@pytest.mark.parametrize(("code", "valid"), CODES.items())
def test_a_bank_code_is_capital_letters(code: str, valid: bool) -> None:
    assert bool(BANK_CODE.fullmatch(code)) is valid


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
async def test_the_admin_api_takes_these_addresses_and_tls_names(union: UnionServer) -> None:
    async with CardLookupClient(union.address, admin_token=union.config.admin_token) as operator:
        for address, valid in ADDRESSES.items():
            update = admin_pb.UpdateBankRequest(
                code="ICBC", address=address, update_mask=field_mask_pb2.FieldMask(paths=["address"])
            )
            if valid:
                assert (await operator.admin("UpdateBank", update)).bank.address == address
            else:
                with pytest.raises(CardLookupError) as refused:
                    await operator.admin("UpdateBank", update)
                assert [field for field, _ in refused.value.field_violations] == ["address"]
        for index, (name, valid) in enumerate(TLS_NAMES.items()):
            joining = admin_pb.Bank(
                code=f"BK{chr(ord('A') + index)}",
                name="测试银行",
                english_name="Test Bank",
                interbank_code=f"9{index:02d}",
                address="127.0.0.1:1",
                tls_name=name,
            )
            create = admin_pb.CreateBankRequest(bank=joining)
            if valid:
                assert (await operator.admin("CreateBank", create)).bank.tls_name == name
            else:
                with pytest.raises(CardLookupError) as refused:
                    await operator.admin("CreateBank", create)
                assert [field for field, _ in refused.value.field_violations] == ["bank.tls_name"]


@pytest.mark.parametrize(("address", "valid"), ADDRESSES.items())
def test_the_unions_configuration_takes_the_addresses_createbank_takes(
    tmp_path: Path, address: str, valid: bool
) -> None:
    path = tmp_path / "union.toml"
    path.write_text(f'[banks.ICBC]\naddress = "{address}"\n')
    if valid:
        assert load(UnionSettings, path, {}, {}).bank_addresses() == {"ICBC": address}
    else:
        with pytest.raises(ConfigError, match=r"banks\.ICBC\.address: expected host:port"):
            load(UnionSettings, path, {}, {})


@pytest.mark.parametrize(("name", "valid"), TLS_NAMES.items())
def test_the_unions_configuration_takes_the_tls_names_createbank_takes(
    tmp_path: Path, name: str, valid: bool
) -> None:
    path = tmp_path / "union.toml"
    path.write_text(f'[banks.ICBC]\naddress = "127.0.0.1:1"\ntls_name = "{name}"\n')
    if valid:
        assert load(UnionSettings, path, {}, {}).banks["ICBC"].tls_name == name
    else:
        with pytest.raises(ConfigError, match=r"banks\.ICBC\.tls_name: expected a lower-case DNS name"):
            load(UnionSettings, path, {}, {})


@pytest.mark.parametrize(("name", "valid"), TLS_NAMES.items())
def test_the_development_ca_certifies_the_tls_names_createbank_takes(
    pki: Path, name: str, valid: bool
) -> None:
    if valid:
        assert issue_bank_certificate(pki, "BOSC", name).exists()
    else:
        with pytest.raises(ValueError, match="TLS name"):
            issue_bank_certificate(pki, "BOSC", name)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("pki")
    create_dev_pki(directory)
    return directory
