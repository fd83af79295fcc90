"""What a bank decides when the union asks it to act on a card.

`decide_closure` is the bank's closure policy as a pure function of the card
as stored; `close_card` and `report_not_mine` apply a decision through
`BankStore.answer_once`, which checks ownership, records the answer under the
request's idempotency key and changes the card, in one transaction.

Closure policy, first matching rule wins (the card is already known to be the
person's; an unknown card, someone else's, or a name that does not match is
NOT_FOUND before any rule runs):

===========================================  =====================  ===========================
card                                         outcome                what happens to the card
===========================================  =====================  ===========================
status closed                                CLOSED                 nothing ("already closed")
status frozen                                REJECTED               nothing (fraud desk first)
debit, balance > 0                           BRANCH_VISIT_REQUIRED  nothing (withdraw first)
credit, balance > 0                          BRANCH_VISIT_REQUIRED  nothing (repay first)
credit, balance 0 (active or dormant)        SCHEDULED              closes at end of billing
                                                                    cycle; reported until then
debit, balance 0 (active or dormant)         CLOSED                 status becomes closed; no
                                                                    longer reported
===========================================  =====================  ===========================

Reporting a card as not the person's freezes it (status frozen, any scheduled
closure cancelled: the fraud desk takes over) and opens a case. A closed card
stays closed (freezing must not bring it back into QueryCards answers); the
case is opened all the same and the recorded status is "closed".

Full card numbers never appear in a reason, a reference or a log line: reasons
mention amounts only.
"""

from __future__ import annotations

import calendar
import secrets
from datetime import date, datetime
from enum import StrEnum
from zoneinfo import ZoneInfo

from server.bank.store import ActionAnswer, BankStore, CardAction, StoredCard

BANK_TIMEZONE = ZoneInfo("Asia/Shanghai")

REASON_ALREADY_CLOSED = "already closed"
REASON_FROZEN = "the card is frozen; the fraud desk must resolve its case before it can be closed"
REASON_SCHEDULED = "will close at the end of the current billing cycle"
REASON_CLOSED = "closed"


class ClosureOutcome(StrEnum):
    """The bank's decision (bankquery.v1.ClosureOutcome without the prefix), as stored."""

    CLOSED = "closed"
    SCHEDULED = "scheduled"
    BRANCH_VISIT_REQUIRED = "branch_visit_required"
    REJECTED = "rejected"


def format_yuan(cents: int) -> str:
    """Fen as the person reads it: 5200000 -> '¥52,000.00'."""
    sign = "-" if cents < 0 else ""
    whole, fen = divmod(abs(cents), 100)
    return f"{sign}¥{whole:,}.{fen:02d}"


def decide_closure(card: StoredCard) -> tuple[ClosureOutcome, str]:
    """The bank's answer to "close this card", and why (pure; see the module table)."""
    if card.status == "closed":
        return ClosureOutcome.CLOSED, REASON_ALREADY_CLOSED
    if card.status == "frozen":
        return ClosureOutcome.REJECTED, REASON_FROZEN
    if card.balance_cents > 0:
        amount = format_yuan(card.balance_cents)
        if card.card_type == "credit":
            reason = f"an outstanding balance of {amount} must be repaid at a branch first"
        else:
            reason = f"the card still holds {amount}; withdraw or transfer it at a branch first"
        return ClosureOutcome.BRANCH_VISIT_REQUIRED, reason
    if card.card_type == "credit":
        return ClosureOutcome.SCHEDULED, REASON_SCHEDULED
    return ClosureOutcome.CLOSED, REASON_CLOSED


def billing_cycle_end(today: date) -> date:
    """The simulated banks bill by calendar month: the cycle ends on the month's last day."""
    return today.replace(day=calendar.monthrange(today.year, today.month)[1])


def new_ticket_id(bank_code: str) -> str:
    """e.g. T-ICBC-3F09A1C2B7 (10 upper-case hex digits)."""
    return f"T-{bank_code}-{secrets.token_hex(5).upper()}"


def new_case_number(bank_code: str) -> str:
    """e.g. FR-ICBC-04718265 (8 digits)."""
    return f"FR-{bank_code}-{secrets.randbelow(10**8):08d}"


def closure_action(bank_code: str, card: StoredCard, today: date) -> CardAction:
    """The decision for `card` with the change it makes to the card."""
    outcome, reason = decide_closure(card)
    ticket = new_ticket_id(bank_code)
    if outcome is ClosureOutcome.CLOSED and card.status != "closed":
        return CardAction(ticket, outcome.value, reason, new_status="closed", clear_closure_schedule=True)
    if outcome is ClosureOutcome.SCHEDULED:
        return CardAction(ticket, outcome.value, reason, closure_scheduled_on=billing_cycle_end(today))
    return CardAction(ticket, outcome.value, reason)


def not_mine_action(bank_code: str, card: StoredCard) -> CardAction:
    """Freeze the card (a closed one stays closed) and open a fraud case."""
    case = new_case_number(bank_code)
    if card.status == "closed":
        return CardAction(case, "closed", "the card was already closed; a fraud case is open")
    return CardAction(
        case, "frozen", "frozen after a not-mine report", new_status="frozen", clear_closure_schedule=True
    )


def close_card(
    store: BankStore, request_id: str, resident_id_number: str, name: str, card_ref: str
) -> ActionAnswer:
    """CloseCard against the store (blocking; call through asyncio.to_thread)."""
    today = datetime.now(BANK_TIMEZONE).date()
    return store.answer_once(
        "close",
        request_id,
        resident_id_number,
        name,
        card_ref,
        lambda card: closure_action(store.bank_code, card, today),
    )


def report_not_mine(
    store: BankStore, request_id: str, resident_id_number: str, name: str, card_ref: str
) -> ActionAnswer:
    """ReportCardNotMine against the store (blocking; call through asyncio.to_thread)."""
    return store.answer_once(
        "not_mine",
        request_id,
        resident_id_number,
        name,
        card_ref,
        lambda card: not_mine_action(store.bank_code, card),
    )
