"""Fixtures for the fuzz suite: the union and all 16 banks, started ONCE per module.

The servers run on their own asyncio loop in a background thread, so that
hypothesis can drive thousands of plain synchronous gRPC calls (grpc.insecure_channel)
from ordinary `@given` tests without starting servers per example. Everything the
servers log at ERROR or above (for instance "unhandled error in ...") is captured, so a
failing property can show the server-side traceback next to the request that caused it.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import threading
from collections.abc import Coroutine, Iterator
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any, TypeVar

import grpc
import pytest
from cardlookup.v1 import identity_service_pb2 as identity_pb
from cardlookup.v1 import identity_service_pb2_grpc as identity_grpc

from server.bank.bank_server import RunningBank, start_all_banks
from server.population.generator import Person
from server.union.domain.card_actions import CardActionPolicy
from server.union.domain.identity import IdentityPolicy
from server.union.sms import read_one_time_code
from server.union.union_server import UnionConfig, UnionServer
from tests.conftest import SEED, SIZE, fast_policies

T = TypeVar("T")

ADMIN_TOKEN = "test-admin-token"
EXAMPLES_ENV = "CARDLOOKUP_FUZZ_EXAMPLES"
DEFAULT_TOTAL = 10_000
SUMMARY: list[str] = []  # lines for the terminal summary (request counts and run time)


def pytest_terminal_summary(terminalreporter: Any) -> None:
    for line in SUMMARY:
        terminalreporter.write_line(line)


def fuzz_scale() -> float:
    """CARDLOOKUP_FUZZ_EXAMPLES: a multiplier ("5", "2.5x") or, when >= 1000, a total request count."""
    raw = os.environ.get(EXAMPLES_ENV, "").strip().lower().rstrip("x")
    if not raw:
        return 1.0
    value = float(raw)
    if value <= 0:
        raise ValueError(f"{EXAMPLES_ENV} must be positive")
    return value / DEFAULT_TOTAL if value >= 1000 else value


def target_total() -> int:
    return int(DEFAULT_TOTAL * fuzz_scale())


class ErrorLogCapture(logging.Handler):
    """Keeps every ERROR+ record emitted anywhere in the process (server threads included)."""

    def __init__(self) -> None:
        super().__init__(level=logging.ERROR)
        self.records: list[logging.LogRecord] = []
        self._lock_records = threading.Lock()

    def emit(self, record: logging.LogRecord) -> None:
        with self._lock_records:
            self.records.append(record)

    def since(self, mark: int) -> list[logging.LogRecord]:
        with self._lock_records:
            return list(self.records[mark:])

    def mark(self) -> int:
        with self._lock_records:
            return len(self.records)

    def render(self, records: list[logging.LogRecord]) -> str:
        formatter = logging.Formatter("%(name)s %(levelname)s %(message)s")
        return "\n".join(formatter.format(r) for r in records)


@dataclass
class FuzzStack:
    """Servers running in a background loop, plus what the fuzz tests need to talk to them."""

    loop: asyncio.AbstractEventLoop
    union: UnionServer
    banks: dict[str, RunningBank]
    errors: ErrorLogCapture
    sessions: dict[str, str] = field(default_factory=dict)  # person name -> session token
    resources: dict[str, str] = field(default_factory=dict)  # "lookup"/"report" -> real names
    counts: dict[str, int] = field(default_factory=dict)  # test name -> requests sent

    def run(self, coroutine: Coroutine[Any, Any, T], timeout: float = 120) -> T:
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout)

    @property
    def address(self) -> str:
        return self.union.address

    def verify(self, channel: grpc.Channel, person: Person) -> str:
        """A real session token for `person`, through the real SMS outbox."""
        stub = identity_grpc.IdentityServiceStub(channel)
        started = stub.StartVerification(
            identity_pb.StartVerificationRequest(
                name=person.name,
                resident_id_number=person.resident_id_number,
                mobile_number=person.mobile_number,
            ),
            timeout=10,
        )
        code = read_one_time_code(self.union.config.sms_sink_path, person.mobile_number)
        assert code is not None
        done = stub.CompleteVerification(
            identity_pb.CompleteVerificationRequest(verification_id=started.verification_id, code=code),
            timeout=10,
        )
        return done.session_token


def _loop_thread() -> tuple[asyncio.AbstractEventLoop, threading.Thread]:
    loop = asyncio.new_event_loop()
    ready = threading.Event()

    def run() -> None:
        asyncio.set_event_loop(loop)
        loop.call_soon(ready.set)
        loop.run_forever()

    thread = threading.Thread(target=run, name="fuzz-servers", daemon=True)
    thread.start()
    ready.wait(10)
    return loop, thread


@pytest.fixture(scope="module")
def fuzz_stack(seeded_banks_template: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[FuzzStack]:
    root = tmp_path_factory.mktemp("fuzz")
    banks_dir = root / "banks"
    shutil.copytree(seeded_banks_template, banks_dir)
    capture = ErrorLogCapture()
    logging.getLogger().addHandler(capture)
    loop, thread = _loop_thread()

    async def start() -> tuple[UnionServer, list[RunningBank]]:
        running = await start_all_banks(data_dir=banks_dir, seed=SEED, size=SIZE, base_port=0)
        config = UnionConfig(
            listen="127.0.0.1:0",
            data_dir=root / "union",
            database_url=f"sqlite:///{root / 'union' / 'union.db'}",
            bank_addresses={bank.bank_code: bank.address for bank in running},
            population_seed=SEED,
            population_size=SIZE,
            admin_token=ADMIN_TOKEN,
            # CreateCardClosure / FlagCardNotMine wait this long for the banks (3 s by default). The
            # per-person closure limit has its own exact test (test_card_actions.py); here it would
            # only hide the contract behind RESOURCE_EXHAUSTED after a few examples.
            card_actions=CardActionPolicy(
                answer_wait=timedelta(milliseconds=200), max_closures_per_window=1_000_000
            ),
            # The setup's sessions must outlive a CARDLOOKUP_FUZZ_EXAMPLES=100 run (30 minutes by default).
            **{**fast_policies(), "identity": IdentityPolicy(session_ttl=timedelta(days=1))},
        )
        union = UnionServer(config)
        await union.start()
        return union, running

    union, running = asyncio.run_coroutine_threadsafe(start(), loop).result(120)
    stack = FuzzStack(loop, union, {bank.bank_code: bank for bank in running}, capture)
    try:
        yield stack
    finally:

        async def stop() -> None:
            await union.stop(0)
            for bank in running:
                await bank.stop(0)
            await loop.shutdown_asyncgens()
            await loop.shutdown_default_executor()

        try:
            asyncio.run_coroutine_threadsafe(stop(), loop).result(60)
        finally:
            loop.call_soon_threadsafe(loop.stop)
            thread.join(10)
            loop.close()
            logging.getLogger().removeHandler(capture)
