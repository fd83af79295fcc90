"""The union falls back to QuerySession for a bank without batches even when grpc.aio says INTERNAL.

A bank built without QueryBatchSession (grpc's own "Method not found!") refuses the stream as it
opens, before the union's first write. When that write comes after the refusal reached the
transport but before the union's event loop saw it, grpc.aio fails the write and reports INTERNAL
in place of UNIMPLEMENTED (grpc/grpc#36066); the union, which falls back only on UNIMPLEMENTED,
retried the bank as failing, on a new batched stream, with the same chance of the same race.
Here the interleaving is forced: the older bank runs on grpc's own threads, and the union's first
write on its stream waits (blocking its loop) until the refusal has had time to arrive.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Iterator
from concurrent import futures
from typing import Any

import grpc
import pytest
from bankquery.v1 import bank_query_service_pb2 as pb
from bankquery.v1 import bank_query_service_pb2_grpc as pb_grpc
from cardlookup.v1 import card_lookup_service_pb2 as lookup_pb

from server.bank.bank_server import RunningBank
from server.union import bank_gateway
from server.union.bank_gateway import GrpcBankGateway
from server.union.union_server import UnionServer
from tests.conftest import ZHANG, UnionFactory, run_lookup, verified_client

# Long enough for the older bank (on its own threads) to refuse and its status to reach the union's
# transport; it only gives the race its chance: the union must fall back however long it is.
REFUSAL_PAUSE = 0.2


def older_bank_session(
    requests: Iterator[pb.QuerySessionRequest], context: Any
) -> Iterator[pb.QuerySessionResponse]:
    """QuerySession of a bank that holds no cards for anyone (enough to tell how it was asked)."""
    for request in requests:
        summary = pb.QuerySummary(bank_code="ICBC", record_count=0)
        yield pb.QuerySessionResponse(query_id=request.query_id, answer=pb.QueryAnswer(summary=summary))


@pytest.fixture
def older_bank() -> Iterator[str]:
    """An ICBC with QuerySession but no QueryBatchSession at all, on grpc's sync server."""
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    handlers = {
        "QuerySession": grpc.stream_stream_rpc_method_handler(
            older_bank_session, pb.QuerySessionRequest.FromString, pb.QuerySessionResponse.SerializeToString
        )
    }
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler("bankquery.v1.BankQueryService", handlers),)
    )
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield f"127.0.0.1:{port}"
    server.stop(0)


def racing_stubs(channel_of_older_bank: grpc.aio.Channel) -> type:
    real_stub = pb_grpc.BankQueryServiceStub

    class RacingStub:
        """The union's stub, except that its first write on a QueryBatchSession to the older bank
        waits until the bank's refusal has reached the transport, and the loop has not seen it."""

        def __init__(self, channel: grpc.aio.Channel) -> None:
            self._real = real_stub(channel)
            self._forced = channel is channel_of_older_bank

        def __getattr__(self, name: str) -> Any:
            return getattr(self._real, name)

        def QueryBatchSession(self, request_iterator: Any = None, **kwargs: Any) -> Any:
            if request_iterator is None or not self._forced:
                return self._real.QueryBatchSession(request_iterator, **kwargs)
            opened: list[Any] = []

            async def late() -> AsyncIterator[Any]:
                await opened[0].wait_for_connection()
                time.sleep(REFUSAL_PAUSE)  # noqa: ASYNC251 - on purpose: the loop must not see the status
                async for message in request_iterator:
                    yield message

            call = self._real.QueryBatchSession(late(), **kwargs)
            opened.append(call)
            return call

    return RacingStub


async def test_a_bank_without_batches_is_asked_over_query_session_when_grpc_says_internal(
    make_union: UnionFactory,
    banks: dict[str, RunningBank],
    older_bank: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    addresses = {code: bank.address for code, bank in banks.items()} | {"ICBC": older_bank}
    union: UnionServer = await make_union(bank_addresses=addresses)
    gateway = union.gateway
    assert isinstance(gateway, GrpcBankGateway)
    icbc = next(bank for bank in await union.store.list_banks() if bank.code == "ICBC")
    monkeypatch.setattr(bank_gateway.pb_grpc, "BankQueryServiceStub", racing_stubs(gateway._channel(icbc)))
    client = await verified_client(union, ZHANG)
    async with client:
        events, report = await run_lookup(client)
    outcomes = {s.bank_code: s.outcome for s in report.bank_summaries}
    assert set(outcomes.values()) == {lookup_pb.BANK_OUTCOME_ANSWERED}
    icbc_progress = next(b for b in events[-1].lookup.bank_progress if b.bank_code == "ICBC")
    # Answered on the first attempt: the refusal was read as a refusal, not as a failing bank.
    assert icbc_progress.attempt_count == 1
    assert icbc_progress.failure_reason == ""
    assert gateway.uses_session(icbc)
    assert not gateway.uses_batches(icbc)
