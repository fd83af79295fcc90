"""A bank without a session RPC refuses it with UNIMPLEMENTED, whenever the caller's first write lands.

The union falls back (QueryBatchSession → QuerySession → QueryCards) only on UNIMPLEMENTED. If the
stream ends before the caller's first write is made, grpc.aio's client fails that write and
reports INTERNAL ("Internal error from Core") in place of the bank's status (grpc/grpc#36066), and
the bank was counted as failing: test_a_bank_without_batches_still_has_query_session saw it once
under load. Here that interleaving is forced rather than waited for: the test lets the bank run
its handler, then blocks its own event loop (the bank's answer reaches the client's transport but
not its Python code) and only then writes; a bank that refused before reading would be read as
INTERNAL here, every time.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import grpc
import pytest
from bankquery.v1 import bank_query_service_pb2 as pb
from bankquery.v1 import bank_query_service_pb2_grpc as pb_grpc

from server.bank.bank_server import RunningBank
from server.bank.faults import FaultSettings
from tests.bank.test_query_session import ZHANG, of

# A few turns of the shared event loop let the bank run its handler, and a blocking pause lets its
# answer cross the loopback transport while this client cannot process it. (These only give a
# premature refusal its chance: with more turns the client sees the status before it writes,
# and its write fails "RPC already finished" instead; a bank that reads first passes either way.)
HANDLER_TURNS = 5
TRANSPORT_PAUSE = 0.1


async def first_write_after_the_bank_had_its_chance(
    call: grpc.aio.StreamStreamCall[Any, Any], message: Any
) -> None:
    await call.wait_for_connection()
    for _ in range(HANDLER_TURNS):
        await asyncio.sleep(0)
    time.sleep(TRANSPORT_PAUSE)  # noqa: ASYNC251 - blocking on purpose: the client must not see the status yet
    await call.write(message)


async def status_of(call: grpc.aio.StreamStreamCall[Any, Any]) -> tuple[list[Any], grpc.StatusCode]:
    received: list[Any] = []
    try:
        async for message in call:
            received.append(message)
    except grpc.aio.AioRpcError as error:
        return received, error.code()
    return received, await call.code()


@pytest.mark.parametrize(
    ("faults", "method"),
    [
        (["query_batches=0"], "QueryBatchSession"),
        (["query_session=0"], "QueryBatchSession"),
        (["query_session=0"], "QuerySession"),
    ],
)
async def test_a_refused_session_reads_unimplemented_however_late_the_first_write(
    bank: RunningBank, stub: pb_grpc.BankQueryServiceAsyncStub, faults: list[str], method: str
) -> None:
    bank.servicer.faults = FaultSettings.parse(faults)
    query = of(ZHANG, "q")
    message = pb.QueryBatchSessionRequest(queries=[query]) if method == "QueryBatchSession" else query
    for _ in range(5):
        call = getattr(stub, method)(timeout=30)
        await first_write_after_the_bank_had_its_chance(call, message)
        assert await status_of(call) == ([], grpc.StatusCode.UNIMPLEMENTED)


async def test_a_caller_that_half_closes_at_once_reads_unimplemented(
    bank: RunningBank, stub: pb_grpc.BankQueryServiceAsyncStub
) -> None:
    """How the union asks a bank whether it has a session at all: nothing written, its side closed."""
    bank.servicer.faults = FaultSettings.parse(["query_batches=0"])
    call = stub.QueryBatchSession(timeout=30)
    await call.done_writing()
    assert await status_of(call) == ([], grpc.StatusCode.UNIMPLEMENTED)
    # A bank that has batches ends such a stream OK, with nothing to answer.
    bank.servicer.faults = FaultSettings()
    call = stub.QueryBatchSession(timeout=30)
    await call.done_writing()
    assert await status_of(call) == ([], grpc.StatusCode.OK)
