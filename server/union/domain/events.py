"""In-process notification that a lookup changed, so watchers wake at once.

Other replicas' changes are not seen here; watchers also re-read on a short
poll interval, so a watch on any replica converges.

A watcher subscribes *before* it reads, so that a change landing between its
read and its wait is not lost (it would otherwise sleep a whole poll interval).
"""

from __future__ import annotations

import asyncio
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager


class Subscription:
    """Changes to one lookup since the last `wait` returned."""

    def __init__(self) -> None:
        self._changed = asyncio.Event()
        self._final = asyncio.Event()

    def set(self, final: bool = False) -> None:
        if final:
            self._final.set()
        self._changed.set()

    async def wait(self, max_wait: float, coalesce: float = 0.0) -> None:
        """Return when the lookup changed (or had changed since the last wait) or `max_wait`
        seconds pass. With `coalesce`, linger that long after the first change so that a burst
        (16 banks answering together) costs the watcher one re-read instead of one each; not
        after a final change (the report is written: nothing more is coming), and not a moment
        longer once one arrives while lingering (the report would wait out the linger)."""
        try:
            async with asyncio.timeout(max_wait):
                await self._changed.wait()
            if coalesce and not self._final.is_set():
                async with asyncio.timeout(coalesce):
                    await self._final.wait()
        except TimeoutError:
            pass
        # Cleared before the caller re-reads: a change during that read sets it again.
        self._changed.clear()


class LookupEvents:
    def __init__(self) -> None:
        self._waiters: dict[str, set[Subscription]] = defaultdict(set)

    def notify(self, lookup_id: str, final: bool = False) -> None:
        """`lookup_id` changed; `final`: it will not change again (its report is written)."""
        for subscription in self._waiters.get(lookup_id, ()):
            subscription.set(final)

    @contextmanager
    def subscribe(self, lookup_id: str) -> Iterator[Subscription]:
        subscription = Subscription()
        self._waiters[lookup_id].add(subscription)
        try:
            yield subscription
        finally:
            waiters = self._waiters.get(lookup_id)
            if waiters is not None:
                waiters.discard(subscription)
                if not waiters:
                    del self._waiters[lookup_id]

    async def wait(self, lookup_id: str, max_wait: float, coalesce: float = 0.0) -> None:
        """Return when `lookup_id` changes or `max_wait` seconds pass (for callers that check
        their condition again after every return, so a change before the call costs at most
        `max_wait`)."""
        with self.subscribe(lookup_id) as subscription:
            await subscription.wait(max_wait, coalesce)

    def watched_count(self) -> int:
        """How many lookups (or card actions) somebody is waiting on (one step: metrics read it
        from another thread)."""
        return len(self._waiters)

    def watcher_count(self) -> int:
        return sum(len(w) for w in self._waiters.values())
