"""Fault knobs for a simulated bank, applied as real wire behaviour.

Real banks are slow, flaky, go down, cut streams short and occasionally send
nonsense; the union must survive all of it (design invariants 4 and 5). These
settings make a simulated bank do exactly that on the wire, so the union's
tests and demos exercise its real client code, not mocks.

Settings are immutable; change them at run time by assigning a new
`FaultSettings` to `BankQueryServicer.faults` (each call, and each query on a
QuerySession stream, reads it once).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import random
from collections.abc import Callable, Iterable
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Literal, get_args

import grpc
from bankquery.v1 import bank_query_service_pb2 as pb

from server.bank.store import StoredCard
from server.population.catalogue import BANKS

log = logging.getLogger(__name__)

DieMode = Literal["abort", "end"]
Truncate = Literal["none", "omit_summary", "wrong_count"]
Lie = Literal["none", "wrong_bank", "long_last_four", "unknown_enum", "impossible_open_time"]

# A value no CardType/CardStatus has; proto3 enums are open, so it goes on the wire as-is.
UNKNOWN_ENUM_VALUE = 99

_BOOLEAN_KNOBS = ("outage", "query_session", "query_batches")
_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off")


def _parse_bool(key: str, raw: str) -> bool:
    """Strict, so a typo (`query_session=flase`) is an error instead of silently meaning False."""
    if raw.lower() in _TRUE:
        return True
    if raw.lower() in _FALSE:
        return False
    raise ValueError(f"{key} must be one of {', '.join(_TRUE + _FALSE)}")


@dataclass(frozen=True)
class FaultSettings:
    """How this bank misbehaves. The defaults are a healthy bank."""

    latency_ms: int = 0  # fixed delay before the first message
    latency_jitter_ms: int = 0  # plus uniform 0..jitter
    tail_rate: float = 0.0  # probability of an extra tail delay
    tail_latency_ms: int = 0
    error_rate: float = 0.0  # probability a call fails with error_code before any record
    error_code: grpc.StatusCode = grpc.StatusCode.UNAVAILABLE
    outage: bool = False  # every call answers UNAVAILABLE
    record_delay_ms: int = 0  # pause before each record (a slow stream)
    die_after_records: int | None = None  # stop the stream after this many records...
    die_mode: DieMode = "abort"  # ...with UNAVAILABLE ("abort") or a clean end without summary ("end")
    truncate: Truncate = "none"  # omit the summary, or send a wrong record_count
    lie: Lie = "none"  # wrong bank code, 5-digit last_four, or unknown enum values
    # False: an older bank that only has QueryCards; QuerySession and QueryBatchSession answer
    # UNIMPLEMENTED.
    query_session: bool = True
    # False: a bank with QuerySession but without QueryBatchSession (UNIMPLEMENTED).
    query_batches: bool = True

    def __post_init__(self) -> None:
        for name in ("latency_ms", "latency_jitter_ms", "tail_latency_ms", "record_delay_ms"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must not be negative")
        for name in ("error_rate", "tail_rate"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be between 0 and 1")
        if self.die_after_records is not None and self.die_after_records < 0:
            raise ValueError("die_after_records must not be negative")
        if self.error_code == grpc.StatusCode.OK:
            raise ValueError("error_code must be an error")
        for name, allowed in (("die_mode", DieMode), ("truncate", Truncate), ("lie", Lie)):
            if getattr(self, name) not in get_args(allowed):
                raise ValueError(f"{name} must be one of {get_args(allowed)}")

    def start_delay(self, rng: random.Random) -> float:
        """Seconds to wait before answering."""
        delay_ms = float(self.latency_ms)
        if self.latency_jitter_ms:
            delay_ms += rng.uniform(0, self.latency_jitter_ms)
        if self.tail_rate and rng.random() < self.tail_rate:
            delay_ms += self.tail_latency_ms
        return delay_ms / 1000

    def fails(self, rng: random.Random) -> bool:
        return self.error_rate > 0 and rng.random() < self.error_rate

    @classmethod
    def parse(cls, specs: Iterable[str]) -> FaultSettings:
        """Settings from `key=value` strings (the CLI's --fault option), e.g. `latency_ms=250`."""
        known = {field.name for field in fields(cls)}
        values: dict[str, Any] = {}
        for spec in specs:
            key, sep, raw = spec.partition("=")
            key, raw = key.strip(), raw.strip()
            if not sep or key not in known:
                raise ValueError(f"unknown fault {spec!r}; known: {', '.join(sorted(known))}")
            value: object
            if key == "error_code":
                try:
                    value = grpc.StatusCode[raw.upper()]
                except KeyError:
                    raise ValueError(f"unknown status code {raw!r}") from None
            elif key in _BOOLEAN_KNOBS:
                value = _parse_bool(key, raw)
            elif key == "die_after_records":
                value = None if raw.lower() in ("", "none") else int(raw)
            elif key in ("error_rate", "tail_rate"):
                value = float(raw)
            elif key in ("die_mode", "truncate", "lie"):
                value = raw
            else:
                value = int(raw)
            values[key] = value
        # __post_init__ checks ranges and the Literal choices.
        return cls(**values)


def other_bank_code(bank_code: str) -> str:
    """A real bank code that is not this bank's (for the wrong-bank lie)."""
    codes = [bank.code for bank in BANKS]
    position = codes.index(bank_code) if bank_code in codes else -1
    return codes[(position + 1) % len(codes)]


def lie_about(record: pb.CardRecord, card: StoredCard, lie: Lie) -> None:
    """Corrupt one already-masked record the way a buggy bank would."""
    if lie == "wrong_bank":
        record.bank_code = other_bank_code(record.bank_code)
    elif lie == "long_last_four":
        record.last_four = card.number[-5:]
    elif lie == "unknown_enum":
        record.card_type = pb.CardType.ValueType(UNKNOWN_ENUM_VALUE)
        record.status = pb.CardStatus.ValueType(UNKNOWN_ENUM_VALUE)
    elif lie == "impossible_open_time":
        record.open_time.seconds = 2**40  # tens of thousands of years from now: no real date


# --- run-time control through a file ------------------------------------------------------
#
# A bank running in its own process is reconfigured by writing its control file
# (`cardlookup-bank faults --bank ICBC --set latency_ms=300`); the server notices the
# change within a poll interval. A file, rather than an RPC, keeps the fault surface
# off the wire the union talks to.


def control_file(data_dir: Path, bank_code: str) -> Path:
    """Where a bank's run-time fault settings live: <data_dir>/faults/<code>.json."""
    return data_dir / "faults" / f"{bank_code.lower()}.json"


def write_control_file(path: Path, specs: Iterable[str]) -> FaultSettings:
    """Validate `key=value` specs and write them for the running bank to pick up (atomically)."""
    specs = list(specs)
    settings = FaultSettings.parse(specs)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_suffix(".tmp")
    temporary.write_text(json.dumps({"faults": specs}))
    os.replace(temporary, path)
    return settings


class FaultControl:
    """Polls a bank's control file and applies it to the servicer; a deleted file restores the
    settings the bank started with."""

    def __init__(self, path: Path, apply: Callable[[FaultSettings], None], initial: FaultSettings) -> None:
        self.path = path
        self._apply = apply
        self._initial = initial
        self._seen: float | None = None
        self._task: asyncio.Task[None] | None = None

    def check(self) -> None:
        """Apply the file if it changed since the last check."""
        try:
            mtime: float | None = self.path.stat().st_mtime_ns
        except FileNotFoundError:
            mtime = None
        if mtime == self._seen:
            return
        self._seen = mtime
        if mtime is None:
            self._apply(self._initial)
            return
        try:
            specs = json.loads(self.path.read_text())["faults"]
            self._apply(FaultSettings.parse(specs))
            log.info("fault settings changed", extra={"file": str(self.path), "faults": specs})
        except (OSError, ValueError, KeyError, TypeError) as error:
            log.warning(
                "ignoring a bad fault control file", extra={"file": str(self.path), "error": str(error)}
            )

    def start(self, interval: float = 0.25) -> None:
        async def poll() -> None:
            while True:
                self.check()
                await asyncio.sleep(interval)

        self._task = asyncio.create_task(poll(), name=f"fault-control-{self.path.stem}")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
