"""How long the union keeps what it holds about a person, and the sweep that enforces it.

Every table that holds something about a person has a retention here (docs/privacy-and-security.md
lists them with the reasons). Reports expire at the end of the Nth natural day after generation in
a local calendar; their lookup, per-bank tasks and counts go with them (storage deletes them
together). Everything else is kept for a fixed time, then purged by `RetentionSweep`.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, time, timedelta
from typing import Protocol
from zoneinfo import ZoneInfo

from server.union.domain.ports import RetentionStore

DEFAULT_TIMEZONE = "Asia/Shanghai"
DEFAULT_RETENTION_DAYS = 7

log = logging.getLogger(__name__)


def report_expire_time(
    generated: datetime, timezone: str = DEFAULT_TIMEZONE, days: int = DEFAULT_RETENTION_DAYS
) -> datetime:
    """A report generated on local day D is served through the whole of day D+days, and no later.

    Generated 2026-11-27 15:00 in Shanghai → expires 2026-12-05 00:00 Shanghai time
    (the end of 2026-12-04, the 7th natural day after the 27th).
    """
    zone = ZoneInfo(timezone)
    local_day = generated.astimezone(zone).date()
    end = datetime.combine(local_day + timedelta(days=days + 1), time(0), tzinfo=zone)
    return end.astimezone(UTC)


@dataclass(frozen=True)
class RetentionPolicy:
    # Reports, their cards, lookups and per-bank counts: natural days in this calendar.
    report_days: int = DEFAULT_RETENTION_DAYS
    timezone: str = DEFAULT_TIMEZONE
    # Verifications, pending, completed or refused (the hourly limits need the last hour only).
    verifications: timedelta = timedelta(hours=24)
    # Card closures and "not mine" flags, from when the bank's answer made them final.
    card_actions: timedelta = timedelta(days=30)
    # Report-ready messages that could not be sent.
    notifications: timedelta = timedelta(hours=24)
    # The audit trail (keyed hashes and validated identifiers only), and who was ever verified.
    audit: timedelta = timedelta(days=180)
    # The development SMS outbox file.
    sms_outbox: timedelta = timedelta(hours=24)
    # How often the sweep runs.
    interval: timedelta = timedelta(minutes=10)

    def __post_init__(self) -> None:
        ZoneInfo(self.timezone)  # an unknown zone fails at start, not at the first report
        if self.report_days < 1:
            raise ValueError("report_days must be at least 1")

    def report_expire_time(self, generated: datetime) -> datetime:
        return report_expire_time(generated, self.timezone, self.report_days)


class Outbox(Protocol):
    def purge(self, before: datetime) -> int: ...


Purge = Callable[[datetime], Awaitable[int]]


class RetentionSweep:
    def __init__(
        self,
        store: RetentionStore,
        policy: RetentionPolicy,
        quota_window: timedelta,
        outbox: Outbox | None = None,
        extra: Mapping[str, Purge] | None = None,
    ) -> None:
        self._store = store
        # Quota slots outlive the quotas' window by nothing: the longest window any policy uses,
        # handed over where they are wired, so a longer window can never be purged early.
        self._quota_window = quota_window
        self._outbox = outbox
        # Purges kept by other stores (e.g. sessions past their expiry): kind → purge(now).
        self._extra = dict(extra or {})
        self.policy = policy

    async def sweep(self, now: datetime) -> dict[str, int]:
        """Purge everything whose retention has ended; returns how many of each went."""
        policy = self.policy
        purged = {
            "reports": await self._store.purge_expired_reports(now),
            "verifications": await self._store.purge_verifications(now - policy.verifications),
            "card_actions": await self._store.purge_card_actions(now - policy.card_actions),
            "notifications": await self._store.purge_notifications(now - policy.notifications),
            "audit_events": await self._store.purge_audit_events(now - policy.audit),
            "verified_people": await self._store.purge_verified_people(now - policy.audit),
            "quota_slots": await self._store.purge_quota_slots(now - self._quota_window),
            "bank_cooldowns": await self._store.purge_bank_cooldowns(now),
        }
        for kind, purge in self._extra.items():
            purged[kind] = await purge(now)
        await self._store.erase_stale_verifications(now)
        if self._outbox is not None:
            purged["sms_outbox"] = self._outbox.purge(now - policy.sms_outbox)
        if any(purged.values()):
            log.info("retention sweep", extra={"purged": {k: v for k, v in purged.items() if v}})
        return purged
