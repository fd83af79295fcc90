"""What the credential side of the domain needs from storage, as protocols.

The identity and admin services depend on these, not on a concrete store, so
the rules about sessions and operator credentials read (and test) apart from
the SQL that keeps them (server.union.storage.credentials).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum
from typing import Protocol


class AdminRole(StrEnum):
    VIEWER = "viewer"  # the List and Get methods
    OPERATOR = "operator"  # every method, changes included


@dataclass(frozen=True)
class AdminCredential:
    """A named operator credential; its token is never kept, only a keyed hash of it."""

    id: str
    name: str
    role: AdminRole
    create_time: datetime

    @property
    def actor(self) -> str:
        """How the audit trail names what this credential did."""
        return f"admin:{self.id}"


class SessionRegistry(Protocol):
    """The one live session of each person (see storage.models.SessionRow)."""

    async def start_session(self, person_hash: str, token_id: str, expire_time: datetime) -> None:
        """Make `token_id` the person's live session, revoking any older one."""
        ...

    async def live_session(self, person_hash: str) -> str | None:
        """The token id of the person's live session, or None (signed out, replaced, or purged)."""
        ...

    async def end_session(self, person_hash: str, token_id: str) -> bool:
        """Revoke the session `token_id` if it is the live one; whether it was."""
        ...

    async def purge_expired_sessions(self, now: datetime, limit: int = 1000) -> int:
        """Forget sessions that have expired anyway; how many went."""
        ...


class AdminCredentialStore(Protocol):
    async def add_credential(self, credential: AdminCredential, key_id: str, token_hash: str) -> None:
        """Store a new credential; DuplicateCredentialName if the name is taken."""
        ...

    async def find_credential(self, token_hashes: dict[str, str]) -> AdminCredential | None:
        """The credential whose token hashes to `token_hashes[key id]` under its key, if any."""
        ...

    async def set_credential(
        self, name: str, role: AdminRole, key_id: str, token_hash: str, now: datetime, new_id: str
    ) -> tuple[AdminCredential, bool]:
        """Create the credential `name` or give it this token and role; (it, whether it changed)."""
        ...

    async def list_credentials(self) -> list[AdminCredential]: ...

    async def delete_credential(self, name: str) -> AdminCredential | None:
        """Revoke (delete) the credential `name`; the one deleted, if there was one."""
        ...


class DuplicateCredentialName(Exception):
    """Another credential already has this name."""
