"""The configuration files: the examples load and name every key, the environment and flags override
the file, and a bad file stops the server before it starts with one line naming the key and the
reason (a wrong type, an unknown key, a bad address), never the value."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import pytest
from pydantic import BaseModel
from typer.testing import CliRunner

from server.bank.__main__ import app as bank_app
from server.bank.bank_server import start_bank
from server.bank.bank_settings import BankSettings
from server.common.config_file import ConfigError, load
from server.common.dev_ca import bank_tls_files, create_dev_pki
from server.population.catalogue import BANKS
from server.union.__main__ import app as union_app
from server.union.__main__ import load_settings
from server.union.bank_gateway import GrpcBankGateway
from server.union.domain.banks import BankCallFailed
from server.union.domain.model import Bank
from server.union.union_settings import UnionSettings
from tests.conftest import SEED, SIZE, ZHANG

ROOT = Path(__file__).resolve().parent.parent
UNION_EXAMPLE = ROOT / "config" / "union.example.toml"
BANK_EXAMPLE = ROOT / "config" / "bank.example.toml"
OPERATIONS = ROOT / "docs" / "operations.md"


def _keys(model: type[BaseModel], prefix: str = "") -> list[str]:
    """Every key of a settings model, dotted ("server.listen"); dict tables (banks, faults) by name."""
    keys = []
    for name, field in model.model_fields.items():
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            keys += _keys(annotation, f"{prefix}{name}.")
        else:
            keys.append(f"{prefix}{name}")
    return keys


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "config.toml"
    path.write_text(text)
    return path


def test_the_union_example_is_what_make_serve_runs() -> None:
    config = load(UnionSettings, UNION_EXAMPLE, {}, {}).union_config()
    assert config.listen == "127.0.0.1:50051"
    assert config.data_dir == Path("data/demo/union")
    assert config.bank_addresses == {bank.code: f"127.0.0.1:{50061 + i}" for i, bank in enumerate(BANKS)}
    assert (config.metrics_listen, config.http_listen) == ("127.0.0.1:9464", "127.0.0.1:8080")
    assert config.lookups.requery_cooldown == timedelta(days=7)
    assert config.retention.report_days == 7
    assert config.retention.timezone == "Asia/Shanghai"
    assert config.tracer_provider is None
    # Everything else is the dataclasses' own default: the file documents them, it changes nothing.
    defaults = load(UnionSettings, None, {}, {}).union_config()
    assert config.orchestration == defaults.orchestration
    assert config.identity == defaults.identity
    assert config.card_actions == defaults.card_actions
    assert config.retention == defaults.retention


def test_the_bank_example_loads() -> None:
    settings = load(BankSettings, BANK_EXAMPLE, {}, {})
    assert settings.server.base_port == 50061
    assert settings.server.data_dir == Path("data/demo/banks")
    assert settings.metrics.listen == "127.0.0.1:9465"
    assert settings.tracing.otlp_endpoint == ""


@pytest.mark.parametrize(("model", "example"), [(UnionSettings, UNION_EXAMPLE), (BankSettings, BANK_EXAMPLE)])
def test_every_key_is_in_the_example_file_and_in_the_operations_guide(
    model: type[BaseModel], example: Path
) -> None:
    text = example.read_text()
    guide = OPERATIONS.read_text()
    for key in _keys(model):
        *tables, name = key.split(".")
        # The key is set or shown commented out (`# tls_dir = …`), under its table's header.
        table = re.escape(".".join(tables))
        # (Up to the next table's header: a line that starts with "[", not a list value.)
        under = rf"(?ms)^\[{table}\](?:(?!^\[).)*?^#?\s*{re.escape(name)}\s*="
        shown = under if tables else rf"(?m)^\[{name}\]"
        assert re.search(shown, text), f"{example.name} does not show {key}"
        assert f"`{key}`" in guide, f"docs/operations.md does not describe {key}"


def test_environment_variables_override_the_file_and_flags_override_both(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = _write(tmp_path, '[server]\nlisten = "127.0.0.1:1"\n[metrics]\nlisten = "127.0.0.1:2"\n')
    monkeypatch.setenv("CARDLOOKUP_UNION_SERVER__LISTEN", "127.0.0.1:3")
    monkeypatch.setenv("CARDLOOKUP_UNION_BANKS__icbc__ADDRESS", "10.0.0.1:443")
    monkeypatch.setenv("CARDLOOKUP_UNION_ORCHESTRATION__CALL_TIMEOUT_SECONDS", "4")
    _, config = load_settings(path, {"--metrics-listen": "127.0.0.1:5", "--listen": None})
    assert config.listen == "127.0.0.1:3"
    assert config.metrics_listen == "127.0.0.1:5"
    assert config.bank_addresses == {"ICBC": "10.0.0.1:443"}
    assert config.orchestration.call_timeout == timedelta(seconds=4)
    _, config = load_settings(path, {"--listen": "127.0.0.1:6"}, {"CMB": "10.0.0.2:443"})
    assert config.listen == "127.0.0.1:6"
    assert config.bank_addresses == {"ICBC": "10.0.0.1:443", "CMB": "10.0.0.2:443"}


def test_a_bank_certificate_name_reaches_the_gateway(tmp_path: Path) -> None:
    pki = tmp_path / "pki"
    create_dev_pki(pki)
    path = _write(
        tmp_path,
        f'[bank_tls]\ndir = "{pki}"\n[banks.ICBC]\naddress = "10.0.0.1:443"\n'
        'tls_name = "gateway.icbc.example"\n[banks.CMB]\naddress = "10.0.0.2:443"\n',
    )
    config = load(UnionSettings, path, {}, {}).union_config()
    assert config.bank_tls is not None
    assert dict(config.bank_tls.server_names) == {"ICBC": "gateway.icbc.example"}
    assert config.bank_tls.root_ca == (pki / "ca.crt").read_bytes()


async def test_the_union_holds_each_bank_to_the_certificate_name_its_table_gives(
    tmp_path: Path, seeded_banks_template: Path
) -> None:
    """Under mutual TLS the gateway checks the bank's certificate against banks.<CODE>.tls_name: the
    default (the bank code's name) passes, a name the certificate does not carry is refused."""
    pki = tmp_path / "pki"
    create_dev_pki(pki)
    shutil.copytree(seeded_banks_template, tmp_path / "banks")
    icbc = await start_bank(
        "ICBC", data_dir=tmp_path / "banks", seed=SEED, size=SIZE, tls=bank_tls_files(pki, "ICBC")
    )
    bank = Bank("ICBC", "中国工商银行", "ICBC", icbc.address, enabled=True, position=0)

    async def query(tls_name: str) -> int:
        table = f'[banks.ICBC]\naddress = "{icbc.address}"\ntls_name = "{tls_name}"\n'
        config = load(UnionSettings, _write(tmp_path, f'[bank_tls]\ndir = "{pki}"\n{table}'), {}, {})
        gateway = GrpcBankGateway(config.union_config().bank_tls)
        try:
            cards = await gateway.query_cards(bank, "q-1", ZHANG.resident_id_number, ZHANG.name, 5)
        finally:
            await gateway.close()
        return len(cards)

    try:
        assert await query("icbc.bank.cardlookup.test") > 0
        with pytest.raises(BankCallFailed):
            await query("cmb.bank.cardlookup.test")
    finally:
        await icbc.stop(0)


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        (
            '[server]\nmax_concurrent_calls = "many"\n',
            "server.max_concurrent_calls: Input should be a valid integer",
        ),
        ('[server]\nlistn = "127.0.0.1:50051"\n', "server.listn: unknown key"),
        ('[sever]\nlisten = "127.0.0.1:50051"\n', "sever: unknown key"),
        ('[server]\nlisten = "127.0.0.1"\n', "server.listen: expected host:port"),
        ('[banks.ICBC]\naddress = "icbc:https"\n', "banks.ICBC.address: expected host:port"),
        # A bank's address and TLS name are held to what AdminService.CreateBank accepts.
        ('[banks.ICBC]\naddress = "127.0.0.1:0"\n', "banks.ICBC.address: expected host:port (a port 1-65535"),
        ('[banks.ICBC]\naddress = "::1:50061"\n', "banks.ICBC.address: expected host:port"),
        (
            '[banks.ICBC]\naddress = "127.0.0.1:1"\ntls_name = "ICBC Bank"\n',
            "banks.ICBC.tls_name: expected a lower-case DNS name",
        ),
        # A code of the right shape is checked against the catalogue at start-up (UnknownBankCodes,
        # tests/union/test_joining_bank.py); a malformed one here.
        ('[banks."IC-BK"]\naddress = "127.0.0.1:1"\n', "banks: 1 key(s): not a bank code"),
        ('[retention]\ntimezone = "Mars/Olympus"\n', "retention.timezone: not a known IANA time zone"),
        ('[tracing]\notlp_endpoint = "collector:4317"\n', "tracing.otlp_endpoint: expected http://"),
        ('[database]\nurl = "not a url"\n', "database.url: not a SQLAlchemy database URL"),
        ("[server\n", "not valid TOML"),
    ],
)
def test_a_bad_union_file_stops_the_server_with_the_key_and_the_reason(
    tmp_path: Path, text: str, problem: str
) -> None:
    path = _write(tmp_path, text)
    result = CliRunner().invoke(union_app, ["serve", "--config", str(path)])
    assert result.exit_code == 2
    lines = result.output.strip().splitlines()
    assert lines == [lines[0]], "one line per problem, and there is one"
    assert lines[0].startswith(f"cardlookup-union: {path}: ")
    assert problem in lines[0]
    assert "Traceback" not in result.output


def test_the_value_itself_is_never_repeated(tmp_path: Path) -> None:
    path = _write(
        tmp_path,
        '[database]\nurl = "postgresql+psycopg://u:s3cret-pw@/db?x=%"\n[server]\nlisten = "s3cret"\n',
    )
    result = CliRunner().invoke(union_app, ["serve", "--config", str(path)])
    assert result.exit_code == 2
    assert "server.listen" in result.output
    assert "s3cret" not in result.output


def test_a_bad_variable_or_flag_is_named_as_itself(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CARDLOOKUP_UNION_LOOKUPS__REQUERY_COOLDOWN_HOURS", "soon")
    result = CliRunner().invoke(union_app, ["serve", "--log-level", "LOUD"])
    assert result.exit_code == 2
    assert result.output.strip().splitlines() == [
        "cardlookup-union: CARDLOOKUP_UNION_LOOKUPS__REQUERY_COOLDOWN_HOURS: "
        "Input should be a valid number, unable to parse string as a number",
        "cardlookup-union: --log-level: expected DEBUG, INFO, WARNING, ERROR or CRITICAL",
    ]


def test_a_missing_file_or_tls_directory_is_named(tmp_path: Path) -> None:
    result = CliRunner().invoke(union_app, ["serve", "--config", str(tmp_path / "nowhere.toml")])
    assert result.exit_code == 2
    assert "nowhere.toml: no such file" in result.output
    path = _write(tmp_path, f'[bank_tls]\ndir = "{tmp_path}"\n')
    result = CliRunner().invoke(union_app, ["serve", "--config", str(path)])
    assert result.exit_code == 2
    assert f"{path}: bank_tls.dir: " in result.output
    assert "ca.crt is missing" in result.output


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("[server]\nbase_port = -1\n", "server.base_port: Input should be greater than or equal to 0"),
        ('[server]\nhost = "127.0.0.1:50061"\n', "server.host: expected a host name or address"),
        ("[faults]\nlatency = 300\n", "faults: unknown fault"),
        ("[faults]\nerror_rate = 2\n", "faults: error_rate"),
        ('[metrics]\nlisten = "9465"\n', "metrics.listen: expected host:port"),
        ('[logging]\nlevel = "LOUD"\n', "logging.level: expected DEBUG"),
        ("[population]\nsize = 0\n", "population.size: Input should be greater than or equal to 1"),
    ],
)
def test_a_bad_bank_file_stops_the_bank_process_with_the_key_and_the_reason(
    tmp_path: Path, text: str, problem: str
) -> None:
    path = _write(tmp_path, text)
    result = CliRunner().invoke(bank_app, ["serve", "--all", "--config", str(path)])
    assert result.exit_code == 2
    lines = result.output.strip().splitlines()
    assert len(lines) == 1
    assert lines[0].startswith(f"cardlookup-bank: {path}: ")
    assert problem in lines[0]


def test_the_process_exits_non_zero_before_listening(tmp_path: Path) -> None:
    """As an operator meets it: a real process, a bad file, one line on stderr, exit status 2."""
    path = _write(tmp_path, '[server]\nlisten = "127.0.0.1:50051:1"\n[metrics]\nlisten = 9464\n')
    result = subprocess.run(
        [sys.executable, "-m", "server.union", "serve", "--config", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 2
    assert result.stdout == ""
    assert result.stderr.splitlines() == [
        f"cardlookup-union: {path}: server.listen: expected host:port, with an IPv6 host in brackets "
        "([::1]:50051)",
        f"cardlookup-union: {path}: metrics.listen: Input should be a valid string",
    ]


def test_config_error_lists_every_problem() -> None:
    error = ConfigError(["a: unknown key", "b: required"])
    assert str(error) == "a: unknown key\nb: required"


def test_the_readme_shows_the_configuration_and_its_commands_run_from_the_venv(tmp_path: Path) -> None:
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Configuration, in brief", 1)[1].split("\n## ", 1)[0]
    assert "(docs/operations.md)" in section
    assert "(config/union.example.toml)" in section
    # The excerpt is valid TOML with keys the union knows.
    excerpt = section.split("```toml\n", 1)[1].split("```", 1)[0]
    settings = load(UnionSettings, _write(tmp_path, excerpt), {}, {})
    assert settings.banks["ICBC"].address == "127.0.0.1:50061"
    # `python -m …` as written works on a fresh clone only with the project's interpreter.
    assert re.findall(r"(?<!\.venv/bin/)python -m ", readme) == []
