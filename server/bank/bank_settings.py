"""A bank process's configuration file (config/bank.example.toml shows every key).

Tables: [server] [database] [population] [faults] [metrics] [tracing] [logging]; environment
variables `CARDLOOKUP_BANK_<TABLE>__<KEY>` override the file, and `cardlookup-bank serve`'s flags
override both (server/common/config_file.py). Which banks a process serves (--bank CODE or --all) is
chosen per run, on the command line.
"""

from __future__ import annotations

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

ENV_PREFIX = "CARDLOOKUP_BANK_"


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
