"""bankquery.v1.BankQueryService for one simulated bank.

The servicer validates the union's request, reads the bank's own store off the
event loop, masks every card at the source and streams the records followed by
a summary. Fault settings (server.bank.faults) bend that behaviour on purpose.

CloseCard and ReportCardNotMine (unary) go through the same fault gate as
QueryCards (outage, latency, injected errors; the stream-only knobs do not
apply), then let server.bank.actions decide. Both are idempotent on request_id.
"""

from __future__ import annotations

import asyncio
import logging
import random
import re
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc
from bankquery.v1 import bank_query_service_pb2 as pb
from bankquery.v1 import bank_query_service_pb2_grpc as pb_grpc

from server.bank import actions
from server.bank.faults import FaultSettings, lie_about, other_bank_code
from server.bank.masking import to_card_record
from server.bank.store import ActionAnswer, ActionKind, BankStore, CardNotFound, RequestConflict
from server.common import errors
from server.common.checks import is_valid_resident_id
from server.common.grpc_errors import grpc_method

log = logging.getLogger(__name__)

SERVICE_NAME = "bankquery.v1.BankQueryService"
_QUERY_ID = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
_MAX_NAME_LENGTH = 64
_MAX_CARD_REF_LENGTH = 128

CardActionRequest = pb.CloseCardRequest | pb.ReportCardNotMineRequest

_CLOSURE_OUTCOMES: dict[str, pb.ClosureOutcome.ValueType] = {
    actions.ClosureOutcome.CLOSED: pb.CLOSURE_OUTCOME_CLOSED,
    actions.ClosureOutcome.SCHEDULED: pb.CLOSURE_OUTCOME_SCHEDULED,
    actions.ClosureOutcome.BRANCH_VISIT_REQUIRED: pb.CLOSURE_OUTCOME_BRANCH_VISIT_REQUIRED,
    actions.ClosureOutcome.REJECTED: pb.CLOSURE_OUTCOME_REJECTED,
}


def _person_violations(resident_id_number: str, name: str) -> list[errors.FieldViolation]:
    violations: list[errors.FieldViolation] = []
    if not is_valid_resident_id(resident_id_number):
        violations.append(
            errors.FieldViolation(
                "resident_id_number", "must be an 18-character GB 11643 number with a valid check character"
            )
        )
    if not name.strip() or len(name) > _MAX_NAME_LENGTH or not name.isprintable():
        violations.append(errors.FieldViolation("name", "must be 1-64 printable characters, not blank"))
    return violations


def validate_request(request: pb.QueryCardsRequest) -> None:
    """Raise InvalidArgument naming every bad field (never echoing the values: they are PII)."""
    violations: list[errors.FieldViolation] = []
    if not _QUERY_ID.fullmatch(request.query_id):
        violations.append(errors.FieldViolation("query_id", "must be 1-64 characters of [A-Za-z0-9_-]"))
    violations += _person_violations(request.resident_id_number, request.name)
    if violations:
        raise errors.InvalidArgument(violations)


def validate_action_request(request: CardActionRequest) -> None:
    """CloseCard / ReportCardNotMine: the same person checks as QueryCards, plus request_id and card_ref."""
    violations: list[errors.FieldViolation] = []
    if not _QUERY_ID.fullmatch(request.request_id):
        violations.append(errors.FieldViolation("request_id", "must be 1-64 characters of [A-Za-z0-9_-]"))
    card_ref = request.card_ref
    if not card_ref or len(card_ref) > _MAX_CARD_REF_LENGTH or not card_ref.isprintable():
        violations.append(errors.FieldViolation("card_ref", "must be 1-128 printable characters"))
    violations += _person_violations(request.resident_id_number, request.name)
    if violations:
        raise errors.InvalidArgument(violations)


def _dies_now(faults: FaultSettings, sent: int) -> bool:
    """The stream breaks once `die_after_records` messages are out, before the next one (or the summary)."""
    return faults.die_after_records is not None and sent >= faults.die_after_records


class BankQueryServicer(pb_grpc.BankQueryServiceServicer):
    """One bank's answer to the union. `faults` may be replaced at any time."""

    def __init__(self, bank_code: str, store: BankStore, faults: FaultSettings | None = None) -> None:
        self.bank_code = bank_code
        self.store = store
        self.faults = faults or FaultSettings()
        # Fault decisions only; nothing security-relevant is drawn from it.
        self._rng = random.Random()  # noqa: S311

    async def _fault_gate(
        self, faults: FaultSettings, context: grpc.aio.ServicerContext[Any, Any], validate: Callable[[], None]
    ) -> None:
        """Outage, validation, latency and injected errors, in that order, for every RPC."""
        if faults.outage:
            raise errors.Unavailable(f"{self.bank_code} is unavailable")
        validate()
        delay = faults.start_delay(self._rng)
        if delay:
            await asyncio.sleep(delay)
        if faults.fails(self._rng):
            await context.abort(faults.error_code, f"{self.bank_code}: injected failure")

    @grpc_method
    async def QueryCards(
        self,
        request: pb.QueryCardsRequest,
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> AsyncIterator[pb.QueryCardsResponse]:
        faults = self.faults  # one snapshot per call, so a run-time change never mixes settings
        await self._fault_gate(faults, context, lambda: validate_request(request))

        cards = await asyncio.to_thread(self.store.find_cards, request.resident_id_number, request.name)
        sent = 0
        for card in cards:
            if _dies_now(faults, sent):
                await self._die(faults, context)
                return
            if faults.record_delay_ms:
                await asyncio.sleep(faults.record_delay_ms / 1000)
            record = to_card_record(self.bank_code, card)
            if faults.lie != "none":
                lie_about(record, card, faults.lie)
            yield pb.QueryCardsResponse(card=record)
            sent += 1
        if _dies_now(faults, sent):
            await self._die(faults, context)
            return
        if faults.truncate == "omit_summary":
            return
        count = sent + 1 if faults.truncate == "wrong_count" else sent
        summary_bank = other_bank_code(self.bank_code) if faults.lie == "wrong_bank" else self.bank_code
        log.info(
            "answered query", extra={"query_id": request.query_id, "bank": self.bank_code, "records": sent}
        )
        yield pb.QueryCardsResponse(summary=pb.QuerySummary(bank_code=summary_bank, record_count=count))

    async def _die(self, faults: FaultSettings, context: grpc.aio.ServicerContext[Any, Any]) -> None:
        if faults.die_mode == "abort":
            await context.abort(grpc.StatusCode.UNAVAILABLE, f"{self.bank_code}: connection lost")

    async def _act(
        self,
        kind: ActionKind,
        request: CardActionRequest,
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> ActionAnswer:
        await self._fault_gate(self.faults, context, lambda: validate_action_request(request))
        act = actions.close_card if kind == "close" else actions.report_not_mine
        try:
            answer = await asyncio.to_thread(
                act,
                self.store,
                request.request_id,
                request.resident_id_number,
                request.name,
                request.card_ref,
            )
        except RequestConflict:
            raise errors.InvalidArgument(
                [errors.FieldViolation("request_id", "already used for a different card or request")]
            ) from None
        except CardNotFound:
            raise errors.NotFound("no such card") from None
        log.info(
            "answered card action",
            extra={
                "request_id": request.request_id,
                "bank": self.bank_code,
                "kind": kind,
                "outcome": answer.outcome,
                "replayed": answer.replayed,
            },
        )
        return answer

    @grpc_method
    async def CloseCard(
        self,
        request: pb.CloseCardRequest,
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> pb.CloseCardResponse:
        """The bank's decision (server.bank.actions.decide_closure); a retry gets the first answer."""
        answer = await self._act("close", request, context)
        return pb.CloseCardResponse(
            ticket_id=answer.reference,
            outcome=_CLOSURE_OUTCOMES.get(answer.outcome, pb.CLOSURE_OUTCOME_UNSPECIFIED),
            reason=answer.reason,
        )

    @grpc_method
    async def ReportCardNotMine(
        self,
        request: pb.ReportCardNotMineRequest,
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> pb.ReportCardNotMineResponse:
        """Freeze the card and open a fraud case; a retry gets the first case number.

        status is CARD_STATUS_FROZEN when the card is frozen after the report. A card that was
        already closed stays closed (freezing it would bring it back into QueryCards answers):
        its case is opened all the same and status is CARD_STATUS_UNSPECIFIED, since CardStatus
        has no value for a closed card.
        """
        answer = await self._act("not_mine", request, context)
        status = pb.CARD_STATUS_FROZEN if answer.outcome == "frozen" else pb.CARD_STATUS_UNSPECIFIED
        return pb.ReportCardNotMineResponse(case_number=answer.reference, status=status)
