"""In-process notification that a lookup changed, so watchers wake at once.

Other replicas' changes are not seen here; watchers also re-read on a short
poll interval, so a watch on any replica converges.
"""

from __future__ import annotations

import asyncio
from collections import defaultdict


class LookupEvents:
    def __init__(self) -> None:
        self._waiters: dict[str, set[asyncio.Event]] = defaultdict(set)

    def notify(self, lookup_id: str) -> None:
        for event in self._waiters.get(lookup_id, ()):
            event.set()

    async def wait(self, lookup_id: str, max_wait: float, coalesce: float = 0.0) -> None:
        """Return when `lookup_id` changes or `max_wait` seconds pass, whichever is first.

        With `coalesce`, linger that long after the first change so that a burst of changes (16
        banks answering together) costs the watcher one re-read instead of one each."""
        event = asyncio.Event()
        self._waiters[lookup_id].add(event)
        try:
            async with asyncio.timeout(max_wait):
                await event.wait()
            if coalesce:
                await asyncio.sleep(coalesce)
        except TimeoutError:
            pass
        finally:
            waiters = self._waiters.get(lookup_id)
            if waiters is not None:
                waiters.discard(event)
                if not waiters:
                    del self._waiters[lookup_id]

    def watcher_count(self) -> int:
        return sum(len(w) for w in self._waiters.values())
