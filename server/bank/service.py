"""bankquery.v1.BankQueryService for one simulated bank.

The servicer validates the union's request, reads the bank's own store off the
event loop, masks every card at the source and streams the records followed by
a summary. Fault settings (server.bank.faults) bend that behaviour on purpose.
"""

from __future__ import annotations

import asyncio
import logging
import random
import re
from collections.abc import AsyncIterator
from typing import Any

import grpc
from bankquery.v1 import bank_query_service_pb2 as pb
from bankquery.v1 import bank_query_service_pb2_grpc as pb_grpc

from server.bank.faults import FaultSettings, lie_about, other_bank_code
from server.bank.masking import to_card_record
from server.bank.store import BankStore
from server.common import errors
from server.common.checks import is_valid_resident_id
from server.common.grpc_errors import grpc_method

log = logging.getLogger(__name__)

SERVICE_NAME = "bankquery.v1.BankQueryService"
_QUERY_ID = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
_MAX_NAME_LENGTH = 64


def validate_request(request: pb.QueryCardsRequest) -> None:
    """Raise InvalidArgument naming every bad field (never echoing the values: they are PII)."""
    violations: list[errors.FieldViolation] = []
    if not _QUERY_ID.match(request.query_id):
        violations.append(errors.FieldViolation("query_id", "must be 1-64 characters of [A-Za-z0-9_-]"))
    if not is_valid_resident_id(request.resident_id_number):
        violations.append(
            errors.FieldViolation(
                "resident_id_number", "must be an 18-character GB 11643 number with a valid check character"
            )
        )
    name = request.name
    if not name.strip() or len(name) > _MAX_NAME_LENGTH or not name.isprintable():
        violations.append(errors.FieldViolation("name", "must be 1-64 printable characters, not blank"))
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

    @grpc_method
    async def QueryCards(
        self,
        request: pb.QueryCardsRequest,
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> AsyncIterator[pb.QueryCardsResponse]:
        faults = self.faults  # one snapshot per call, so a run-time change never mixes settings
        if faults.outage:
            raise errors.Unavailable(f"{self.bank_code} is unavailable")
        validate_request(request)
        delay = faults.start_delay(self._rng)
        if delay:
            await asyncio.sleep(delay)
        if faults.fails(self._rng):
            await context.abort(faults.error_code, f"{self.bank_code}: injected failure")

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
