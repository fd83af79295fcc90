"""The bank and region catalogue, served from memory for up to a second.

Every lookup reads the catalogue, and operators change it rarely: a replica reads it
at most once per CATALOGUE_TTL, and its own changes clear its copy at once (other
replicas' changes apply within the TTL)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from datetime import datetime
from typing import Any, TypeVar

from sqlalchemy import func, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from server.population.catalogue import BankInfo, RegionInfo
from server.union.domain import model
from server.union.storage.aggregate import Aggregate
from server.union.storage.models import (
    BankRow,
    CounterRow,
    RegionRow,
)
from server.union.storage.runner import Runner
from server.union.storage.stats_store import COUNTERS

T = TypeVar("T")

# How long a replica serves the bank and region catalogue from memory (admin changes made on
# another replica apply within this; the orchestrator re-reads banks on the same rhythm).
CATALOGUE_TTL = 1.0


class SqlCatalogue(Aggregate):
    """server.union.domain.ports.CatalogueStore."""

    def __init__(self, runner: Runner) -> None:
        super().__init__(runner)
        # Banks and regions, cached: (when read, rows). Cleared by this process's own changes.
        self._catalogue: dict[str, tuple[float, Any]] = {}
        self._catalogue_reads: dict[str, asyncio.Future[Any]] = {}
        self._catalogue_generation = 0

    async def seed_catalogue(
        self,
        banks: Sequence[BankInfo],
        addresses: dict[str, str],
        regions: Sequence[RegionInfo],
        now: datetime,
    ) -> None:
        """Insert banks and regions that are not there yet; never overwrite an operator's change."""

        bank_rows = [
            {
                "code": bank.code,
                "position": position,
                "name": bank.name,
                "english_name": bank.english_name,
                "address": addresses.get(bank.code, ""),
                "enabled": True,
                "interbank_code": bank.interbank_code,
                "tls_name": None,
            }
            for position, bank in enumerate(banks)
        ]
        region_rows = [
            {
                "code": region.code,
                "name": region.name,
                "open": region.pilot_open_date is not None,
                "open_time": now if region.pilot_open_date is not None else None,
                "pilot_batch": region.pilot_batch,
                "pilot_open_date": region.pilot_open_date,
            }
            for region in regions
        ]

        self._invalidate_catalogue()

        def work(s: Session) -> None:
            s.execute(self.runner.insert_missing(BankRow), bank_rows)
            s.execute(self.runner.insert_missing(RegionRow), region_rows)
            s.execute(
                self.runner.insert_missing(CounterRow), [{"name": name, "value": 0} for name in COUNTERS]
            )

        await self.runner.run(work)

    async def set_bank_addresses(self, addresses: dict[str, str]) -> None:
        """Point banks at where they listen in this deployment (the demo's ports change per run)."""

        self._invalidate_catalogue()

        def work(s: Session) -> None:
            for code, address in addresses.items():
                s.execute(update(BankRow).where(BankRow.code == code).values(address=address))

        await self.runner.run(work)

    async def _cached(self, name: str, work: Callable[[Session], list[T]]) -> list[T]:
        """The catalogue read `name`, at most once per CATALOGUE_TTL: one read in flight at a
        time, which every caller that finds the copy stale waits for (not one read each)."""
        cached = self._catalogue.get(name)
        if cached is not None and time.monotonic() - cached[0] < CATALOGUE_TTL:
            return list(cached[1])
        reading = self._catalogue_reads.get(name)
        if reading is None:
            reading = asyncio.ensure_future(self.runner.run(work))
            self._catalogue_reads[name] = reading
            generation = self._catalogue_generation

            def done(_: asyncio.Future[Any]) -> None:
                if self._catalogue_reads.get(name) is reading:
                    del self._catalogue_reads[name]
                unchanged = generation == self._catalogue_generation  # no change was made meanwhile
                if unchanged and not reading.cancelled() and reading.exception() is None:
                    self._catalogue[name] = (time.monotonic(), reading.result())

            reading.add_done_callback(done)
        rows: list[T] = await asyncio.shield(reading)
        return list(rows)

    def _invalidate_catalogue(self) -> None:
        """This process changed a bank or region: its next read goes to the database."""
        self._catalogue_generation += 1
        self._catalogue.clear()
        self._catalogue_reads.clear()

    async def list_banks(self) -> list[model.Bank]:
        """The bank catalogue, read at most once per CATALOGUE_TTL (every lookup needs it)."""

        def work(s: Session) -> list[model.Bank]:
            return [_bank(row) for row in s.scalars(select(BankRow).order_by(BankRow.position))]

        return await self._cached("banks", work)

    async def update_bank(self, code: str, enabled: bool | None, address: str | None) -> model.Bank | None:
        """Change what is given (not None): an update changes only the fields its mask names."""

        def work(s: Session) -> model.Bank | None:
            row = s.get(BankRow, code)
            if row is None:
                return None
            if enabled is not None:
                row.enabled = enabled
            if address:
                row.address = address
            return _bank(row)

        try:
            return await self.runner.run(work)
        finally:
            self._invalidate_catalogue()

    async def create_bank(self, new: model.NewBank) -> model.Bank | None:
        """Register a bank joining the service, enabled, after every bank there is (bank order
        is joining order). None if its code or CNAPS code is taken (a bank that left is kept,
        disabled, so its code stays taken). Every replica's catalogue copy picks it up within
        CATALOGUE_TTL, this one's at once."""

        def work(s: Session) -> model.Bank | None:
            taken = s.scalar(
                select(func.count())
                .select_from(BankRow)
                .where((BankRow.code == new.code) | (BankRow.interbank_code == new.interbank_code))
            )
            if taken:
                return None
            position = (s.scalar(select(func.max(BankRow.position))) or 0) + 1
            row = BankRow(
                code=new.code,
                position=position,
                name=new.name,
                english_name=new.english_name,
                address=new.address,
                enabled=True,
                interbank_code=new.interbank_code,
                tls_name=new.tls_name or None,
            )
            s.add(row)
            s.flush()
            return _bank(row)

        try:
            return await self.runner.run(work)
        except IntegrityError:
            return None  # two operators registered the same code at once; the other one won
        finally:
            self._invalidate_catalogue()

    async def list_regions(self) -> list[model.Region]:
        def work(s: Session) -> list[model.Region]:
            return [_region(row) for row in s.scalars(select(RegionRow).order_by(RegionRow.code))]

        return await self._cached("regions", work)

    async def get_region(self, code: str) -> model.Region | None:
        return next((region for region in await self.list_regions() if region.code == code), None)

    async def update_region(self, code: str, is_open: bool, now: datetime) -> model.Region | None:
        def work(s: Session) -> model.Region | None:
            row = s.get(RegionRow, code)
            if row is None:
                return None
            if is_open and not row.open:
                row.open_time = now
            if not is_open:
                row.open_time = None
            row.open = is_open
            return _region(row)

        try:
            return await self.runner.run(work)
        finally:
            self._invalidate_catalogue()


def _bank(row: BankRow) -> model.Bank:
    return model.Bank(
        row.code,
        row.name,
        row.english_name,
        row.address,
        row.enabled,
        row.position,
        row.interbank_code or "",
        row.tls_name or "",
    )


def _region(row: RegionRow) -> model.Region:
    return model.Region(row.code, row.name, row.open, row.open_time, row.pilot_batch, row.pilot_open_date)
