"""A bank process's configuration file (config/bank.example.toml shows every key).

Tables: [server] [bank] [database] [population] [faults] [metrics] [tracing] [logging]; environment
variables `CARDLOOKUP_BANK_<TABLE>__<KEY>` override the file, and `cardlookup-bank serve`'s flags
override both (server/common/config_file.py). Which banks a process serves (--bank CODE or --all) is
chosen per run, on the command line; [bank] says who a bank outside the built-in 16 is, so it
restarts from its file like any other.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated

from pydantic import AfterValidator, Field, field_validator
from pydantic_settings import SettingsConfigDict

from server.bank.bank_server import DEFAULT_BASE_PORT, DEFAULT_DATA_DIR, DEFAULT_POPULATION, DEFAULT_SEED
from server.bank.faults import FaultSettings
from server.common.config_file import (
    FileSettings,
    LoggingSettings,
    MetricsSettings,
    Table,
    TracingSettings,
)
from server.common.shapes import BANK_ENGLISH_NAME, BANK_NAME, INTERBANK_CODE

ENV_PREFIX = "CARDLOOKUP_BANK_"
BIN_SPEC = re.compile(r"^([0-9]{6,8}):(1[6-9])$")


def _host(value: str) -> str:
    bracketed = value.startswith("[") and value.endswith("]")  # an IPv6 address
    if not value or (not bracketed and any(character in value for character in " /:")):
        raise ValueError("expected a host name or address, e.g. 127.0.0.1")
    return value


class ServerSettings(Table):
    # Interface the bank servers listen on.
    host: Annotated[str, AfterValidator(_host)] = "127.0.0.1"
    # One bank (--bank CODE) listens here (0: any free port).
    port: int = Field(default=DEFAULT_BASE_PORT, ge=0, le=65535)
    # All banks (--all) listen from here on, one port each in catalogue order.
    base_port: int = Field(default=DEFAULT_BASE_PORT, ge=0, le=65535 - 16)
    # Each bank's SQLite file, and its fault control file (cardlookup-bank faults).
    data_dir: Path = DEFAULT_DATA_DIR
    # <bank>.crt, <bank>.key and ca.crt: mutual TLS (a development PKI: python -m server.common.dev_ca DIR).
    tls_dir: Path | None = None


def _bin_specs(values: list[str]) -> list[str]:
    for value in values:
        if not BIN_SPEC.fullmatch(value):
            raise ValueError("expected PREFIX:LENGTH, a 6-8 digit prefix and 16-19, e.g. 622892:16")
    return values


def _interbank_code(value: str) -> str:
    if value and not INTERBANK_CODE.fullmatch(value):
        raise ValueError("expected 3 digits (the CNAPS code), e.g. 325")
    return value


def _bank_name(value: str) -> str:
    if value and not BANK_NAME.fullmatch(value):
        raise ValueError("expected 2-32 Chinese characters, e.g. 上海银行 (as AdminService.CreateBank)")
    return value


def _bank_english_name(value: str) -> str:
    if value and not BANK_ENGLISH_NAME.fullmatch(value):
        raise ValueError("expected 2-128 letters, digits, spaces or .,&'()- (as AdminService.CreateBank)")
    return value


class JoiningBankSettings(Table):
    # A bank outside the built-in 16 (served with --bank CODE): its Chinese and English names.
    name: Annotated[str, AfterValidator(_bank_name)] = ""
    english_name: Annotated[str, AfterValidator(_bank_english_name)] = ""
    # Its 3-digit CNAPS code.
    interbank_code: Annotated[str, AfterValidator(_interbank_code)] = ""
    # Its card BINs as PREFIX:LENGTH; at least one debit BIN.
    debit_bins: Annotated[list[str], AfterValidator(_bin_specs)] = Field(default_factory=list)
    credit_bins: Annotated[list[str], AfterValidator(_bin_specs)] = Field(default_factory=list)


class DatabaseSettings(Table):
    # SQLAlchemy URL of one bank's database (--bank only); "" for a SQLite file in data_dir.
    url: str = ""


class PopulationSettings(Table):
    # The synthetic people and cards an empty store is seeded with; the union's must match.
    seed: int = DEFAULT_SEED
    size: int = Field(default=DEFAULT_POPULATION, ge=1)


class BankSettings(FileSettings):
    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX, env_nested_delimiter="__", extra="forbid", frozen=True
    )

    server: ServerSettings = ServerSettings()
    bank: JoiningBankSettings = JoiningBankSettings()
    database: DatabaseSettings = DatabaseSettings()
    population: PopulationSettings = PopulationSettings()
    # The fault knobs every bank of the process starts with (server/bank/faults.py), e.g.
    # latency_ms = 300; `cardlookup-bank faults` changes them at run time.
    faults: dict[str, str | int | float | bool] = Field(default_factory=dict)
    metrics: MetricsSettings = MetricsSettings()
    tracing: TracingSettings = TracingSettings()
    logging: LoggingSettings = LoggingSettings()

    @field_validator("faults")
    @classmethod
    def _known_faults(cls, value: dict[str, str | int | float | bool]) -> dict[str, str | int | float | bool]:
        FaultSettings.parse(cls._fault_specs(value))  # its ValueError names the knob and the rule
        return value

    @staticmethod
    def _fault_specs(faults: dict[str, str | int | float | bool]) -> list[str]:
        return [
            f"{key}={str(value).lower() if isinstance(value, bool) else value}"
            for key, value in faults.items()
        ]

    def fault_settings(self, extra: list[str]) -> FaultSettings:
        """The file's knobs, then --fault key=value on top."""
        return FaultSettings.parse([*self._fault_specs(self.faults), *extra])
