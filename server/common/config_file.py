"""What the union's and the banks' configuration files share: how a file is read, checked and
reported on, and the tables both have (metrics, tracing, logging).

A server reads one TOML file (`--config`), then environment variables over it (each key has one:
the server's prefix, then the table and key joined by `__`, e.g. `CARDLOOKUP_UNION_SERVER__LISTEN`),
then its command-line flags over both. pydantic-settings parses and checks the result; every key
has a default, so an empty file (or none) is a working loopback setup. Anything wrong stops the
server before it starts, with one line per problem that names the key, where it came from (the
file, a variable, a flag) and the rule it broke, never the value (a database URL may hold a
password).
"""

from __future__ import annotations

import contextvars
import ipaddress
import logging
import os
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, TypeVar

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

from server.common.tracing import TracingConfig

S = TypeVar("S", bound=BaseSettings)

# The file the settings being loaded now come from (pydantic-settings asks the class for its
# sources, so the path cannot be an argument).
_CONFIG_FILE: contextvars.ContextVar[Path | None] = contextvars.ContextVar("config_file", default=None)


class ConfigError(Exception):
    """The configuration cannot be used: one line per problem."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


class Table(BaseModel):
    """A table of a configuration file: unknown keys are errors, not silently ignored."""

    model_config = ConfigDict(extra="forbid", frozen=True)


def _host_port(value: str) -> str:
    host, separator, port = value.rpartition(":")
    if not (separator and host and port.isdigit() and int(port) <= 65535):
        raise ValueError("expected host:port (port 0-65535)")
    if host.startswith("[") or ":" in host:
        try:
            if not (host.startswith("[") and host.endswith("]")):
                raise ValueError
            ipaddress.IPv6Address(host[1:-1])
        except ValueError:
            raise ValueError("expected host:port, with an IPv6 host in brackets ([::1]:50051)") from None
    return value


def _optional_host_port(value: str) -> str:
    return _host_port(value) if value else value


def _log_level(value: str) -> str:
    level = value.upper()
    if level not in logging.getLevelNamesMapping() or level == "NOTSET":
        raise ValueError("expected DEBUG, INFO, WARNING, ERROR or CRITICAL")
    return level


def _otlp_endpoint(value: str) -> str:
    if value and not value.startswith(("http://", "https://")):
        raise ValueError("expected http://host:port or https://host:port (OTLP over gRPC)")
    if value:
        _host_port(value.split("://", 1)[1].rstrip("/"))
    return value


HostPort = Annotated[str, AfterValidator(_host_port)]
# host:port, or "" for off.
OptionalHostPort = Annotated[str, AfterValidator(_optional_host_port)]
LogLevel = Annotated[str, AfterValidator(_log_level)]


class MetricsSettings(Table):
    # host:port of the Prometheus endpoint (GET /metrics); "" for none, port 0 for any free port.
    listen: OptionalHostPort = ""


class TracingSettings(Table):
    # OTLP/gRPC collector, e.g. "http://127.0.0.1:4317"; "" (the default) turns tracing off.
    otlp_endpoint: Annotated[str, AfterValidator(_otlp_endpoint)] = ""
    # Plaintext to the collector (a local agent); false for TLS.
    insecure: bool = True
    # Share of new traces kept; a call that arrives traced follows its caller's decision.
    sample_ratio: float = Field(default=1.0, ge=0, le=1)
    # service.name on every span of this process.
    service_name: str = Field(default="", max_length=64)

    def tracing(self, default_service: str) -> TracingConfig:
        return TracingConfig(
            otlp_endpoint=self.otlp_endpoint,
            insecure=self.insecure,
            sample_ratio=self.sample_ratio,
            service_name=self.service_name or default_service,
        )


class LoggingSettings(Table):
    level: LogLevel = "INFO"


class FileSettings(BaseSettings):
    """Flags (init arguments) over environment variables over the TOML file over defaults."""

    model_config = SettingsConfigDict(env_nested_delimiter="__", extra="forbid", frozen=True)

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        path = _CONFIG_FILE.get()
        if path is None:
            return (init_settings, env_settings)
        return (init_settings, env_settings, TomlConfigSettingsSource(settings_cls, toml_file=path))


def _dotted(location: tuple[int | str, ...]) -> str:
    return ".".join(str(part) for part in location)


def _reason(error: Mapping[str, Any]) -> str:
    if error["type"] == "extra_forbidden":
        return "unknown key"
    if error["type"] == "missing":
        return "required"
    return str(error["msg"]).removeprefix("Value error, ")


def load(
    settings_cls: type[S],
    config_file: Path | None,
    flags: Mapping[str, Any],
    flag_names: Mapping[str, str],
) -> S:
    """Settings from `config_file` (None: defaults and environment only), the environment, and
    `flags` (nested like the file: {"server": {"listen": ...}}), checked; ConfigError if unusable.

    `flag_names` maps a dotted key to the flag that sets it, so a bad flag is reported as itself."""
    if config_file is not None:
        if not config_file.is_file():
            raise ConfigError([f"{config_file}: no such file"])
        try:
            with config_file.open("rb") as handle:
                tomllib.load(handle)
        except tomllib.TOMLDecodeError as error:
            raise ConfigError([f"{config_file}: not valid TOML ({error})"]) from None
        except OSError as error:
            raise ConfigError([f"{config_file}: cannot be read ({error.strerror})"]) from None
    token = _CONFIG_FILE.set(config_file)
    try:
        return settings_cls(**flags)
    except ValidationError as error:
        prefix = str(settings_cls.model_config.get("env_prefix", ""))
        problems = []
        for problem in error.errors():
            key = _dotted(problem["loc"])
            variable = (prefix + "__".join(str(part) for part in problem["loc"])).upper()
            if _given(flags, problem["loc"]) and key in flag_names:
                source = flag_names[key]
            elif any(name.upper() == variable for name in os.environ):
                source = variable
            else:
                source = f"{config_file or 'defaults'}: {key}"
            problems.append(f"{source}: {_reason(problem)}")
        raise ConfigError(problems) from None
    finally:
        _CONFIG_FILE.reset(token)


def _given(flags: Mapping[str, Any], location: tuple[int | str, ...]) -> bool:
    value: Any = flags
    for part in location:
        if not isinstance(value, Mapping) or part not in value:
            return False
        value = value[part]
    return True


def nested(values: Mapping[str, Any]) -> dict[str, Any]:
    """{"server.listen": x, "metrics.listen": None} -> {"server": {"listen": x}}: flags given only."""
    tree: dict[str, Any] = {}
    for dotted, value in values.items():
        if value is None:
            continue
        *tables, key = dotted.split(".")
        node = tree
        for table in tables:
            node = node.setdefault(table, {})
        node[key] = value
    return tree
