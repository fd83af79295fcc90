"""`cardlookup-bank` operator commands against a bank's own store."""

from __future__ import annotations

from datetime import date
from pathlib import Path

from typer.testing import CliRunner

from server.bank.__main__ import app
from server.bank.store import BankStore, default_database_url
from server.common.checks import is_luhn_valid
from server.population.generator import make_resident_id

RESIDENT_ID = make_resident_id("110105", date(1949, 12, 31), 2)
runner = CliRunner()


def test_help_for_every_command() -> None:
    for command in ("serve", "cards", "add-customer", "add-card"):
        result = runner.invoke(app, [command, "--help"])
        assert result.exit_code == 0, result.output


def test_add_customer_card_and_list_masked(tmp_path: Path) -> None:
    common = ["--bank", "cmb", "--data-dir", str(tmp_path)]
    person = ["--id", RESIDENT_ID, "--name", "赵敏", "--mobile", "13800138000"]
    result = runner.invoke(app, ["add-customer", *common, *person])
    assert result.exit_code == 0, result.output
    result = runner.invoke(app, ["add-card", *common, "--id", RESIDENT_ID, "--type", "credit"])
    assert result.exit_code == 0, result.output
    not_luhn = ["--number", "6214830000000000", "--open-date", "2020-02-02"]
    result = runner.invoke(app, ["add-card", *common, "--id", RESIDENT_ID, *not_luhn])
    assert result.exit_code == 2
    store = BankStore("CMB", default_database_url(tmp_path, "CMB"))
    cards = store.find_cards(RESIDENT_ID, "赵敏")
    store.close()
    assert len(cards) == 1
    assert cards[0].number.startswith("622575")
    assert is_luhn_valid(cards[0].number)

    result = runner.invoke(app, ["cards", *common, "--id", RESIDENT_ID], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert f"{cards[0].number[:4]} **** {cards[0].number[-4:]}" in result.output
    assert cards[0].number not in result.output
    assert "1 card(s)" in result.output
    assert "balance" in result.output
    assert "¥0.00" in result.output
    assert "active" in result.output


def test_bad_input_is_refused(tmp_path: Path) -> None:
    common = ["--data-dir", str(tmp_path)]
    wrong_check = RESIDENT_ID[:17] + ("0" if RESIDENT_ID[17] != "0" else "1")
    person = ["--id", wrong_check, "--name", "x", "--mobile", "13800138000"]
    bad_id = runner.invoke(app, ["add-customer", "--bank", "CMB", *common, *person])
    assert bad_id.exit_code == 2
    unknown_bank = runner.invoke(app, ["cards", "--bank", "NOPE", *common, "--id", RESIDENT_ID])
    assert unknown_bank.exit_code == 2
    no_customer = runner.invoke(app, ["add-card", "--bank", "CMB", *common, "--id", RESIDENT_ID])
    assert no_customer.exit_code == 2
    both = runner.invoke(app, ["serve", "--bank", "CMB", "--all", *common])
    assert both.exit_code == 2
