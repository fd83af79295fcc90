"""Operator actions: regions, banks and statistics. Changes apply to the next lookup, no restart."""

from __future__ import annotations

import hmac
import re

from server.common import errors
from server.union.clock import Clock
from server.union.domain import model
from server.union.storage.store import Store

REGION_CODE = re.compile(r"^[0-9]{6}$")
BANK_CODE = re.compile(r"^[A-Z]{2,16}$")
ADDRESS = re.compile(r"^[A-Za-z0-9.\-\[\]:]{1,253}:[0-9]{1,5}$")


class AdminService:
    def __init__(self, store: Store, clock: Clock, admin_token: str) -> None:
        self._store = store
        self._clock = clock
        self._admin_token = admin_token

    def authorize(self, authorization: str | None) -> None:
        expected = f"Bearer {self._admin_token}"
        if not authorization or not hmac.compare_digest(authorization.encode(), expected.encode()):
            raise errors.Unauthenticated("admin credential required", reason="ADMIN_CREDENTIAL_REQUIRED")

    async def list_banks(self) -> list[model.Bank]:
        return await self._store.list_banks()

    async def update_bank(self, code: str, enabled: bool, address: str) -> model.Bank:
        violations = []
        if not BANK_CODE.fullmatch(code):
            violations.append(errors.FieldViolation("code", "must be 2-16 capital letters"))
        if address and not (ADDRESS.fullmatch(address) and 0 < int(address.rsplit(":", 1)[1]) < 65536):
            violations.append(errors.FieldViolation("address", "must be host:port"))
        if violations:
            raise errors.InvalidArgument(violations)
        bank = await self._store.update_bank(code, enabled, address or None)
        if bank is None:
            raise errors.NotFound(f"bank {code} not found")
        return bank

    async def list_regions(self) -> list[model.Region]:
        return await self._store.list_regions()

    async def update_region(self, code: str, is_open: bool) -> model.Region:
        if not REGION_CODE.fullmatch(code):
            raise errors.InvalidArgument([errors.FieldViolation("code", "must be a 6-digit GB/T 2260 code")])
        region = await self._store.update_region(code, is_open, self._clock.now())
        if region is None:
            raise errors.NotFound(f"region {code} not found")
        return region

    async def stats(self) -> model.ServiceStats:
        return await self._store.stats()
