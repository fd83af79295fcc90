"""Lookup change notifications (server/union/domain/events.py)."""

from __future__ import annotations

import asyncio

from server.union.domain.events import LookupEvents

AN_HOUR = 3600.0


async def _settle() -> None:
    for _ in range(20):
        await asyncio.sleep(0)


async def test_a_change_before_the_wait_is_not_lost() -> None:
    events = LookupEvents()
    with events.subscribe("l1") as changes:
        events.notify("l1")
        async with asyncio.timeout(10):  # a guard against hanging, not a measurement
            await changes.wait(AN_HOUR)


async def test_a_burst_is_coalesced_but_the_final_change_is_delivered_at_once() -> None:
    events = LookupEvents()
    with events.subscribe("l1") as changes:
        lingering = asyncio.create_task(changes.wait(AN_HOUR, coalesce=AN_HOUR))
        await _settle()
        events.notify("l1")  # a bank answered: the watcher lingers for the rest of the burst
        await _settle()
        assert not lingering.done()
        events.notify("l1", final=True)  # the report was written meanwhile: no more lingering
        async with asyncio.timeout(10):
            await lingering

    with events.subscribe("l2") as changes:
        final = asyncio.create_task(changes.wait(AN_HOUR, coalesce=AN_HOUR))
        await _settle()
        events.notify("l2", final=True)  # the report is written: nothing more is coming
        async with asyncio.timeout(10):
            await final
    assert events.watcher_count() == 0
