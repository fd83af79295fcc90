"""Reports and the cards found for them: read, listed, deleted by their owner, and
purged with everything their lookup kept once they expire (the 7-day rule).

The report row and its cards are written in the transaction that records the last
bank's answer (answer_store), with the statements built here."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from datetime import datetime, timedelta
from typing import Any, cast

from sqlalchemy import Table, delete, insert, select
from sqlalchemy.orm import Session

from server.union.domain import model
from server.union.storage.aggregate import Aggregate, utc
from server.union.storage.card_action_store import card_action
from server.union.storage.lookup_store import read_lookup
from server.union.storage.models import (
    BankCooldownRow,
    BankTaskRow,
    CardActionRow,
    FoundCardRow,
    LookupRow,
    NotificationRow,
    ReportRow,
)
from server.union.storage.prepared import Prepared

CARDS = cast(Table, FoundCardRow.__table__)
REPORTS = cast(Table, ReportRow.__table__)
INSERT_CARDS = Prepared(insert(CARDS))
INSERT_REPORTS = Prepared(insert(REPORTS))


def found_card_rows(
    lookup_id: str, bank_code: str, position: int, cards: Sequence[tuple[str, model.MaskedCard]]
) -> list[dict[str, Any]]:
    """The found_cards rows of one bank's answer ((the bank's card reference, the card) pairs),
    for INSERT_CARDS; _report reads them back."""
    return [
        {
            "lookup_id": lookup_id,
            "card_ref": card.card_ref,
            "bank_code": bank_code,
            "position": position,
            "bank_card_ref": bank_card_ref,
            "card_type": card.card_type,
            "first_four": card.first_four,
            "last_four": card.last_four,
            "number_length": card.number_length,
            "status": card.status,
            "open_time": card.open_time,
        }
        for bank_card_ref, card in cards
    ]


class SqlReports(Aggregate):
    """server.union.domain.ports.ReportStore; retention: purge_expired_reports."""

    async def get_report(self, report_id: str, person_hash: str, now: datetime) -> model.Report | None:
        def work(s: Session) -> model.Report | None:
            row = s.get(ReportRow, report_id)
            if row is None or row.person_hash != person_hash or row.expire_time <= now:
                return None
            return _report(s, row)

        return await self.runner.run(work)

    async def list_reports(
        self, person_hash: str, now: datetime, after: tuple[datetime, str] | None, limit: int
    ) -> list[model.Report]:
        """Unexpired reports, newest first, keyset-paginated after (generate_time, id)."""

        def work(s: Session) -> list[model.Report]:
            query = select(ReportRow).where(ReportRow.person_hash == person_hash, ReportRow.expire_time > now)
            if after is not None:
                time, last_id = after
                query = query.where(
                    (ReportRow.generate_time < time)
                    | ((ReportRow.generate_time == time) & (ReportRow.id < last_id))
                )
            rows = s.scalars(query.order_by(ReportRow.generate_time.desc(), ReportRow.id.desc()).limit(limit))
            return [_report(s, row) for row in rows]

        return await self.runner.run(work)

    async def delete_report(
        self, report_id: str, person_hash: str, now: datetime, cooldown: timedelta
    ) -> bool:
        """The person deletes their report: it goes with its lookup, but each bank that answered
        keeps the person's re-query cooldown (`cooldown` from when the lookup completed) as a
        bank_cooldowns row, so deleting a report never resets it."""

        def work(s: Session) -> bool:
            row = s.get(ReportRow, report_id)
            if row is None or row.person_hash != person_hash or row.expire_time <= now:
                return False
            answered = s.execute(
                select(BankTaskRow.bank_code, LookupRow.complete_time)
                .join(LookupRow, LookupRow.id == BankTaskRow.lookup_id)
                .where(
                    BankTaskRow.lookup_id == row.lookup_id,
                    BankTaskRow.outcome == model.BankOutcome.ANSWERED,
                )
            ).all()
            for bank_code, complete_time in answered:
                answer_time = utc(complete_time) or now
                until = answer_time + cooldown
                if until <= now:
                    continue
                s.execute(
                    self.runner.upsert(BankCooldownRow)
                    .values(
                        person_hash=person_hash, bank_code=bank_code, answer_time=answer_time, until=until
                    )
                    .on_conflict_do_update(
                        index_elements=[BankCooldownRow.person_hash, BankCooldownRow.bank_code],
                        set_={"answer_time": answer_time, "until": until},
                        where=BankCooldownRow.until < until,
                    )
                )
            _delete_report_rows(s, row)
            return True

        return await self.runner.run(work)

    async def purge_bank_cooldowns(self, now: datetime) -> int:
        """Cooldowns of deleted reports that have ended."""

        def work(s: Session) -> int:
            result = s.execute(delete(BankCooldownRow).where(BankCooldownRow.until <= now))
            return int(result.rowcount)  # type: ignore[attr-defined]

        return await self.runner.run(work)

    async def purge_expired_reports(self, now: datetime, limit: int = 500) -> int:
        """Delete expired reports for good, with their cards and their lookups' tasks and counts."""

        def work(s: Session) -> int:
            rows = list(s.scalars(select(ReportRow).where(ReportRow.expire_time <= now).limit(limit)))
            for row in rows:
                _delete_report_rows(s, row)
            return len(rows)

        return await self.runner.run(work)

    async def report_card_sources(
        self, report_id: str, person_hash: str, now: datetime
    ) -> dict[str, model.ReportCardSource] | None:
        """The cards of one of the person's unexpired reports, keyed by card_ref; None if no such report."""

        def work(s: Session) -> dict[str, model.ReportCardSource] | None:
            row = s.get(ReportRow, report_id)
            if row is None or row.person_hash != person_hash or row.expire_time <= now:
                return None
            names: dict[str, str] = {
                code: name
                for code, name in s.execute(
                    select(BankTaskRow.bank_code, BankTaskRow.bank_name).where(
                        BankTaskRow.lookup_id == row.lookup_id
                    )
                )
            }
            cards = s.scalars(select(FoundCardRow).where(FoundCardRow.lookup_id == row.lookup_id))
            return {
                c.card_ref: model.ReportCardSource(
                    lookup_id=row.lookup_id,
                    card_ref=c.card_ref,
                    bank_code=c.bank_code,
                    bank_name=names.get(c.bank_code, c.bank_code),
                    bank_card_ref=c.bank_card_ref,
                    first_four=c.first_four,
                    last_four=c.last_four,
                    number_length=c.number_length,
                )
                for c in cards
            }

        return await self.runner.run(work)


def _delete_report_rows(s: Session, row: ReportRow) -> None:
    """A report goes with everything its lookup kept: cards, per-bank tasks and counts, the lookup
    itself, and an announcement not yet sent. Card actions keep their own copy (and retention)."""
    lookup_id = row.lookup_id
    s.execute(delete(FoundCardRow).where(FoundCardRow.lookup_id == lookup_id))
    s.execute(delete(NotificationRow).where(NotificationRow.lookup_id == lookup_id))
    s.execute(delete(BankTaskRow).where(BankTaskRow.lookup_id == lookup_id))
    s.delete(row)
    s.execute(delete(LookupRow).where(LookupRow.id == lookup_id))


def _report(s: Session, row: ReportRow) -> model.Report:
    found = read_lookup(s.connection(), row.lookup_id)
    banks = found[1].banks if found else []
    names = {b.bank_code: b.bank_name for b in banks}
    cards = [
        model.MaskedCard(
            card_ref=c.card_ref,
            bank_code=c.bank_code,
            bank_name=names.get(c.bank_code, c.bank_code),
            card_type=model.CardType(c.card_type),
            first_four=c.first_four,
            last_four=c.last_four,
            number_length=c.number_length,
            status=model.CardStatus(c.status),
            open_time=c.open_time,
        )
        for c in s.scalars(
            select(FoundCardRow)
            .where(FoundCardRow.lookup_id == row.lookup_id)
            .order_by(FoundCardRow.position, FoundCardRow.card_type.desc(), FoundCardRow.card_ref)
        )
    ]
    flags: dict[str, model.CardAction] = {}
    closures: dict[str, model.CardAction] = {}
    actions = s.scalars(
        select(CardActionRow)
        .where(CardActionRow.lookup_id == row.lookup_id)
        .order_by(CardActionRow.create_time)
    )
    for action_row in actions:
        action = card_action(action_row)
        (flags if action.kind == model.ActionKind.FLAG else closures)[action.card_ref] = action
    cards = [replace(c, flag=flags.get(c.card_ref), closure=closures.get(c.card_ref)) for c in cards]
    unasked = found[1].unasked if found else []
    return model.Report(row.id, row.lookup_id, row.generate_time, row.expire_time, banks, cards, unasked)
