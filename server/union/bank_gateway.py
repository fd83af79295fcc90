"""The union's gRPC client for bankquery.v1: one channel per bank, proto → domain, failures classified.

This adapter is the only union code that sees the bank contract's wire types.
It rejects a stream that does not end with a summary whose count matches
(truncation), records with unknown enum values, and a summary from another
bank; the domain's `check_answer` does the rest.

With mutual TLS, the union presents its own certificate and checks that the
bank's certificate names the bank it called (the expected name is the bank
code's DNS-style name, `<code>.bank.cardlookup.test`), so an answer from any
other peer is refused by the handshake itself.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

import grpc
from bankquery.v1 import bank_query_service_pb2 as pb
from bankquery.v1 import bank_query_service_pb2_grpc as pb_grpc

from server.union.domain.banks import BankCallFailed, BankDecision, ReportedCard
from server.union.domain.model import ActionState, Bank, CardStatus, CardType

# Codes after which another attempt may well succeed.
RETRYABLE = {
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.DEADLINE_EXCEEDED,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.ABORTED,
    grpc.StatusCode.INTERNAL,
    grpc.StatusCode.UNKNOWN,
    grpc.StatusCode.CANCELLED,
}

_CARD_TYPES = {pb.CARD_TYPE_DEBIT: CardType.DEBIT, pb.CARD_TYPE_CREDIT: CardType.CREDIT}
_CLOSURE_OUTCOMES = {
    pb.CLOSURE_OUTCOME_CLOSED: ActionState.CLOSED,
    pb.CLOSURE_OUTCOME_SCHEDULED: ActionState.SCHEDULED,
    pb.CLOSURE_OUTCOME_BRANCH_VISIT_REQUIRED: ActionState.BRANCH_VISIT_REQUIRED,
    pb.CLOSURE_OUTCOME_REJECTED: ActionState.REJECTED,
}
_CARD_STATUSES = {
    pb.CARD_STATUS_ACTIVE: CardStatus.ACTIVE,
    pb.CARD_STATUS_DORMANT: CardStatus.DORMANT,
    pb.CARD_STATUS_FROZEN: CardStatus.FROZEN,
}


def _failure(error: grpc.aio.AioRpcError) -> BankCallFailed:
    code = error.code()
    if code == grpc.StatusCode.NOT_FOUND:
        return BankCallFailed("the bank does not know this card for this person", retryable=False)
    return BankCallFailed(f"bank call failed: {code.name}", retryable=code in RETRYABLE)


def bank_tls_name(bank_code: str) -> str:
    """The name a bank's certificate must carry."""
    return f"{bank_code.lower()}.bank.cardlookup.test"


@dataclass(frozen=True)
class ClientTls:
    root_ca: bytes
    cert_chain: bytes
    private_key: bytes


class GrpcBankGateway:
    def __init__(self, tls: ClientTls | None = None, max_records: int = 500) -> None:
        self._tls = tls
        self._max_records = max_records
        self._channels: dict[tuple[str, str], grpc.aio.Channel] = {}

    def _channel(self, bank: Bank) -> grpc.aio.Channel:
        key = (bank.code, bank.address)
        channel = self._channels.get(key)
        if channel is None:
            options: list[tuple[str, Any]] = [("grpc.max_receive_message_length", 1024 * 1024)]
            if self._tls is None:
                channel = grpc.aio.insecure_channel(bank.address, options=options)
            else:
                credentials = grpc.ssl_channel_credentials(
                    self._tls.root_ca, self._tls.private_key, self._tls.cert_chain
                )
                options.append(("grpc.ssl_target_name_override", bank_tls_name(bank.code)))
                channel = grpc.aio.secure_channel(bank.address, credentials, options=options)
            self._channels[key] = channel
        return channel

    async def query_cards(
        self, bank: Bank, query_id: str, resident_id_number: str, name: str, call_timeout: float
    ) -> list[ReportedCard]:
        if not bank.address:
            raise BankCallFailed("bank has no address configured", retryable=True)
        stub = pb_grpc.BankQueryServiceStub(self._channel(bank))
        request = pb.QueryCardsRequest(query_id=query_id, resident_id_number=resident_id_number, name=name)
        cards: list[ReportedCard] = []
        summary: pb.QuerySummary | None = None
        call = stub.QueryCards(request, timeout=call_timeout)
        try:
            async for message in call:
                if summary is not None:
                    raise BankCallFailed("bank sent records after its summary", retryable=False)
                kind = message.WhichOneof("result")
                if kind == "summary":
                    summary = message.summary
                elif kind == "card":
                    cards.append(self._card(message.card))
                    if len(cards) > self._max_records:
                        raise BankCallFailed("bank sent too many records", retryable=False)
                else:
                    raise BankCallFailed("bank sent an empty message", retryable=False)
        except grpc.aio.AioRpcError as error:
            raise _failure(error) from error
        except TimeoutError as error:
            raise BankCallFailed("bank call timed out", retryable=True) from error
        finally:
            call.cancel()
        if summary is None:
            # The stream ended without its summary: a truncated answer, maybe a dying bank.
            raise BankCallFailed("bank stream ended without a summary (truncated)", retryable=True)
        if summary.bank_code != bank.code:
            raise BankCallFailed("summary came from another bank", retryable=False)
        if summary.record_count != len(cards):
            raise BankCallFailed(
                f"summary counts {summary.record_count} records but {len(cards)} arrived (truncated)",
                retryable=True,
            )
        return cards

    async def close_card(
        self,
        bank: Bank,
        request_id: str,
        bank_card_ref: str,
        resident_id_number: str,
        name: str,
        call_timeout: float,
    ) -> BankDecision:
        stub = pb_grpc.BankQueryServiceStub(self._channel(bank))
        request = pb.CloseCardRequest(
            request_id=request_id, card_ref=bank_card_ref, resident_id_number=resident_id_number, name=name
        )
        try:
            response = await stub.CloseCard(request, timeout=call_timeout)
        except grpc.aio.AioRpcError as error:
            raise _failure(error) from error
        state = _CLOSURE_OUTCOMES.get(response.outcome)
        if state is None or not response.ticket_id:
            raise BankCallFailed("bank sent an unknown closure outcome or no ticket", retryable=False)
        return BankDecision(state, response.ticket_id[:64], response.reason[:255])

    async def report_not_mine(
        self,
        bank: Bank,
        request_id: str,
        bank_card_ref: str,
        resident_id_number: str,
        name: str,
        call_timeout: float,
    ) -> BankDecision:
        stub = pb_grpc.BankQueryServiceStub(self._channel(bank))
        request = pb.ReportCardNotMineRequest(
            request_id=request_id, card_ref=bank_card_ref, resident_id_number=resident_id_number, name=name
        )
        try:
            response = await stub.ReportCardNotMine(request, timeout=call_timeout)
        except grpc.aio.AioRpcError as error:
            raise _failure(error) from error
        if not response.case_number:
            raise BankCallFailed("bank opened no fraud case", retryable=False)
        return BankDecision(ActionState.FROZEN, response.case_number[:64], "")

    @staticmethod
    def _card(card: pb.CardRecord) -> ReportedCard:
        card_type = _CARD_TYPES.get(card.card_type)
        status = _CARD_STATUSES.get(card.status)
        if card_type is None or status is None:
            raise BankCallFailed("bank sent an unknown card type or status", retryable=False)
        return ReportedCard(
            bank_code=card.bank_code,
            bank_card_ref=card.card_ref,
            card_type=card_type,
            first_four=card.first_four,
            last_four=card.last_four,
            number_length=card.number_length,
            status=status,
        )

    async def close(self) -> None:
        channels, self._channels = list(self._channels.values()), {}
        await asyncio.gather(*(channel.close(None) for channel in channels))
