"""Storage of sessions (for revocation) and named admin credentials.

These tables are touched once per call (the session check) or by operators,
never by the lookup hot path. The SQL runs on the Store's runner like every
other aggregate's. Retention: purge_expired_sessions; admin credentials are kept
until an operator deletes them.
"""

from __future__ import annotations

from datetime import datetime
from typing import cast

from sqlalchemy import Connection, Table, bindparam, delete, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from server.union.domain.ports import AdminCredential, AdminRole, DuplicateCredentialName
from server.union.storage.database import Store
from server.union.storage.models import AdminCredentialRow, SessionRow
from server.union.storage.prepared import Prepared

SESSIONS = cast(Table, SessionRow.__table__)
# Asked on every authenticated call, so built once like the lookup hot path's statements.
_LIVE_SESSION = Prepared(
    select(SESSIONS.c.token_id).where(SESSIONS.c.person_hash == bindparam("person_hash"))
)


def _credential(row: AdminCredentialRow) -> AdminCredential:
    return AdminCredential(row.id, row.name, AdminRole(row.role), row.create_time)


class SessionStore:
    """server.union.domain.ports.SessionRegistry on the union's database."""

    def __init__(self, store: Store) -> None:
        self._runner = store.runner

    async def start_session(self, person_hash: str, token_id: str, expire_time: datetime) -> None:
        values = {"person_hash": person_hash, "token_id": token_id, "expire_time": expire_time}
        statement = (
            self._runner.upsert(SessionRow)
            .values(**values)
            .on_conflict_do_update(
                index_elements=[SessionRow.person_hash],
                set_={"token_id": token_id, "expire_time": expire_time},
            )
        )
        await self._runner.run(lambda s: s.execute(statement))

    async def live_session(self, person_hash: str) -> str | None:
        def work(c: Connection) -> str | None:
            rows = _LIVE_SESSION.run(c, {"person_hash": person_hash})
            return rows[0][0] if rows else None

        # Shares the batched read path with the lookup reads (one thread hop for many calls).
        return await self._runner.core_read(work)

    async def end_session(self, person_hash: str, token_id: str) -> bool:
        def work(s: Session) -> bool:
            result = s.execute(
                update(SessionRow)
                .where(SessionRow.person_hash == person_hash, SessionRow.token_id == token_id)
                .values(token_id=None)
            )
            return bool(result.rowcount)  # type: ignore[attr-defined]

        return await self._runner.run(work)

    async def purge_expired_sessions(self, now: datetime, limit: int = 1000) -> int:
        def work(s: Session) -> int:
            expired = select(SessionRow.person_hash).where(SessionRow.expire_time <= now).limit(limit)
            result = s.execute(delete(SessionRow).where(SessionRow.person_hash.in_(expired)))
            return int(result.rowcount)  # type: ignore[attr-defined]

        return await self._runner.run(work)


class AdminCredentialRepository:
    """server.union.domain.ports.AdminCredentialStore on the union's database."""

    def __init__(self, store: Store) -> None:
        self._runner = store.runner

    async def add_credential(self, credential: AdminCredential, key_id: str, token_hash: str) -> None:
        def work(s: Session) -> None:
            s.add(
                AdminCredentialRow(
                    id=credential.id,
                    name=credential.name,
                    role=credential.role.value,
                    key_id=key_id,
                    token_hash=token_hash,
                    create_time=credential.create_time,
                )
            )

        try:
            await self._runner.run(work)
        except IntegrityError as error:
            raise DuplicateCredentialName(credential.name) from error

    async def find_credential(self, token_hashes: dict[str, str]) -> AdminCredential | None:
        def work(s: Session) -> AdminCredential | None:
            rows = s.scalars(
                select(AdminCredentialRow).where(AdminCredentialRow.token_hash.in_(token_hashes.values()))
            )
            # The hash must be the one under the key the credential was hashed with.
            return next((_credential(r) for r in rows if token_hashes.get(r.key_id) == r.token_hash), None)

        return await self._runner.run(work)

    async def set_credential(
        self, name: str, role: AdminRole, key_id: str, token_hash: str, now: datetime, new_id: str
    ) -> tuple[AdminCredential, bool]:
        def work(s: Session) -> tuple[AdminCredential, bool]:
            row = s.scalars(
                select(AdminCredentialRow).where(AdminCredentialRow.name == name).with_for_update()
            ).first()
            if row is None:
                row = AdminCredentialRow(
                    id=new_id,
                    name=name,
                    role=role.value,
                    key_id=key_id,
                    token_hash=token_hash,
                    create_time=now,
                )
                s.add(row)
                return _credential(row), True
            if (row.role, row.key_id, row.token_hash) == (role.value, key_id, token_hash):
                return _credential(row), False
            row.role, row.key_id, row.token_hash = role.value, key_id, token_hash
            return _credential(row), True

        try:
            return await self._runner.run(work)
        except IntegrityError:
            # Another replica starting at the same moment made it first: it is there now.
            return await self._runner.run(work)

    async def list_credentials(self) -> list[AdminCredential]:
        def work(s: Session) -> list[AdminCredential]:
            rows = s.scalars(select(AdminCredentialRow).order_by(AdminCredentialRow.name))
            return [_credential(r) for r in rows]

        return await self._runner.run(work)

    async def delete_credential(self, name: str) -> AdminCredential | None:
        def work(s: Session) -> AdminCredential | None:
            row = s.scalars(select(AdminCredentialRow).where(AdminCredentialRow.name == name)).first()
            if row is None:
                return None
            s.delete(row)
            return _credential(row)

        return await self._runner.run(work)
