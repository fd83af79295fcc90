"""Card closures and "not mine" flags: one row per card action, carried out like bank
tasks (claimed with leases, retried, failed at a deadline), with the sealed identity
erased as soon as an action is final.

Retention: purge_card_actions (final actions; a closure goes with its last item)."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import case, delete, func, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from server.union.domain import model
from server.union.domain.ports import DuplicateRequest
from server.union.storage.aggregate import Aggregate, same_request, utc
from server.union.storage.models import (
    BankTaskRow,
    CardActionRow,
    CardClosureRow,
)


class SqlCardActions(Aggregate):
    """server.union.domain.ports.CardActionStore."""

    async def create_card_closure(
        self,
        closure_id: str,
        person_hash: str,
        request_id: str,
        request_fingerprint: str,
        report_id: str,
        items: Sequence[tuple[str, model.ReportCardSource, str]],
        now: datetime,
        deadline: datetime,
    ) -> model.CardClosure:
        """Persist a closure and one pending action per card ((action_id, card, sealed identity))."""

        def work(s: Session) -> model.CardClosure:
            s.add(
                CardClosureRow(
                    id=closure_id,
                    person_hash=person_hash,
                    request_id=request_id,
                    request_fingerprint=request_fingerprint,
                    report_id=report_id,
                    create_time=now,
                )
            )
            for position, (action_id, card, sealed) in enumerate(items):
                s.add(
                    _action_row(
                        action_id,
                        model.ActionKind.CLOSE,
                        request_id,
                        person_hash,
                        card,
                        sealed,
                        now,
                        deadline,
                        position=position,
                        closure_id=closure_id,
                    )
                )
            s.flush()
            closure = _closure(s, s.get_one(CardClosureRow, closure_id))
            return closure

        try:
            return await self.runner.run(work)
        except IntegrityError as error:
            raise DuplicateRequest(request_id) from error

    async def find_closure_by_request(
        self, person_hash: str, request_id: str, request_fingerprint: str
    ) -> model.CardClosure | None:
        """The closure this person's `request_id` (a keyed hash) made, if any; RequestMismatch if
        a different request made it."""

        def work(s: Session) -> model.CardClosure | None:
            row = s.scalar(
                select(CardClosureRow).where(
                    CardClosureRow.person_hash == person_hash, CardClosureRow.request_id == request_id
                )
            )
            if row is None:
                return None
            same_request(row, row.request_fingerprint, request_fingerprint)
            return _closure(s, row)

        return await self.runner.run(work)

    async def get_card_closure(self, closure_id: str, person_hash: str) -> model.CardClosure | None:
        def work(s: Session) -> model.CardClosure | None:
            row = s.get(CardClosureRow, closure_id)
            if row is None or row.person_hash != person_hash:
                return None
            return _closure(s, row)

        return await self.runner.run(work)

    async def list_card_closures(
        self, person_hash: str, after: tuple[datetime, str] | None, limit: int
    ) -> list[model.CardClosure]:
        def work(s: Session) -> list[model.CardClosure]:
            query = select(CardClosureRow).where(CardClosureRow.person_hash == person_hash)
            if after is not None:
                time, last_id = after
                query = query.where(
                    (CardClosureRow.create_time < time)
                    | ((CardClosureRow.create_time == time) & (CardClosureRow.id < last_id))
                )
            rows = s.scalars(
                query.order_by(CardClosureRow.create_time.desc(), CardClosureRow.id.desc()).limit(limit)
            )
            return [_closure(s, row) for row in rows]

        return await self.runner.run(work)

    async def create_flag(
        self,
        action_id: str,
        person_hash: str,
        request_id: str,
        request_fingerprint: str,
        card: model.ReportCardSource,
        sealed_identity: str,
        now: datetime,
        deadline: datetime,
    ) -> tuple[model.CardAction, bool]:
        """The card's flag: a new one, or the one already raised (a card is flagged once). (flag, created)

        `request_id` is a keyed hash of the person and their request_id: if it already made a flag,
        that flag is returned when it was the same request, and RequestMismatch raised otherwise."""
        flag_key = f"{card.lookup_id}:{card.card_ref}"

        def existing(s: Session) -> model.CardAction | None:
            earlier = s.scalar(select(CardActionRow).where(CardActionRow.flag_request == request_id))
            if earlier is not None:
                same_request(earlier, earlier.request_fingerprint, request_fingerprint)
                return card_action(earlier)
            row = s.scalar(select(CardActionRow).where(CardActionRow.flag_key == flag_key))
            return None if row is None else card_action(row)

        def work(s: Session) -> tuple[model.CardAction, bool]:
            found = existing(s)
            if found is not None:
                return found, False
            row = _action_row(
                action_id,
                model.ActionKind.FLAG,
                request_id,
                person_hash,
                card,
                sealed_identity,
                now,
                deadline,
                position=0,
                flag_key=flag_key,
                flag_request=request_id,
                request_fingerprint=request_fingerprint,
            )
            s.add(row)
            s.flush()
            return card_action(row), True

        try:
            return await self.runner.run(work)
        except IntegrityError:
            # Another request flagged the same card at the same moment; it won.
            found = await self.runner.run(existing)
            if found is None:
                raise
            return found, False

    async def get_card_action(self, action_id: str) -> model.CardAction | None:
        def work(s: Session) -> model.CardAction | None:
            row = s.get(CardActionRow, action_id)
            return None if row is None else card_action(row)

        return await self.runner.run(work)

    async def claim_due_actions(
        self, owner: str, now: datetime, lease: timedelta, limit: int
    ) -> list[model.ActionClaim]:
        def work(s: Session) -> list[model.ActionClaim]:
            query = (
                select(CardActionRow)
                .where(
                    CardActionRow.state == model.ActionState.PENDING,
                    CardActionRow.next_attempt_time <= now,
                    (CardActionRow.lease_until.is_(None)) | (CardActionRow.lease_until < now),
                    CardActionRow.deadline_time > now,
                )
                .order_by(CardActionRow.next_attempt_time)
                .limit(limit)
            )
            query = self.runner.skip_locked(query)
            claims = []
            for row in s.scalars(query):
                row.lease_owner = owner
                row.lease_until = now + lease
                row.attempt_count += 1
                claims.append(
                    model.ActionClaim(
                        action_id=row.id,
                        kind=model.ActionKind(row.kind),
                        closure_id=row.closure_id,
                        person_hash=row.person_hash,
                        bank_code=row.bank_code,
                        bank_card_ref=row.bank_card_ref,
                        attempt=row.attempt_count,
                        sealed_identity=row.sealed_identity,
                        deadline_time=row.deadline_time,
                    )
                )
            return claims

        return await self.runner.run(work)

    async def record_action(
        self,
        action_id: str,
        owner: str,
        state: model.ActionState,
        ticket: str,
        reason: str,
        retry_at: datetime | None,
        now: datetime,
    ) -> model.CardAction | None:
        """The bank's answer (final: the sealed identity is erased), or a retry at `retry_at`.
        Only the lease holder may write; returns the action if this call finalised it."""

        def work(s: Session) -> model.CardAction | None:
            row = self.runner.get_locked(s, CardActionRow, action_id)
            if row is None or row.state != model.ActionState.PENDING or row.lease_owner != owner:
                return None
            row.lease_owner = None
            row.lease_until = None
            row.reason = reason[:255]
            row.update_time = now
            if retry_at is not None and state == model.ActionState.PENDING:
                row.next_attempt_time = retry_at
                return None
            row.state = state
            row.ticket = ticket[:64]
            row.sealed_identity = None
            return card_action(row)

        return await self.runner.run(work)

    async def fail_overdue_actions(self, now: datetime, limit: int = 200) -> list[model.CardAction]:
        def work(s: Session) -> list[model.CardAction]:
            rows = list(
                s.scalars(
                    select(CardActionRow)
                    .where(
                        CardActionRow.state == model.ActionState.PENDING, CardActionRow.deadline_time <= now
                    )
                    .limit(limit)
                )
            )
            for row in rows:
                row.state = model.ActionState.FAILED
                row.reason = row.reason or "the bank did not answer in time"
                row.sealed_identity = None
                row.lease_owner = None
                row.lease_until = None
                row.update_time = now
            return [card_action(row) for row in rows]

        return await self.runner.run(work)

    async def purge_card_actions(self, before: datetime, limit: int = 5000) -> int:
        """Closures and flags final since before `before`; a closure goes with its last item."""

        def work(s: Session) -> int:
            ids = list(
                s.scalars(
                    select(CardActionRow.id)
                    .where(
                        CardActionRow.state != model.ActionState.PENDING, CardActionRow.update_time < before
                    )
                    .limit(limit)
                )
            )
            if not ids:
                return 0
            closure_ids = set(
                s.scalars(select(CardActionRow.closure_id).where(CardActionRow.id.in_(ids)).distinct())
            )
            s.execute(delete(CardActionRow).where(CardActionRow.id.in_(ids)))
            closure_ids.discard(None)
            if closure_ids:
                emptied = select(CardActionRow.id).where(CardActionRow.closure_id == CardClosureRow.id)
                s.execute(delete(CardClosureRow).where(CardClosureRow.id.in_(closure_ids), ~emptied.exists()))
            return len(ids)

        return await self.runner.run(work)


def release_action_leases(s: Session, owner: str) -> int:
    """Hand back `owner`'s pending actions (its graceful shutdown; see SqlLookups.release_leases)."""
    result = s.execute(
        update(CardActionRow)
        .where(CardActionRow.lease_owner == owner, CardActionRow.state == model.ActionState.PENDING)
        .values(lease_owner=None, lease_until=None)
    )
    return int(result.rowcount)  # type: ignore[attr-defined]


def earliest_action_due(s: Session) -> datetime | None:
    """When the first pending action falls due (see SqlLookups.next_due_time)."""
    query = select(earliest_due(CardActionRow)).where(CardActionRow.state == model.ActionState.PENDING)
    return utc(s.scalar(query))


def earliest_due(row: type[BankTaskRow] | type[CardActionRow]) -> Any:
    """When the first of these rows falls due. One in flight is not due before its lease lapses,
    whatever its next_attempt_time says."""
    return func.min(
        case((row.lease_until > row.next_attempt_time, row.lease_until), else_=row.next_attempt_time)
    )


def _action_row(
    action_id: str,
    kind: model.ActionKind,
    request_id: str,
    person_hash: str,
    card: model.ReportCardSource,
    sealed_identity: str,
    now: datetime,
    deadline: datetime,
    position: int,
    closure_id: str | None = None,
    flag_key: str | None = None,
    flag_request: str | None = None,
    request_fingerprint: str | None = None,
) -> CardActionRow:
    return CardActionRow(
        id=action_id,
        kind=kind,
        closure_id=closure_id,
        flag_key=flag_key,
        flag_request=flag_request,
        request_fingerprint=request_fingerprint,
        request_id=request_id,
        person_hash=person_hash,
        lookup_id=card.lookup_id,
        position=position,
        card_ref=card.card_ref,
        bank_code=card.bank_code,
        bank_name=card.bank_name,
        bank_card_ref=card.bank_card_ref,
        first_four=card.first_four,
        last_four=card.last_four,
        number_length=card.number_length,
        state=model.ActionState.PENDING,
        ticket="",
        reason="",
        sealed_identity=sealed_identity,
        attempt_count=0,
        next_attempt_time=now,
        deadline_time=deadline,
        create_time=now,
        update_time=now,
    )


def card_action(row: CardActionRow) -> model.CardAction:
    return model.CardAction(
        id=row.id,
        kind=model.ActionKind(row.kind),
        card_ref=row.card_ref,
        bank_code=row.bank_code,
        bank_name=row.bank_name,
        first_four=row.first_four,
        last_four=row.last_four,
        number_length=row.number_length,
        state=model.ActionState(row.state),
        ticket=row.ticket,
        reason=row.reason,
        create_time=row.create_time,
        update_time=row.update_time,
    )


def _closure(s: Session, row: CardClosureRow) -> model.CardClosure:
    items = s.scalars(
        select(CardActionRow).where(CardActionRow.closure_id == row.id).order_by(CardActionRow.position)
    )
    return model.CardClosure(row.id, row.report_id, row.create_time, [card_action(i) for i in items])
