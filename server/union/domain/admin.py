"""Operator actions: regions, banks, statistics and the operators' own credentials.

Changes apply to the next lookup, no restart. Operators hold named credentials with a role (a
viewer reads, an operator changes); a credential's token is kept only as a keyed hash, and every
change is recorded in the audit trail under the credential's id, never its name or token.
"""

from __future__ import annotations

import re
import secrets
from collections.abc import Mapping, Sequence

from server.common import errors
from server.common.shapes import (
    BANK_CODE,
    BANK_ENGLISH_NAME,
    BANK_NAME,
    DNS_NAME,
    INTERBANK_CODE,
    is_bank_address,
)
from server.union.clock import Clock
from server.union.domain import model
from server.union.domain.audit import AuditTrail
from server.union.domain.ports import (
    AdminCredential,
    AdminCredentialStore,
    AdminRole,
    AdminServiceStore,
    DuplicateCredentialName,
)
from server.union.keyring import Keys

REGION_CODE = re.compile(r"^[0-9]{6}$")
CREDENTIAL_NAME = re.compile(r"^[a-z][a-z0-9_-]{0,31}$")
# The credential the server's configured admin token is (the demo's and the tests').
BOOTSTRAP_NAME = "bootstrap"
# Who acts from the union's own command line (it holds the keys and the database).
CONSOLE_ACTOR = "admin:console"
# Actors ListAuditEvents may filter on: a person's keyed hash, an admin credential, the console, or
# "admin" (events from before credentials had names).
AUDIT_ACTOR = re.compile(r"^(?:[0-9a-f]{64}|admin|admin:console|admin:c[0-9a-f]{16})$")
BANK_FIELDS = ("enabled", "address")
REGION_FIELDS = ("open",)
MAX_TOKEN_LENGTH = 256


def update_fields(mask: Sequence[str], populated: Sequence[str], allowed: Sequence[str]) -> set[str]:
    """The fields an Update changes (AIP-134): the mask's paths ("*" is every field), or, without a
    mask, the fields populated in the request. A path that is not a field is INVALID_ARGUMENT."""
    if not mask:
        return set(populated)
    if list(mask) == ["*"]:
        return set(allowed)
    if any(path not in allowed for path in mask):
        raise errors.InvalidArgument(
            [errors.FieldViolation("update_mask", f"paths must be among: {', '.join(allowed)} (or only *)")]
        )
    return set(mask)


class AdminService:
    def __init__(
        self,
        store: AdminServiceStore,
        clock: Clock,
        keys: Keys,
        credentials: AdminCredentialStore,
        audit: AuditTrail,
    ) -> None:
        self._store = store
        self._clock = clock
        self._keys = keys
        self._credentials = credentials
        self._audit = audit

    # -- credentials --------------------------------------------------------

    async def authorize(self, authorization: str | None) -> AdminCredential:
        """The admin credential of `authorization: Bearer <token>` metadata, or UNAUTHENTICATED."""
        token = authorization[len("Bearer ") :].strip() if authorization else ""
        if not authorization or not authorization.startswith("Bearer ") or not token:
            raise errors.Unauthenticated("admin credential required", reason="ADMIN_CREDENTIAL_REQUIRED")
        found = None
        if len(token) <= MAX_TOKEN_LENGTH:
            found = await self._credentials.find_credential(self._keys.credential_hashes(token))
        if found is None:
            raise errors.Unauthenticated("admin credential required", reason="ADMIN_CREDENTIAL_REQUIRED")
        return found

    @staticmethod
    def _require_operator(credential: AdminCredential) -> None:
        if credential.role != AdminRole.OPERATOR:
            raise errors.PermissionDenied(
                "this admin credential may only read; changes need an operator's",
                reason="ADMIN_ROLE_REQUIRED",
                metadata={"required_role": AdminRole.OPERATOR.value},
            )

    async def create_credential(self, name: str, role: AdminRole) -> tuple[AdminCredential, str]:
        """A new named credential and its token (shown once: only its hash is kept)."""
        if not CREDENTIAL_NAME.fullmatch(name) or name == BOOTSTRAP_NAME:
            raise errors.InvalidArgument(
                [
                    errors.FieldViolation(
                        "name", "must be 1-32 lowercase letters, digits, - or _, and not 'bootstrap'"
                    )
                ]
            )
        credential = AdminCredential("c" + secrets.token_hex(8), name, role, self._clock.now())
        token = "cla_" + secrets.token_urlsafe(32)
        key_id, token_hash = self._keys.credential_hash(token)
        async with self._audit.action(CONSOLE_ACTOR, "admin.credential.create") as outcome:
            try:
                await self._credentials.add_credential(credential, key_id, token_hash)
            except DuplicateCredentialName as error:
                raise errors.FailedPrecondition(
                    "a credential with this name exists", reason="CREDENTIAL_NAME_TAKEN"
                ) from error
            outcome.resource = f"adminCredentials/{credential.id}"
        return credential, token

    async def revoke_credential(self, name: str) -> AdminCredential:
        async with self._audit.action(CONSOLE_ACTOR, "admin.credential.revoke") as outcome:
            revoked = (
                await self._credentials.delete_credential(name) if CREDENTIAL_NAME.fullmatch(name) else None
            )
            if revoked is None:
                raise errors.NotFound("no admin credential with this name")
            outcome.resource = f"adminCredentials/{revoked.id}"
        return revoked

    async def list_credentials(self) -> list[AdminCredential]:
        return await self._credentials.list_credentials()

    async def ensure_bootstrap_credential(self, token: str) -> AdminCredential:
        """Make the configured admin token the operator credential named "bootstrap" (recorded in the
        audit trail when it is made or its token changes)."""
        key_id, token_hash = self._keys.credential_hash(token)
        credential, changed = await self._credentials.set_credential(
            BOOTSTRAP_NAME,
            AdminRole.OPERATOR,
            key_id,
            token_hash,
            self._clock.now(),
            "c" + secrets.token_hex(8),
        )
        if changed:
            await self._audit.record(
                CONSOLE_ACTOR, "admin.credential.bootstrap", "ok", f"adminCredentials/{credential.id}"
            )
        return credential

    # -- banks and regions --------------------------------------------------

    async def list_banks(self) -> list[model.Bank]:
        return await self._store.list_banks()

    async def create_bank(self, credential: AdminCredential, bank: model.NewBank) -> model.Bank:
        """Register a bank that joins the service (enabled: the next lookup asks it). Every field
        is validated before anything is kept or echoed; the audit trail names the bank by code."""
        async with self._audit.action(credential.actor, "admin.bank.create") as outcome:
            self._require_operator(credential)
            checks = (
                ("code", BANK_CODE.fullmatch(bank.code), "must be 2-16 capital letters"),
                ("name", BANK_NAME.fullmatch(bank.name), "must be 2-32 Chinese characters"),
                (
                    "english_name",
                    BANK_ENGLISH_NAME.fullmatch(bank.english_name),
                    "must be 2-128 letters, digits, spaces or .,&'()-",
                ),
                ("interbank_code", INTERBANK_CODE.fullmatch(bank.interbank_code), "must be 3 digits"),
                ("address", is_bank_address(bank.address), "must be host:port"),
                (
                    "tls_name",
                    not bank.tls_name or DNS_NAME.fullmatch(bank.tls_name),
                    "must be a lower-case DNS name",
                ),
            )
            violations = [errors.FieldViolation(f"bank.{name}", rule) for name, ok, rule in checks if not ok]
            if violations:
                raise errors.InvalidArgument(violations)
            outcome.resource = f"banks/{bank.code}"
            created = await self._store.create_bank(bank)
            if created is None:
                raise errors.AlreadyExists(
                    "a bank with this code or interbank code is registered", reason="BANK_EXISTS"
                )
        return created

    async def update_bank(
        self, credential: AdminCredential, code: str, enabled: bool, address: str, mask: Sequence[str]
    ) -> model.Bank:
        """Change the fields `mask` names (see update_fields) of one bank."""
        async with self._audit.action(credential.actor, "admin.bank.update") as outcome:
            self._require_operator(credential)
            populated = [name for name, value in (("enabled", enabled), ("address", address)) if value]
            fields = update_fields(mask, populated, BANK_FIELDS)
            violations = []
            if not BANK_CODE.fullmatch(code):
                violations.append(errors.FieldViolation("code", "must be 2-16 capital letters"))
            if "address" in fields and not is_bank_address(address):
                violations.append(errors.FieldViolation("address", "must be host:port"))
            if violations:
                raise errors.InvalidArgument(violations)
            outcome.resource = f"banks/{code}"
            bank = await self._store.update_bank(
                code,
                enabled if "enabled" in fields else None,
                address if "address" in fields else None,
            )
            if bank is None:
                raise errors.NotFound("no bank with this code")
        return bank

    async def list_regions(self) -> list[model.Region]:
        return await self._store.list_regions()

    async def update_region(
        self, credential: AdminCredential, code: str, is_open: bool, mask: Sequence[str]
    ) -> model.Region:
        """Change the fields `mask` names (see update_fields) of one region."""
        async with self._audit.action(credential.actor, "admin.region.update") as outcome:
            self._require_operator(credential)
            fields = update_fields(mask, ["open"] if is_open else [], REGION_FIELDS)
            if not REGION_CODE.fullmatch(code):
                raise errors.InvalidArgument(
                    [errors.FieldViolation("code", "must be a 6-digit GB/T 2260 code")]
                )
            outcome.resource = f"regions/{code}"
            if "open" in fields:
                region = await self._store.update_region(code, is_open, self._clock.now())
            else:
                region = await self._store.get_region(code)
            if region is None:
                raise errors.NotFound("no region with this code")
        return region

    async def stats(self) -> model.ServiceStats:
        return await self._store.stats()


class UnknownBankCodes(ValueError):
    """Addresses configured for banks the catalogue does not hold (start-up refuses them)."""


def check_bank_addresses(addresses: Mapping[str, str], banks: Sequence[model.Bank]) -> None:
    """An address for a code that is not in the catalogue would be ignored: refuse it instead. A bank
    joins through AdminService.CreateBank (it is then in the catalogue, and its address may be
    configured like any other's)."""
    known = {bank.code for bank in banks}
    unknown = sorted(code for code in addresses if code not in known)
    if unknown:
        raise UnknownBankCodes(
            f"no bank with code {', '.join(unknown)} is registered; a bank joins through "
            "AdminService.CreateBank (see docs/operations.md), after which its address can be set here"
        )
