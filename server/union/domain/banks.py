"""The union's view of a bank call, independent of the wire: what it returns and how it fails.

The gRPC adapter (`server.union.bank_gateway`) turns the bankquery.v1 stream
into `ReportedCard`s or a `BankCallFailed`; `check_answer` then refuses answers
that lie (another bank's records, more digits than a masked card may carry).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Protocol

from server.union.domain.model import ActionState, Bank, CardStatus, CardType

MAX_CARDS_PER_BANK = 500


@dataclass(frozen=True)
class ReportedCard:
    bank_code: str
    bank_card_ref: str
    card_type: CardType
    first_four: str
    last_four: str
    number_length: int
    status: CardStatus
    open_time: datetime | None = None  # when the bank opened it, if the bank says


@dataclass(frozen=True)
class BankDecision:
    """A bank's answer to a card action."""

    state: ActionState
    ticket: str
    reason: str


class BankCallFailed(Exception):
    """One attempt at one bank failed. `retryable` says whether another attempt may succeed;
    `truncated`, that the bank answered but its answer was cut short (retried a bounded number
    of times, then the bank is FAILED: see OrchestratorPolicy.truncated_answer_attempts)."""

    def __init__(self, reason: str, retryable: bool, truncated: bool = False) -> None:
        super().__init__(reason)
        self.reason = reason
        self.retryable = retryable
        self.truncated = truncated


class BankGateway(Protocol):
    async def query_cards(
        self, bank: Bank, query_id: str, resident_id_number: str, name: str, call_timeout: float
    ) -> list[ReportedCard]:
        """All the person's cards at `bank`, or BankCallFailed."""
        ...

    async def close_card(
        self,
        bank: Bank,
        request_id: str,
        bank_card_ref: str,
        resident_id_number: str,
        name: str,
        call_timeout: float,
    ) -> BankDecision:
        """The bank's decision on closing one card (state CLOSED/SCHEDULED/BRANCH_VISIT_REQUIRED/REJECTED)."""
        ...

    async def report_not_mine(
        self,
        bank: Bank,
        request_id: str,
        bank_card_ref: str,
        resident_id_number: str,
        name: str,
        call_timeout: float,
    ) -> BankDecision:
        """The fraud desk's answer: state FROZEN and the case number as ticket."""
        ...

    async def reachable(self, bank: Bank, call_timeout: float) -> bool:
        """Whether the bank's server answers its health check as SERVING within `call_timeout` seconds."""
        ...

    async def close(self) -> None: ...


def check_answer(bank: Bank, cards: Sequence[ReportedCard]) -> None:
    """Refuse an answer that cannot be true; a lying bank is a per-bank failure, never a bad report."""
    if len(cards) > MAX_CARDS_PER_BANK:
        raise BankCallFailed(f"bank sent {len(cards)} cards, more than {MAX_CARDS_PER_BANK}", retryable=False)
    seen: set[str] = set()
    for card in cards:
        if card.bank_code != bank.code:
            raise BankCallFailed("bank sent a record of another bank", retryable=False)
        if not (len(card.first_four) == 4 and card.first_four.isdigit()):
            raise BankCallFailed("bank sent a malformed first-four", retryable=False)
        if not (len(card.last_four) == 4 and card.last_four.isdigit()):
            raise BankCallFailed("bank sent a malformed last-four", retryable=False)
        if not 16 <= card.number_length <= 19:
            raise BankCallFailed("bank sent an impossible card number length", retryable=False)
        if not card.bank_card_ref or len(card.bank_card_ref) > 128:
            raise BankCallFailed("bank sent a malformed card reference", retryable=False)
        if card.bank_card_ref in seen:
            raise BankCallFailed("bank sent the same card twice", retryable=False)
        seen.add(card.bank_card_ref)
