"""Domain objects → cardlookup.v1 messages. The one place to touch when a field is added."""

from __future__ import annotations

import functools
from datetime import UTC, datetime
from zoneinfo import ZoneInfo

from cardlookup.v1 import admin_service_pb2 as admin_pb
from cardlookup.v1 import card_action_service_pb2 as action_pb
from cardlookup.v1 import card_lookup_service_pb2 as pb
from google.protobuf.message import Message
from google.protobuf.timestamp_pb2 import Timestamp

from server.common import errors
from server.common.shapes import bank_tls_name
from server.union.domain import model

_OUTCOMES = {
    model.BankOutcome.PENDING: pb.BANK_OUTCOME_PENDING,
    model.BankOutcome.ANSWERED: pb.BANK_OUTCOME_ANSWERED,
    model.BankOutcome.FAILED: pb.BANK_OUTCOME_FAILED,
    model.BankOutcome.NO_RESPONSE: pb.BANK_OUTCOME_NO_RESPONSE,
}
_STATES = {
    model.LookupState.RUNNING: pb.LOOKUP_STATE_RUNNING,
    model.LookupState.COMPLETED: pb.LOOKUP_STATE_COMPLETED,
}
_CARD_TYPES = {model.CardType.DEBIT: pb.CARD_TYPE_DEBIT, model.CardType.CREDIT: pb.CARD_TYPE_CREDIT}
_CARD_STATUSES = {
    model.CardStatus.ACTIVE: pb.CARD_STATUS_ACTIVE,
    model.CardStatus.DORMANT: pb.CARD_STATUS_DORMANT,
    model.CardStatus.FROZEN: pb.CARD_STATUS_FROZEN,
}


_CLOSURE_STATES = {
    model.ActionState.PENDING: action_pb.CARD_CLOSURE_STATE_PENDING,
    model.ActionState.CLOSED: action_pb.CARD_CLOSURE_STATE_CLOSED,
    model.ActionState.SCHEDULED: action_pb.CARD_CLOSURE_STATE_SCHEDULED,
    model.ActionState.BRANCH_VISIT_REQUIRED: action_pb.CARD_CLOSURE_STATE_BRANCH_VISIT_REQUIRED,
    model.ActionState.REJECTED: action_pb.CARD_CLOSURE_STATE_REJECTED,
    model.ActionState.FAILED: action_pb.CARD_CLOSURE_STATE_FAILED,
}
_FLAG_STATES = {
    model.ActionState.PENDING: action_pb.CARD_FLAG_STATE_PENDING,
    model.ActionState.FROZEN: action_pb.CARD_FLAG_STATE_FROZEN,
    model.ActionState.FAILED: action_pb.CARD_FLAG_STATE_FAILED,
}


def optional_datetime(message: Message, field: str) -> datetime | None:
    """A request's Timestamp field as an aware datetime; unset is None, out of range is INVALID_ARGUMENT."""
    if not message.HasField(field):
        return None
    try:
        value: datetime = getattr(message, field).ToDatetime(tzinfo=UTC)
    except (ValueError, OverflowError) as error:
        raise errors.InvalidArgument([errors.FieldViolation(field, "not a valid timestamp")]) from error
    return value


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def timestamp(value: datetime) -> Timestamp:
    """Exact to the microsecond, like Timestamp.FromDatetime (naive means UTC there too), in a
    third of its time: a watch converts two per message."""
    if value.tzinfo is None:
        value = value.replace(tzinfo=UTC)
    since = value - _EPOCH
    return Timestamp(seconds=since.days * 86400 + since.seconds, nanos=since.microseconds * 1000)


@functools.lru_cache(maxsize=4096)
def _bank_progress(value: model.BankProgress) -> pb.BankProgress:
    # The same few thousand values recur in every lookup (16 banks, each pending, answered with a
    # few cards, or failed for one of a few reasons); a watch converts 16 per message. The cached
    # message is never handed out itself: a repeated field copies what it is given.
    return pb.BankProgress(
        bank_code=value.bank_code,
        bank_name=value.bank_name,
        outcome=_OUTCOMES[value.outcome],
        attempt_count=value.attempt_count,
        card_count=value.card_count,
        failure_reason=value.failure_reason,
    )


_UNASKED_REASONS = {
    model.UnaskedReason.NOT_CHOSEN: pb.UNASKED_REASON_NOT_CHOSEN,
    model.UnaskedReason.BANK_DISABLED: pb.UNASKED_REASON_BANK_DISABLED,
    model.UnaskedReason.REQUERY_COOLDOWN: pb.UNASKED_REASON_REQUERY_COOLDOWN,
}


def unasked_bank(value: model.UnaskedBank) -> pb.UnaskedBank:
    result = pb.UnaskedBank(
        bank_code=value.bank_code, bank_name=value.bank_name, reason=_UNASKED_REASONS[value.reason]
    )
    if value.next_query_time is not None:
        result.next_query_time.CopyFrom(timestamp(value.next_query_time))
    return result


def lookup(value: model.Lookup) -> pb.Lookup:
    return pb.Lookup(
        name=value.name,
        state=_STATES[value.state],
        bank_progress=[_bank_progress(b) for b in value.banks],
        create_time=timestamp(value.create_time),
        deadline_time=timestamp(value.deadline_time),
        report=f"reports/{value.report_id}" if value.report_id else "",
        unasked_banks=[unasked_bank(b) for b in value.unasked],
    )


def report(value: model.Report) -> pb.Report:
    answered = [b for b in value.banks if b.outcome == model.BankOutcome.ANSWERED]
    return pb.Report(
        name=value.name,
        lookup=f"lookups/{value.lookup_id}",
        generate_time=timestamp(value.generate_time),
        expire_time=timestamp(value.expire_time),
        bank_summaries=[
            pb.BankSummary(
                bank_code=b.bank_code,
                bank_name=b.bank_name,
                debit_card_count=b.debit_count,
                credit_card_count=b.credit_count,
                outcome=_OUTCOMES[b.outcome],
                next_query_time=(
                    timestamp(value.next_query_times[b.bank_code])
                    if b.bank_code in value.next_query_times
                    else None
                ),
            )
            for b in value.banks
        ],
        cards=[
            pb.ReportCard(
                card_ref=c.card_ref,
                bank_code=c.bank_code,
                bank_name=c.bank_name,
                card_type=_CARD_TYPES[c.card_type],
                masked_number=c.masked_number,
                number_length=c.number_length,
                status=_CARD_STATUSES[c.status],
                not_mine_flag=flag(c.flag) if c.flag else None,
                closure=closure_item(c.closure) if c.closure else None,
                open_time=timestamp(c.open_time) if c.open_time else None,
            )
            for c in value.cards
        ],
        total_card_count=len(value.cards),
        total_debit_card_count=sum(b.debit_count for b in answered),
        total_credit_card_count=sum(b.credit_count for b in answered),
        unasked_banks=[unasked_bank(b) for b in value.unasked],
    )


def closure_item(value: model.CardAction) -> action_pb.CardClosureItem:
    return action_pb.CardClosureItem(
        card_ref=value.card_ref,
        bank_code=value.bank_code,
        bank_name=value.bank_name,
        masked_number=value.masked_number,
        state=_CLOSURE_STATES.get(value.state, action_pb.CARD_CLOSURE_STATE_UNSPECIFIED),
        ticket_id=value.ticket,
        reason=value.reason,
        update_time=timestamp(value.update_time),
    )


def closure(value: model.CardClosure) -> action_pb.CardClosure:
    return action_pb.CardClosure(
        name=value.name,
        report=f"reports/{value.report_id}",
        items=[closure_item(item) for item in value.items],
        create_time=timestamp(value.create_time),
    )


def flag(value: model.CardAction) -> action_pb.CardFlag:
    return action_pb.CardFlag(
        card_ref=value.card_ref,
        bank_code=value.bank_code,
        state=_FLAG_STATES.get(value.state, action_pb.CARD_FLAG_STATE_UNSPECIFIED),
        case_number=value.ticket,
        create_time=timestamp(value.create_time),
    )


def audit_event(value: model.AuditEvent) -> action_pb.AuditEvent:
    return action_pb.AuditEvent(
        time=timestamp(value.time),
        actor=value.actor,
        action=value.action,
        outcome=value.outcome,
        resource=value.resource,
    )


def bank(value: model.Bank) -> admin_pb.Bank:
    return admin_pb.Bank(
        code=value.code,
        name=value.name,
        english_name=value.english_name,
        address=value.address,
        enabled=value.enabled,
        interbank_code=value.interbank_code,
        tls_name=value.tls_name or bank_tls_name(value.code),
    )


# Pilot opening dates are calendar days in China.
_CHINA = ZoneInfo("Asia/Shanghai")


def region(value: model.Region) -> admin_pb.Region:
    result = admin_pb.Region(code=value.code, name=value.name, open=value.open)
    if value.open_time is not None:
        result.open_time.CopyFrom(timestamp(value.open_time))
    if value.pilot_batch is not None and value.pilot_open_date is not None:
        result.pilot_batch = value.pilot_batch
        opened = value.pilot_open_date
        result.pilot_open_time.CopyFrom(
            timestamp(datetime(opened.year, opened.month, opened.day, tzinfo=_CHINA))
        )
    return result
