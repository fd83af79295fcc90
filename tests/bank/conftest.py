"""Fixtures of the session-stream tests: one seeded bank (ICBC) on a loopback port, and a stub for it.

(test_bank_server.py has its own `bank`, over an unseeded store; `stub` then talks to that one.)
"""

from __future__ import annotations

import shutil
import threading
from collections.abc import AsyncIterator, Iterator, Sequence
from pathlib import Path

import grpc
import pytest
from bankquery.v1 import bank_query_service_pb2_grpc as pb_grpc

from server.bank.bank_server import RunningBank, start_bank
from server.bank.store import StoredCard

SEED = 20211201
SIZE = 300  # the population of tests/conftest.py's seeded_banks_template


@pytest.fixture
def bank_dir(seeded_banks_template: Path, tmp_path: Path) -> Path:
    """ICBC's store from the session's seeded ones (a copy, so writes stay in this test)."""
    for path in seeded_banks_template.glob("icbc.sqlite3*"):
        shutil.copy(path, tmp_path / path.name)
    return tmp_path


@pytest.fixture
async def bank(bank_dir: Path) -> AsyncIterator[RunningBank]:
    running = await start_bank("ICBC", data_dir=bank_dir, seed=SEED, size=SIZE)
    yield running
    await running.stop(0)


@pytest.fixture
async def stub(bank: RunningBank) -> AsyncIterator[pb_grpc.BankQueryServiceAsyncStub]:
    async with grpc.aio.insecure_channel(bank.address) as channel:
        yield pb_grpc.BankQueryServiceStub(channel)


@pytest.fixture
def held_reads(bank: RunningBank, monkeypatch: pytest.MonkeyPatch) -> Iterator[threading.Event]:
    """The bank's card reads, all in a worker thread, wait until the test sets the event (so its
    queries stay unanswered for as long as the test needs); set at the end in any case."""
    bank.servicer.inline_read_limit = 0  # every read in a worker thread, where it can be held
    released = threading.Event()
    real = bank.store.find_cards_many

    def held_until_released(asked: Sequence[tuple[str, str]]) -> list[list[StoredCard]]:
        released.wait(timeout=30)
        return real(asked)

    monkeypatch.setattr(bank.store, "find_cards_many", held_until_released)
    yield released
    released.set()
