"""The identity registry and verifications: keyed hashes, and identities sealed only
while a verification is pending (erased once it is used, locked or expired).

Retention: verifications (purge_verifications) and the first-verified record of
each person (purge_verified_people); the registry itself is reference data."""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime

from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from server.union.domain import model
from server.union.storage.aggregate import Aggregate
from server.union.storage.models import (
    IdentityRow,
    VerificationRow,
    VerifiedPersonRow,
)
from server.union.storage.stats_store import bump


class SqlIdentities(Aggregate):
    """server.union.domain.ports.IdentityStore."""

    async def identity_count(self) -> int:
        return await self.runner.run(lambda s: s.scalar(select(func.count()).select_from(IdentityRow)) or 0)

    async def add_identities(self, rows: Iterable[tuple[str, str, str, str]]) -> None:
        """Insert (person_hash, name_hash, mobile_hash, region_code) rows, skipping known people."""
        batch = [
            {"person_hash": p, "name_hash": n, "mobile_hash": m, "region_code": r} for p, n, m, r in rows
        ]

        def work(s: Session) -> None:
            s.execute(self.runner.insert_missing(IdentityRow), batch)

        await self.runner.run(work)

    async def find_identity(self, person_hash: str) -> model.RegisteredIdentity | None:
        def work(s: Session) -> model.RegisteredIdentity | None:
            row = s.get(IdentityRow, person_hash)
            if row is None:
                return None
            return model.RegisteredIdentity(row.person_hash, row.name_hash, row.mobile_hash, row.region_code)

        return await self.runner.run(work)

    async def add_verification(self, new: model.NewVerification) -> None:
        row = VerificationRow(
            id=new.id,
            person_hash=new.person_hash,
            region_code=new.region_code,
            sealed_identity=new.sealed_identity,
            code_hash=new.code_hash,
            create_time=new.create_time,
            expire_time=new.expire_time,
            failed_attempts=0,
            completed=False,
        )
        await self.runner.run(lambda s: s.add(row))

    async def get_verification(self, verification_id: str) -> model.Verification | None:
        def work(s: Session) -> model.Verification | None:
            row = s.get(VerificationRow, verification_id)
            return None if row is None else _verification(row)

        return await self.runner.run(work)

    async def fail_verification_attempt(self, verification_id: str, max_attempts: int) -> int:
        """Count a wrong code; at the limit the sealed identity is erased. Returns attempts left."""

        def work(s: Session) -> int:
            row = self.runner.get_locked(s, VerificationRow, verification_id)
            if row is None:
                return 0
            row.failed_attempts += 1
            if row.failed_attempts >= max_attempts:
                row.sealed_identity = None
            return max(0, max_attempts - row.failed_attempts)

        return await self.runner.run(work)

    async def complete_verification(self, verification_id: str, now: datetime) -> str | None:
        """Mark used (once) and hand back the sealed identity, erasing it from the row."""

        def work(s: Session) -> str | None:
            row = self.runner.get_locked(s, VerificationRow, verification_id)
            if row is None or row.completed or row.sealed_identity is None:
                return None
            sealed = row.sealed_identity
            row.completed = True
            row.sealed_identity = None
            if s.get(VerifiedPersonRow, row.person_hash) is None:
                s.add(VerifiedPersonRow(person_hash=row.person_hash, first_verify_time=now))
                bump(s, "people_verified")
            return sealed

        return await self.runner.run(work)

    async def erase_stale_verifications(self, now: datetime) -> int:
        """Expired verifications keep no sealed identity."""

        def work(s: Session) -> int:
            result = s.execute(
                update(VerificationRow)
                .where(VerificationRow.expire_time < now, VerificationRow.sealed_identity.is_not(None))
                .values(sealed_identity=None)
            )
            return int(result.rowcount)  # type: ignore[attr-defined]

        return await self.runner.run(work)

    async def purge_verifications(self, before: datetime, limit: int = 5000) -> int:
        """Verifications (pending, completed, refused) started before `before`."""
        return await self.purge_rows(
            VerificationRow.__table__, VerificationRow.id, VerificationRow.create_time < before, limit
        )

    async def purge_verified_people(self, before: datetime, limit: int = 5000) -> int:
        """Who was first verified before `before` (the people_verified counter keeps the count)."""
        return await self.purge_rows(
            VerifiedPersonRow.__table__,
            VerifiedPersonRow.person_hash,
            VerifiedPersonRow.first_verify_time < before,
            limit,
        )


def _verification(row: VerificationRow) -> model.Verification:
    return model.Verification(
        id=row.id,
        person_hash=row.person_hash,
        region_code=row.region_code,
        sealed_identity=row.sealed_identity,
        code_hash=row.code_hash,
        failed_attempts=row.failed_attempts,
        completed=row.completed,
        create_time=row.create_time,
        expire_time=row.expire_time,
    )
